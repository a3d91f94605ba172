"""Dry run: build the model on the meta device (no weights, no data, no process group)
and report parameter counts per component and the DeepSpeed model-state memory per GPU."""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from unilip_ds.config import Config
from unilip_ds.engine.ds_config import offloads, zero_stage
from unilip_ds.tasks.base import build_task

GiB = 1024 ** 3


def count(module: nn.Module) -> Dict[str, int]:
    seen, total, trainable = set(), 0, 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def model_state_bytes(total: int, trainable: int, stage: int, world: int, bf16: bool,
                      offload_optimizer: bool, offload_param: bool) -> Dict[str, float]:
    """Per-GPU bytes of parameters, gradients and optimizer states (activations excluded).
    bf16: 2-byte params/grads + fp32 master, Adam m and v (12 bytes); fp32: 4 + 8."""
    pb = 2 if bf16 else 4
    ob = 12 if bf16 else 8
    params = total * pb / (world if stage == 3 else 1)
    grads = trainable * pb / (world if stage >= 2 else 1)
    optim = trainable * ob / (world if stage >= 1 else 1)
    gpu = {"params": params, "grads": grads, "optimizer": optim}
    cpu = {"params": 0.0, "grads": 0.0, "optimizer": 0.0}
    if offload_optimizer:
        cpu["optimizer"], gpu["optimizer"] = optim, 0.0
        cpu["grads"] = trainable * 4 / world  # fp32 grads for the CPU step
    if offload_param:
        cpu["params"], gpu["params"] = params, 0.0
    return {"gpu_gib": sum(gpu.values()) / GiB, "cpu_gib_per_rank": sum(cpu.values()) / GiB,
            **{f"gpu_{k}_gib": v / GiB for k, v in gpu.items()}}


def dry_run(cfg: Config, ds_raw: Dict[str, Any], world_size: int) -> Dict[str, Any]:
    task = build_task(cfg)
    with torch.device("meta"):
        modules = task.build_modules()
    components = {name: count(m) for name, m in task.components(modules).items()}
    total = {k: sum(c[k] for c in components.values()) for k in ("total", "trainable", "frozen")}
    stage = zero_stage(ds_raw)
    off = offloads(ds_raw)
    mem = model_state_bytes(total["total"], total["trainable"], stage, world_size,
                            cfg.train.precision == "bf16", "offload_optimizer" in off,
                            "offload_param" in off)
    outside = {f"{name} [fp32, outside engines]": count(m) for name, m in task.outside_engines(modules).items()}
    mem["outside_engines_gib"] = sum(c["total"] for c in outside.values()) * 4 / GiB
    mem["gpu_gib"] += mem["outside_engines_gib"]
    components.update(outside)
    return {"components": components, "total": total,
            "memory": {"world_size": world_size, "zero_stage": stage, "offload": sorted(off),
                       "precision": cfg.train.precision, **mem}}


def format_report(rep: Dict[str, Any]) -> str:
    lines = [f"{'component':<44}{'total':>16}{'trainable':>16}{'frozen':>16}"]
    for name, c in list(rep["components"].items()) + [("TOTAL (engines)", rep["total"])]:
        lines.append(f"{name:<44}{c['total']:>16,}{c['trainable']:>16,}{c['frozen']:>16,}")
    m = rep["memory"]
    lines.append(
        f"model states per GPU (ZeRO-{m['zero_stage']}, {m['world_size']} GPUs, {m['precision']}"
        f"{', offload ' + '+'.join(m['offload']) if m['offload'] else ''}): {m['gpu_gib']:.2f} GiB "
        f"(params {m['gpu_params_gib']:.2f}, grads {m['gpu_grads_gib']:.2f}, optimizer "
        f"{m['gpu_optimizer_gib']:.2f}, fp32 networks outside the engines {m['outside_engines_gib']:.2f}); "
        f"CPU per rank {m['cpu_gib_per_rank']:.2f} GiB; activations not included")
    return "\n".join(lines)
