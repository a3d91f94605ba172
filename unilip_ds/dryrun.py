"""Dry run: build the model on the meta device (no weights, no data, no process group)
and report parameter counts per component and the memory per GPU, term by term: every
term that follows from the config and the DeepSpeed JSON (activations excluded).

The terms follow DeepSpeed 0.19's ZeRO optimizers (stage_1_and_2.py, stage3.py) with bf16:
bf16 weights and gradients (gradient accumulation in the model dtype unless
`data_types.grad_accum_dtype` says otherwise), an fp32 master copy (ZeRO-1/2 keep one in fp32
too) and Adam's two fp32 moments per trainable weight, and at the optimizer step flat copies
(model dtype, then fp32) of the gradients of one parameter group (ZeRO-1/2) or sub-group
(ZeRO-3) at a time. Each engine (one per
trainable module) holds its own buffers: gradient buckets of `reduce_bucket_size` elements,
two of them with `overlap_comm` below ZeRO-3; under ZeRO-3 a prefetch bucket and the
un-partitioned small parameters. The EMA (trainer) keeps an fp32 copy of the main engine's
trainable weights, per partition under ZeRO-3; the frozen loss networks are fp32 outside
every engine.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch import nn

from unilip_ds.config import Config
from unilip_ds.engine.ds_config import offloads, zero_stage
from unilip_ds.tasks.base import MAIN, build_task

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


def zero_settings(ds: Dict[str, Any]) -> Dict[str, Any]:
    """The ZeRO settings that size buffers, with DeepSpeed's defaults where the JSON is silent."""
    z = ds.get("zero_optimization", {})
    stage = zero_stage(ds)
    accum = str((ds.get("data_types") or {}).get("grad_accum_dtype") or "").lower()
    return {"stage": stage,
            "overlap_comm": bool(z.get("overlap_comm", stage == 3)),
            "contiguous_gradients": bool(z.get("contiguous_gradients", True)),
            "reduce_bucket_size": int(float(z.get("reduce_bucket_size", 5e8))),
            "prefetch_bucket_size": int(float(z.get("stage3_prefetch_bucket_size", 5e7))),
            "persistence_threshold": int(float(z.get("stage3_param_persistence_threshold", 1e5))),
            "sub_group_size": int(float(z.get("sub_group_size", 1e9))),
            "fp32_grad_accum": accum in ("fp32", "float32", "torch.float32")}


def _engine_terms(name: str, module: nn.Module, groups: List[int], z: Dict[str, Any], world: int,
                  bf16: bool, off: Dict[str, str], ema: bool) -> List[Dict[str, Any]]:
    """[{term, gpu, cpu}] in bytes for one engine. `groups`: trainable numel per param group."""
    stage, w = z["stage"], world
    c = count(module)
    total, trainable = c["total"], c["trainable"]
    pb = 2 if bf16 else 4  # weight / gradient bytes
    gb = 4 if z["fp32_grad_accum"] else pb

    def part(n: float, from_stage: int) -> float:
        return n / w if stage >= from_stage else n
    off_opt, off_param = "offload_optimizer" in off, "offload_param" in off
    terms = [
        (f"{name}: weights ({'bf16' if bf16 else 'fp32'}{', /world' if stage == 3 else ''})",
         part(total * pb, 3), off_param),
        (f"{name}: gradients ({'fp32' if gb == 4 else 'bf16'}{', /world' if stage >= 2 else ''})",
         part(trainable * gb, 2), off_opt),
    ]
    if bf16 or stage in (1, 2):  # ZeRO-1/2 clone the partition even in fp32
        terms.append((f"{name}: fp32 master weights (/world)", part(trainable * 4, 1), off_opt))
    terms.append((f"{name}: Adam moments m, v (fp32, /world)", part(trainable * 8, 1), off_opt))
    if groups:
        # the optimizer step flattens one group's (ZeRO-3: sub-group's) gradient partition
        # (a new tensor in the gradient dtype) and casts that to fp32 (another, unless fp32)
        step = max(groups) / w if stage >= 1 else max(groups)
        if stage == 3:
            step = min(step, z["sub_group_size"])
        terms.append((f"{name}: optimizer step's flat gradient copies (largest group, "
                      f"{'fp32' if gb == 4 else 'bf16 + fp32'})", step * (4 if gb == 4 else gb + 4), off_opt))
    if ema:
        terms.append((f"{name}: EMA (fp32 copy of trainable weights{', /world' if stage == 3 else ''})",
                      part(trainable * 4, 3), off_param))
    if stage >= 1 and z["contiguous_gradients"]:
        n = 2 if (z["overlap_comm"] and stage < 3) else 1
        terms.append((f"{name}: gradient reduce bucket{'s' if n > 1 else ''} ({n} x reduce_bucket_size "
                      f"{z['reduce_bucket_size']:.3g})", n * z["reduce_bucket_size"] * gb, False))
    if stage == 3:
        terms.append((f"{name}: ZeRO-3 prefetch bucket (stage3_prefetch_bucket_size "
                      f"{z['prefetch_bucket_size']:.3g})", min(z["prefetch_bucket_size"], total) * pb, False))
        small = sum(p.numel() for p in module.parameters() if p.numel() < z["persistence_threshold"])
        terms.append((f"{name}: ZeRO-3 persistent small weights (< {z['persistence_threshold']:.3g} each)",
                      small * pb * (1 - 1 / w), False))
    return [{"term": t, "gpu": 0.0 if cpu else b, "cpu": b if cpu else 0.0} for t, b, cpu in terms]


def memory_terms(cfg: Config, task, modules, ds_raw: Dict[str, Any], world: int) -> List[Dict[str, Any]]:
    """Every per-GPU memory term known from the config, in bytes ({term, gpu, cpu})."""
    z, off, bf16 = zero_settings(ds_raw), offloads(ds_raw), cfg.train.precision == "bf16"
    terms: List[Dict[str, Any]] = []
    for name, module in modules.items():
        groups = [sum(p.numel() for p in g.params) for g in task.param_groups(name, module) if g.params]
        terms += _engine_terms(name, module, groups, z, world, bf16, off, cfg.ema.enabled and name == MAIN)
    for name, m in task.outside_engines(modules).items():
        terms.append({"term": f"{name} (fp32, outside the engines)", "gpu": count(m)["total"] * 4.0, "cpu": 0.0})
    return terms


def dry_run(cfg: Config, ds_raw: Dict[str, Any], world_size: int) -> Dict[str, Any]:
    task = build_task(cfg)
    with torch.device("meta"):
        modules = task.build_modules()
    components = {name: count(m) for name, m in task.components(modules).items()}
    total = {k: sum(c[k] for c in components.values()) for k in ("total", "trainable", "frozen")}
    outside = task.outside_engines(modules)
    components.update({f"{name} [fp32, outside engines]": count(m) for name, m in outside.items()})
    terms = memory_terms(cfg, task, modules, ds_raw, world_size)

    def gib(*words: str, where: str = "gpu") -> float:
        return sum(t[where] for t in terms if all(w in t["term"] for w in words)) / GiB
    mem = {"world_size": world_size, "zero_stage": zero_stage(ds_raw), "offload": sorted(offloads(ds_raw)),
           "precision": cfg.train.precision,
           "terms": [{"term": t["term"], "gpu_gib": t["gpu"] / GiB, "cpu_gib": t["cpu"] / GiB} for t in terms],
           "gpu_gib": gib(), "cpu_gib_per_rank": gib(where="cpu"),
           "gpu_params_gib": gib(": weights ("), "gpu_grads_gib": gib(": gradients ("),
           "gpu_optimizer_gib": gib("master") + gib("Adam"), "ema_gib": gib("EMA"),
           "buckets_gib": gib("bucket"), "outside_engines_gib": gib("outside the engines")}
    return {"components": components, "total": total, "memory": mem}


def format_report(rep: Dict[str, Any]) -> str:
    lines = [f"{'component':<44}{'total':>16}{'trainable':>16}{'frozen':>16}"]
    for name, c in list(rep["components"].items()) + [("TOTAL (engines)", rep["total"])]:
        lines.append(f"{name:<44}{c['total']:>16,}{c['trainable']:>16,}{c['frozen']:>16,}")
    m = rep["memory"]
    head = (f"memory per GPU (ZeRO-{m['zero_stage']}, {m['world_size']} GPUs, {m['precision']}"
            f"{', offload ' + '+'.join(m['offload']) if m['offload'] else ''})")
    lines += ["", f"{head:<80}{'GPU GiB':>10}{'CPU GiB':>10}"]
    for t in m["terms"]:
        lines.append(f"  {t['term']:<78}{t['gpu_gib']:>10.2f}{t['cpu_gib']:>10.2f}")
    lines.append(f"  {'TOTAL (activations and the CUDA context not included)':<78}"
                 f"{m['gpu_gib']:>10.2f}{m['cpu_gib_per_rank']:>10.2f}")
    return "\n".join(lines)
