"""Tiny stand-ins for the published weight directories, in their real on-disk layouts, for
tests and the demo (nothing can be downloaded there). Each is loaded back through the same
code path a user's real directory takes.

  save_tiny_internvl  an InternVL3 `-hf` directory: InternVLForConditionalGeneration weights +
                      config, and a Qwen2 byte-level BPE tokenizer trained on a small corpus,
                      with InternVL3's special tokens and a chat template
  save_tiny_sana      a SANA diffusers directory (`transformer/` = SanaTransformer2DModel)
  save_tiny_dcae      a diffusers AutoencoderDC directory
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import torch

from unilip_ds.models.flavors import get_flavor, internvl_config
from unilip_ds.models.prompts import IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START

# Qwen2.5 / InternVL3 special tokens (the image tokens as InternVL3's tokenizer adds them)
SPECIAL_TOKENS = ["<|endoftext|>", IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT]
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                 "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CORPUS = ["Generate an image: a photo of a cat sitting on a wooden table.",
          "Edit the image: flip the image horizontally. Turn the image upside down.",
          "a red sports car on a mountain road, a bowl of fresh fruit, studio lighting",
          "an astronaut riding a horse on the moon, coffee cup, rocket, camera, coins, grass"]


def bf16_exact(module: torch.nn.Module) -> torch.nn.Module:
    """Round weights to bf16-representable values (as published bf16 checkpoints are), so a
    bf16 run keeps frozen weights bit for bit."""
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.bfloat16().float())
    return module


def tiny_tokenizer(corpus: Iterable[str], vocab_size: int = 640):
    """A transformers Qwen2Tokenizer (byte-level BPE, Qwen2's pre-tokenizer) trained on
    `corpus`, with the special tokens and chat template of an InternVL3 tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    base = Qwen2Tokenizer()
    tok = Tokenizer(models.BPE())
    tok.normalizer = base._tokenizer.normalizer
    tok.pre_tokenizer = base._tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus) + CORPUS, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    out = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, additional_special_tokens=SPECIAL_TOKENS[1:])
    out.chat_template = CHAT_TEMPLATE
    return out


def vision_position_embedding(vision_tower: torch.nn.Module) -> None:
    """A fixed 2-D sin-cos table as the (random) vision tower's absolute position embedding.
    transformers initialises it to zeros, which leaves a ViT permutation-equivariant over its
    patches: every feature would depend on its patch's content only, so the edit reference's
    tokens would carry no position for the DiT to look up (a pretrained InternViT's learnt
    table does). No random draw: the other weights stay those of the seed."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    emb = vision_tower.embeddings.position_embeddings
    grid = int(round((emb.shape[1] - 1) ** 0.5))
    with torch.no_grad():
        emb[:, 1:] = get_2d_sincos_pos_embed(emb.shape[-1], grid, output_type="pt").to(emb.dtype)


def unit_image_features(model: torch.nn.Module, size: int) -> None:
    """Scales the (random) mlp1's output layer so that image features have RMS 1 on a fixed
    batch of noise images (normalised pixels). Its default init gives ~0.03, next to the
    LLM's post-norm states of ~1 with which they share the connector's input (the dual condition): the connector's
    first residual update then outweighs each reference token, and a tiny generator reads
    the reference as its mean, never learning where things are (benchmarks/edit_learns.py).
    Deterministic: no draw from the global RNG."""
    proj = model.model.multi_modal_projector.linear_2
    pixels = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rms = model.model.get_image_features(pixels, vision_feature_layer=-1,
                                             vision_feature_select_strategy="default").pooler_output.pow(2).mean().sqrt()
        proj.weight.div_(rms)
        proj.bias.div_(rms)


def save_tiny_internvl(out: Path, corpus: Iterable[str] = (), seed: int = 0) -> Path:
    from transformers import InternVLForConditionalGeneration
    tok = tiny_tokenizer(corpus)
    flavor = get_flavor("tiny")
    if len(tok) > flavor.text["vocab_size"]:
        raise ValueError(f"tiny tokenizer has {len(tok)} tokens > vocab {flavor.text['vocab_size']}")
    config = internvl_config(flavor)
    config.image_token_id = tok.convert_tokens_to_ids(IMG_CONTEXT)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    vision_position_embedding(model.model.vision_tower)
    size = config.vision_config.image_size
    unit_image_features(model, size[0] if isinstance(size, (list, tuple)) else size)
    model = bf16_exact(model)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return Path(out)


def save_tiny_sana(out: Path, seed: int = 0, flavor: str = "tiny") -> Path:
    from diffusers import SanaTransformer2DModel
    torch.manual_seed(seed)
    bf16_exact(SanaTransformer2DModel(**get_flavor(flavor).sana)).save_pretrained(str(Path(out) / "transformer"))
    return Path(out)


def save_tiny_dcae(out: Path, seed: int = 0, flavor: Optional[str] = "tiny") -> Path:
    from diffusers import AutoencoderDC
    torch.manual_seed(seed)
    bf16_exact(AutoencoderDC(**get_flavor(flavor).dcae)).save_pretrained(str(out))
    return Path(out)


def save_tiny_recon_export(out: Path, internvl: Path, seed: int = 2) -> Path:
    """A recon export (launch/export.py layout) of the tiny flavor whose encoder is the
    InternVL directory's; adapter and decoder freshly initialised."""
    from unilip_ds.engine.weights import save_component
    from unilip_ds.models.unilip import UniLIP, load_internvl_vision
    torch.manual_seed(seed)
    unilip = bf16_exact(UniLIP(get_flavor("tiny")))
    load_internvl_vision(unilip.vision, internvl)
    for name, comp in unilip.export_components().items():
        save_component(comp, Path(out) / name)
    (Path(out) / "config.yaml").write_text("model:\n  flavor: tiny\n")
    return Path(out)
