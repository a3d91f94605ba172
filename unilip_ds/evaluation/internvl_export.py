"""An export as a complete InternVL3 `-hf` model directory with the UniLIP vision path, for
the understanding benchmarks (`InternVLForConditionalGeneration.from_pretrained` and
`AutoProcessor.from_pretrained` load it as is, hence lmms-eval's `internvl_hf` model):

    python launch/export.py --as-internvl /ckpt/InternVL3-1B-hf --export exports/recon_stage2_448 --out exports/unilip-1b-hf

The InternVL3 directory gives the language model, the tokenizer, the processor files and
the chat template (copied as they are); the export gives the vision tower +
multi_modal_projector: a recon export's `vision/` (through `load_vision_into_internvl`, so
every key must fit) or a gen export's `mllm/` (the UniLIP encoder the generator was trained
with). The weights are written in the InternVL3 directory's dtype (bf16 for the released
`-hf` checkpoints) unless --dtype says otherwise; `unilip_export.json` records the sources.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WRITTEN = ("config.json", "generation_config.json")  # save_pretrained writes these
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class InternVLExportError(ValueError):
    """Bad input: one line, exit code 2."""


def _vision_source(export: Path) -> str:
    if (export / "vision").is_dir():
        return "vision"
    if (export / "mllm").is_dir() and (export / "model_index.json").is_file():
        return "mllm"
    raise InternVLExportError(f"--export {export}: neither a recon export (vision/) nor a gen export "
                              "(model_index.json + mllm/)")


def _source_dtype(internvl: Path) -> str:
    cfg = json.loads((internvl / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return name if name in DTYPES else "float32"


def load_vision_from_mllm(model, mllm_dir: Path) -> int:
    """The vision tower + projector of a gen export's `mllm/` (an InternVL save_pretrained
    directory) into `model`; every vision key must fit. Returns the number of tensors."""
    from torch import nn

    from unilip_ds.engine.weights import load_state_dict_into, read_weights_dir
    prefixes = ("vision_tower.", "multi_modal_projector.")

    def strip(k: str) -> str:
        return k[len("model."):] if k.startswith("model.") else k
    sd = {strip(k): v for k, v in read_weights_dir(mllm_dir, keep=lambda k: strip(k).startswith(prefixes)).items()}
    base = model.model if hasattr(getattr(model, "model", None), "vision_tower") else model
    holder = nn.Module()
    holder.vision_tower = base.vision_tower
    holder.multi_modal_projector = base.multi_modal_projector
    load_state_dict_into(holder, sd, strict=True, what=f"vision path of {mllm_dir}")
    return len(sd)


def export_as_internvl(internvl: str | Path, export: str | Path, out: str | Path,
                       dtype: Optional[str] = None) -> dict:
    from transformers import InternVLForConditionalGeneration

    from unilip_ds.models.unilip import load_vision_into_internvl
    internvl, export, out = Path(internvl), Path(export), Path(out)
    if not (internvl / "config.json").is_file():
        raise InternVLExportError(f"--as-internvl {internvl}: not a transformers checkpoint dir (no config.json)")
    source = _vision_source(export)
    if out.exists() and any(out.iterdir()):
        raise InternVLExportError(f"--out {out} exists and is not empty; nothing was written")
    dtype = dtype or _source_dtype(internvl)
    if dtype not in DTYPES:
        raise InternVLExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    model = InternVLForConditionalGeneration.from_pretrained(str(internvl), dtype=DTYPES[dtype]).eval()
    if source == "vision":
        load_vision_into_internvl(model, export / "vision")
    else:
        load_vision_from_mllm(model, export / "mllm")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    copied = []
    for f in sorted(internvl.iterdir()):  # tokenizer, processor, chat template, README ...
        if (f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in WEIGHT_INDEXES
                and f.name not in WRITTEN and not (out / f.name).exists()):
            shutil.copy2(f, out / f.name)
            copied.append(f.name)
    info = {"internvl": str(internvl.resolve()), "export": str(export.resolve()), "vision_from": f"{source}/",
            "dtype": dtype, "copied": copied}
    (out / "unilip_export.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
