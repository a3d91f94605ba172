"""DeepSpeed engines for a task: one per trainable module, each with its own optimizer,
LR groups (multipliers, no-weight-decay set) and warmup + cosine schedule."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, List, Mapping

import torch
from torch import nn

from unilip_ds.config import Config
from unilip_ds.engine.ds_config import build_ds_config, zero_stage
from unilip_ds.tasks.base import ParamGroup, Task

_HF_DS_CONFIG = None  # transformers keeps only a weak reference: hold it here


def model_init_context(raw_ds: Dict[str, Any], cfg: Config, world_size: int):
    """Build big models partitioned from the start under ZeRO-3 (deepspeed.zero.Init), and
    tell transformers so its weight init / loading gathers partitioned params."""
    if zero_stage(raw_ds) != 3:
        return contextlib.nullcontext()
    import deepspeed
    # these run tensor code at import time that zero.Init's patched constructors break
    import diffusers  # noqa: F401
    import torch._dynamo  # noqa: F401
    import transformers  # noqa: F401
    from transformers.integrations import HfDeepSpeedConfig
    global _HF_DS_CONFIG
    ds = build_ds_config(cfg, raw_ds, world_size, cfg.optim.lr)
    _HF_DS_CONFIG = HfDeepSpeedConfig(ds)
    return deepspeed.zero.Init(config_dict_or_path=ds)


def lr_factor(cfg: Config, first_step: int = 0):
    """LR multiplier at the engine's optimizer step `it` (0-based): linear warmup, then
    cosine to min_lr at the run's last step. An engine that starts late (the GAN
    discriminator) warms up from its first step and still ends with the run."""
    warm, total = cfg.optim.warmup_steps, cfg.train.max_steps - first_step
    floor = cfg.optim.min_lr / cfg.optim.lr

    def factor(it: int) -> float:
        if it < warm:
            return (it + 1) / warm
        progress = min(1.0, (it - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def torch_groups(groups: List[ParamGroup], lr: float) -> List[dict]:
    return [{"params": g.params, "lr": lr * g.lr_scale, "weight_decay": g.weight_decay}
            for g in groups if g.params]


def build_engines(task: Task, modules: Mapping[str, nn.Module], cfg: Config,
                  raw_ds: Dict[str, Any], world_size: int) -> Dict[str, Any]:
    import deepspeed

    engines: Dict[str, Any] = {}
    for name, module in modules.items():
        lr = task.engine_lr(name)
        ds = build_ds_config(cfg, raw_ds, world_size, lr)
        groups = torch_groups(task.param_groups(name, module), lr)
        if not groups:
            raise ValueError(f"engine '{name}' has no trainable parameters")
        optimizer = None
        if "optimizer" not in ds:  # DeepSpeed builds its own (e.g. CPU Adam for offload)
            optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.optim.betas),
                                          eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
                                          fused=torch.cuda.is_available() or None)
        sched = None
        if "scheduler" not in ds:
            factor = lr_factor(cfg, task.engine_first_step(name))

            def sched(opt, factor=factor):
                return torch.optim.lr_scheduler.LambdaLR(opt, factor)
        engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
            lr_scheduler=sched, config=ds, dist_init_required=False)
        engines[name] = engine
    return engines
