"""Model section of the config tree (pure dataclasses: importing this must stay cheap)."""

from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelConfig:
    # tiny (random, for tests and the demo), 1b, 2b (real dimensions)
    flavor: str = "tiny"
    # weights-only start from a previous stage's export (launch/export.py layout) or run dir
    init_from: Optional[str] = None
    # local paths to real pretrained weights (transformers / diffusers layouts)
    internvl_path: Optional[str] = None  # InternVL3 `-hf` directory (weights + tokenizer)
    dcae_path: Optional[str] = None  # diffusers AutoencoderDC directory (f32c32 SANA)
    # generator: a recon export (its encoder + mlp1 become the MLLM's vision path; its
    # adapter and decoder define the UniLIP latent space) and a SANA diffusers directory
    # (its `transformer/` subfolder)
    unilip_path: Optional[str] = None
    sana_path: Optional[str] = None
    # attention of the LLM, the connector and the vision tower: auto = flash attention 2
    # where the flash_attn package imports on CUDA, else PyTorch SDPA; or flash | sdpa | eager
    attn_impl: str = "auto"
    # activation checkpointing per block: encoder and decoder (recon); LLM, connector and
    # DiT (gen)
    grad_checkpointing: bool = False
    # frozen perceptual-loss networks: published weight files (torchvision vgg16 .pth,
    # lpips weights/v0.1/vgg.pth, torchvision convnext_small .pth). With
    # perceptual_pretrained all three must exist; without, they stay random (tests only).
    perceptual_pretrained: bool = False
    vgg_path: Optional[str] = None
    lpips_path: Optional[str] = None
    convnext_path: Optional[str] = None
