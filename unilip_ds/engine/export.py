"""Consolidated weights from a run's latest checkpoint, written per component in the
transformers / diffusers save_pretrained layout (see Task.export_components)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from unilip_ds.config import Config, from_dict, to_yaml
from unilip_ds.engine import checkpoint
from unilip_ds.engine.ema import consolidate
from unilip_ds.engine.weights import load_state_dict_into
from unilip_ds.tasks.base import MAIN, build_task


class ExportError(RuntimeError):
    pass


def raw_weights(cdir: Path, engine: str) -> Dict[str, torch.Tensor]:
    """Full fp32 weights of one engine from its DeepSpeed checkpoint (any ZeRO stage)."""
    edir = cdir / engine
    plain = edir / "mp_rank_00_model_states.pt"
    if not list(edir.glob("*optim_states.pt")):  # ZeRO-0: the module is saved whole
        sd = torch.load(plain, map_location="cpu", weights_only=False)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return dict(get_fp32_state_dict_from_zero_checkpoint(str(cdir), tag=engine))


def ema_weights(output_dir: Path, tag: str, meta: dict) -> Dict[str, torch.Tensor]:
    ranks = range(meta["world_size"]) if meta.get("ema_partitioned") else [0]
    return consolidate([checkpoint.rank_state(output_dir, tag, r)["ema"] for r in ranks])


def consolidated(run_dir: str | Path, use_ema: bool = True) -> Tuple[Config, Dict[str, torch.Tensor], dict]:
    run_dir = Path(run_dir)
    tag = checkpoint.latest_tag(run_dir)
    if tag is None:
        raise ExportError(f"{run_dir} has no checkpoint (no {checkpoint.ckpt_root(run_dir)}/latest)")
    meta = checkpoint.read_meta(run_dir, tag)
    cfg = from_dict(meta["config"])
    sd = raw_weights(checkpoint.ckpt_root(run_dir) / tag, MAIN)
    info = {"source": str(run_dir.resolve() / "checkpoints" / tag), "step": meta["step"],
            "weights": "raw"}
    if use_ema and meta.get("ema"):
        ema = ema_weights(run_dir, tag, meta)
        missing = sorted(set(ema) - set(sd))
        if missing:
            raise ExportError(f"EMA names parameters the checkpoint lacks: {missing[:3]}")
        sd.update(ema)
        info["weights"] = "ema"
    return cfg, sd, info


def export(run_dir: str | Path, out: str | Path, use_ema: bool = True,
           cfg_override: Optional[Config] = None) -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out} exists and is not empty; nothing was written")
    cfg, sd, info = consolidated(run_dir, use_ema)
    cfg = cfg_override or cfg
    task = build_task(cfg)
    modules = task.build_modules()
    load_state_dict_into(modules[MAIN], sd, strict=True, what=f"checkpoint of {run_dir}")
    out.mkdir(parents=True, exist_ok=True)
    info["components"] = task.write_export(modules[MAIN], out)
    (out / "config.yaml").write_text(to_yaml(cfg))
    (out / "export.json").write_text(json.dumps(info, indent=1))
    return info
