"""Consolidated weights from a run's latest checkpoint, written per component in the
transformers / diffusers save_pretrained layout (see Task.export_components). A checkpoint
holds what trains; the frozen parts come from the sources the run read them from, checked
against the digests the checkpoint recorded (engine/sources.py), so an export is complete."""

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
    """The run's full fp32 state dict of the `MAIN` module: from the checkpoint, plus, where
    it holds only what trains, the frozen parameters read from their sources (checked)."""
    cfg, sd, info, meta = _checkpoint_weights(run_dir, use_ema)
    if checkpoint.holds_frozen(meta):
        return cfg, sd, info
    _, modules = _complete(run_dir, cfg, sd, meta)
    full = {k: v.detach().float() if v.is_floating_point() else v.detach()
            for k, v in modules[MAIN].state_dict().items()}
    return cfg, full, info


def _checkpoint_weights(run_dir: str | Path, use_ema: bool):
    """(config, the `MAIN` engine's fp32 weights as the checkpoint holds them, info, meta)."""
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
    return cfg, sd, info, meta


def _complete(run_dir: str | Path, cfg: Config, sd: Dict[str, torch.Tensor], meta: dict,
              build_cfg: Optional[Config] = None):
    """(task, modules) built from `build_cfg` (default `cfg`, the run's) holding the run's
    weights: `sd`, and where the checkpoint holds only what trains, the frozen parameters from
    the sources the run read them from, checked first against the checkpoint's digests."""
    from unilip_ds.engine import sources
    lean = not checkpoint.holds_frozen(meta)
    if lean:
        try:
            sources.compare(meta.get("frozen_sources") or {},
                            sources.digests(build_task(cfg).frozen_sources(),
                                            Path(run_dir) / sources.CACHE),
                            f"checkpoint step_{meta['step']:08d} of {run_dir}")
        except (sources.SourceChanged, OSError) as exc:
            raise ExportError(str(exc)) from None
    task = build_task(build_cfg or cfg)
    modules = task.build_modules()
    if lean:  # as the run did at its start
        if cfg.model.init_from:
            task.init_from(modules, cfg.model.init_from)
        else:
            task.load_pretrained(modules)
        frozen = checkpoint.frozen_names(modules[MAIN])
        keys = set(modules[MAIN].state_dict())
        missing, unexpected = sorted(keys - set(sd) - frozen), sorted(set(sd) - keys)
        if missing or unexpected:
            raise ExportError(f"checkpoint of {run_dir}: {len(missing)} missing weights that train "
                              f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        sd = {k: v for k, v in sd.items() if k not in frozen}
    load_state_dict_into(modules[MAIN], sd, strict=not lean, what=f"checkpoint of {run_dir}")
    return task, modules


def export(run_dir: str | Path, out: str | Path, use_ema: bool = True,
           cfg_override: Optional[Config] = None) -> dict:
    """A complete model directory (the frozen parts from their sources where the checkpoint
    holds only what trains)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out} exists and is not empty; nothing was written")
    cfg, sd, info, meta = _checkpoint_weights(run_dir, use_ema)
    task, modules = _complete(run_dir, cfg, sd, meta, cfg_override)
    cfg = cfg_override or cfg
    out.mkdir(parents=True, exist_ok=True)
    info["components"] = task.write_export(modules[MAIN], out)
    (out / "config.yaml").write_text(to_yaml(cfg))
    (out / "export.json").write_text(json.dumps(info, indent=1))
    return info
