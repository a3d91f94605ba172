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
    internvl_path: Optional[str] = None
    dcae_path: Optional[str] = None
    # activation checkpointing in encoder and decoder
    grad_checkpointing: bool = False
    # frozen perceptual-loss networks: published weight files (torchvision vgg16 .pth,
    # lpips weights/v0.1/vgg.pth, torchvision convnext_small .pth). With
    # perceptual_pretrained all three must exist; without, they stay random (tests only).
    perceptual_pretrained: bool = False
    vgg_path: Optional[str] = None
    lpips_path: Optional[str] = None
    convnext_path: Optional[str] = None
