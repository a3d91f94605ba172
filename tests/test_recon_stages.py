"""The three recon stages as users chain them, 2 processes through launch/train.py, under
ZeRO-2 (deepspeed launcher) and ZeRO-3 (torchrun):

    recon_stage1      model.init_from=<init export> (vision = a saved tiny InternVL -hf's)
      -> export (EMA) -> recon_stage2      model.init_from=<stage1 export>, internvl_path
      -> export (EMA) -> recon_stage2_448  model.init_from=<stage2 export>, internvl_path

Every frozen tensor starts from a file the test wrote (the init export, the InternVL
checkpoint, the three perceptual weight files), so "did not change" is an exact comparison
with known values. Then the understanding check (evaluation/understanding.py) on the
stage 1 and stage 2 exports against that InternVL checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import pytest
import torch

from tests.launch_util import check, run, tiny_recon_args
from unilip_ds.engine import checkpoint
from unilip_ds.engine.export import consolidated, export, raw_weights
from unilip_ds.engine.weights import full_state_dict, read_weights_dir, save_component

TINY = ["model.flavor=tiny"]
IMAGE_TOKEN = "<IMG_CONTEXT>"


# ---------------------------------------------------------------------------------------
# assets: files in the real layouts
# ---------------------------------------------------------------------------------------
def save_tiny_internvl(out: Path, seed: int = 0) -> Path:
    """A random tiny InternVLForConditionalGeneration in the -hf layout, with a word-level
    tokenizer that has InternVL's image / chat special tokens (real -hf repos ship one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import InternVLForConditionalGeneration, PreTrainedTokenizerFast
    from unilip_ds.models.flavors import get_flavor, internvl_config

    special = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", IMAGE_TOKEN]
    words = "user assistant system describe the image in detail what is this a an of and . , ? \n".split(" ")
    vocab = {t: i for i, t in enumerate(special + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>",
                                   additional_special_tokens=special[2:])
    config = internvl_config(get_flavor("tiny"))
    config.image_token_id = vocab[IMAGE_TOKEN]  # within the tiny vocabulary
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    model.save_pretrained(str(out))
    fast.save_pretrained(str(out))
    return out


def save_perceptual(out: Path, seed: int = 1) -> Dict[str, str]:
    """Random tiny perceptual nets, one file each in the published layouts."""
    from unilip_ds.models.flavors import get_flavor
    from unilip_ds.models.perceptual import PerceptualNets
    f = get_flavor("tiny")
    torch.manual_seed(seed)
    nets = PerceptualNets(f.vgg_width_div, f.convnext_dims, f.convnext_depths, f.classifier_size)
    out.mkdir(parents=True, exist_ok=True)
    files = {"vgg_path": out / "vgg16.pth", "lpips_path": out / "lpips_vgg.pth",
             "convnext_path": out / "convnext_small.pth"}
    torch.save(nets.lpips.vgg.state_dict(), files["vgg_path"])
    torch.save(nets.lpips.heads.state_dict(), files["lpips_path"])
    torch.save(nets.convnext.state_dict(), files["convnext_path"])
    return {k: str(v) for k, v in files.items()}


def save_init_export(out: Path, internvl: Path, seed: int = 2) -> Path:
    """A stage-0 export (launch/export.py layout): vision = the InternVL checkpoint's,
    adapter and decoder freshly initialised."""
    from unilip_ds.models.flavors import get_flavor
    from unilip_ds.models.unilip import UniLIP, load_internvl_vision
    torch.manual_seed(seed)
    unilip = UniLIP(get_flavor("tiny"))
    load_internvl_vision(unilip.vision, internvl)
    for name, comp in unilip.export_components().items():
        save_component(comp, out / name)
    return out
