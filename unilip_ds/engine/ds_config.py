"""The DeepSpeed JSON: ZeRO settings come from the file, everything the config tree
defines (batch sizes, accumulation, clipping, precision, optimizer and scheduler
hyper-parameters) is written into it. "auto" is filled; an explicit value that
contradicts the tree is an error, so no setting is ever typed twice.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Dict

from unilip_ds.config import Config, ConfigError

AUTO = "auto"


def load_json(path: str) -> Dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--ds_config: no such file {path}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--ds_config: {path} does not parse as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--ds_config: {path} must hold a JSON object")
    return data


def _same(a: Any, b: Any) -> bool:
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return math.isclose(a, b, rel_tol=1e-12) if numbers else a == b


def _fill(d: Dict[str, Any], key: str, value: Any, where: str, tree_key: str) -> None:
    cur = d.get(key, AUTO)
    if cur == AUTO:
        d[key] = value
        return
    if not _same(cur, value):
        raise ConfigError(f"ds_config '{where}{key}' is {cur!r} but {tree_key} gives {value!r}: "
                          f"set it to \"auto\" or change {tree_key}")


def zero_stage(ds: Dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads(ds: Dict[str, Any]) -> Dict[str, str]:
    z = ds.get("zero_optimization", {})
    out = {}
    for what in ("offload_optimizer", "offload_param"):
        dev = (z.get(what) or {}).get("device", "none")
        if dev not in (None, "none"):
            out[what] = dev
    return out


def build_ds_config(cfg: Config, raw: Dict[str, Any], world_size: int, lr: float) -> Dict[str, Any]:
    """A complete DeepSpeed config for one engine whose base LR is `lr`."""
    ds = copy.deepcopy(raw)
    t, o = cfg.train, cfg.optim
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "", "train.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", t.grad_accum, "", "train.grad_accum")
    _fill(ds, "train_batch_size", t.micro_batch_size * t.grad_accum * world_size, "",
          "train.micro_batch_size x train.grad_accum x world size")
    _fill(ds, "gradient_clipping", t.grad_clip, "", "train.grad_clip")
    bf16 = ds.setdefault("bf16", {})
    _fill(bf16, "enabled", t.precision == "bf16", "bf16.", "train.precision")
    # a step with a non-finite gradient norm must be skipped (train.on_nonfinite): DeepSpeed's
    # check is on by default in bf16, but a JSON may turn it off; write it out explicitly
    if bf16.get("check_grad_overflow", AUTO) not in (AUTO, True):
        raise ConfigError("ds_config 'bf16.check_grad_overflow': must stay true (a step with a non-finite "
                          "gradient norm is skipped, train.on_nonfinite); remove it")
    bf16["check_grad_overflow"] = True
    if (ds.get("zero_optimization") or {}).get("compute_grad_norm") is False:
        raise ConfigError("ds_config 'zero_optimization.compute_grad_norm': false turns off the check that "
                          "skips a step with a non-finite gradient norm (train.on_nonfinite); remove it")
    if (ds.get("fp16") or {}).get("enabled") not in (None, False, AUTO):
        raise ConfigError("ds_config 'fp16.enabled': fp16 is not supported; use train.precision=bf16")
    ds["fp16"] = {"enabled": False}

    stage = zero_stage(ds)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"ds_config 'zero_optimization.stage': 0-3, got {stage}")
    off = offloads(ds)
    if off and stage == 0:
        raise ConfigError(f"ds_config 'zero_optimization.{next(iter(off))}': offload needs ZeRO "
                          f"stage >= 1 (stage is 0)")
    if "offload_param" in off and stage != 3:
        raise ConfigError("ds_config 'zero_optimization.offload_param': needs ZeRO stage 3")

    if "optimizer" in ds:
        opt = ds["optimizer"]
        if str(opt.get("type", "")).lower() not in ("adamw", "adam"):
            raise ConfigError(f"ds_config 'optimizer.type': AdamW expected, got {opt.get('type')!r}")
        p = opt.setdefault("params", {})
        _fill(p, "lr", lr, "optimizer.params.", "optim.lr")
        _fill(p, "betas", list(o.betas), "optimizer.params.", "optim.betas")
        _fill(p, "eps", o.eps, "optimizer.params.", "optim.eps")
        _fill(p, "weight_decay", o.weight_decay, "optimizer.params.", "optim.weight_decay")
        if str(opt["type"]).lower() == "adam":
            p.setdefault("adam_w_mode", True)
    if "scheduler" in ds:
        sch = ds["scheduler"]
        if sch.get("type", AUTO) not in (AUTO, "WarmupCosineLR"):
            raise ConfigError(f"ds_config 'scheduler.type': WarmupCosineLR (or remove it), got "
                              f"{sch.get('type')!r}")
        sch["type"] = "WarmupCosineLR"
        p = sch.setdefault("params", {})
        _fill(p, "total_num_steps", t.max_steps, "scheduler.params.", "train.max_steps")
        _fill(p, "warmup_num_steps", max(1, o.warmup_steps), "scheduler.params.", "optim.warmup_steps")
        _fill(p, "cos_min_ratio", o.min_lr / o.lr, "scheduler.params.", "optim.min_lr / optim.lr")
        _fill(p, "warmup_min_ratio", 0.0, "scheduler.params.", "(linear warmup from 0)")
        _fill(p, "warmup_type", "linear", "scheduler.params.", "(linear warmup)")
    ds.setdefault("steps_per_print", 10 ** 9)  # our tracker logs; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def check_ds_config(cfg: Config, path: str, world_size: int) -> Dict[str, Any]:
    """Parse and validate before any process group exists; returns the raw JSON."""
    raw = load_json(path)
    build_ds_config(cfg, raw, world_size, cfg.optim.lr)
    return raw
