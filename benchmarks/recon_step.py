"""Training-step speed of a recon stage (default recon_stage2_448: encoder + decoder train,
self-distillation, GAN from step 0, activation checkpointing) on one device, per batch size:
step time, samples/s, peak memory, FLOPs per step and MFU. One JSON object per line, each with
the command that reproduces that figure alone.

    .venv/bin/python benchmarks/recon_step.py --config recon_stage2_448 --flavor 1b --batch 8,16,32 --stop-at-oom
    .venv/bin/python benchmarks/recon_step.py --flavor tiny --device cpu --dtype fp32 --resolution 224 --batch 2 --steps 1

The step is the training code's: ReconTask.loss for each phase of step 0 ("model": MSE +
LPIPS + ConvNeXt logits + self-distillation + the GAN generator term; "disc": the
discriminator's hinge + LeCam on the cached reconstruction), backward, then torch AdamW (fused
on CUDA) per module, in the model dtype; the frozen loss networks (teacher, VGG, ConvNeXt)
in fp32 as in training. Random weights everywhere (the frozen nets are the seeded random
stand-ins: model.perceptual_pretrained=false, no teacher file), random pixels; no DeepSpeed (one
device): a DeepSpeed bf16 run adds fp32 master weights and moments, 12 bytes per trainable
parameter (`trainable_params`), to the peak memory measured here.

FLOPs are the project's count (unilip_ds.flops.recon_stage_flops: FlopCounterMode on the meta
device over the stage's modules, what a training run logs its MFU with, the discriminator's
step included when the stage has a GAN), times the batch; MFU against
unilip_ds.tracking.PEAK_TFLOPS by the device's name, or `--peak-tflops` (CPU: only then).
`--stop-at-oom`: after an out-of-memory step the larger batch sizes are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_util  # noqa: E402


def one_command(args, batch: int) -> str:
    a = ["--config", args.config, "--flavor", args.flavor, "--device", args.device, "--dtype", args.dtype,
         "--batch", str(batch), "--steps", str(args.steps)]
    if args.resolution:
        a += ["--resolution", str(args.resolution)]
    if args.grad_ckpt:
        a += ["--grad-ckpt", args.grad_ckpt]
    if args.peak_tflops:
        a += ["--peak-tflops", f"{args.peak_tflops:g}"]
    return bench_util.command("benchmarks/recon_step.py", a)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="recon_stage2_448", help="a recon preset")
    ap.add_argument("--flavor", default="1b")
    ap.add_argument("--batch", default="8", help="per-device batch; comma-separated sizes are run in order")
    ap.add_argument("--resolution", type=int, default=0, help="0: the preset's")
    ap.add_argument("--grad-ckpt", default=None, choices=("on", "off"), help="default: the preset's")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--stop-at-oom", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="0: tracking.PEAK_TFLOPS by the device name")
    args = ap.parse_args()

    import torch

    from unilip_ds.config import load_config
    from unilip_ds.flops import recon_stage_flops
    from unilip_ds.tasks.base import MAIN, build_task
    over = [f"model.flavor={args.flavor}", "model.perceptual_pretrained=false", "data.train.sources=[]",
            "data.train.urls=[/none]", f"train.precision={args.dtype}"]
    if args.resolution:
        over.append(f"data.resolution={args.resolution}")
    if args.grad_ckpt:
        over.append(f"model.grad_checkpointing={str(args.grad_ckpt == 'on').lower()}")
    cfg = load_config(args.config, over)
    if cfg.run.task != "recon":
        raise SystemExit(f"error: --config {args.config} is not a recon stage")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    per_sample = recon_stage_flops(cfg).per_sample["recon"]  # meta device
    peak, peak_src = bench_util.peak(device, args.dtype, args.peak_tflops)

    task = build_task(cfg)
    task._load_frozen = lambda nets: None  # the seeded random frozen nets: no weight files
    torch.manual_seed(0)
    with torch.device(device):
        modules = task.build_modules()
        for mod in modules.values():
            mod.to(dtype)
        modules[MAIN].frozen(device)  # the fp32 loss networks, built on the device
    task.set_train_mode(modules)
    opts = {name: torch.optim.AdamW([p for p in mod.parameters() if p.requires_grad], lr=1e-5,
                                    weight_decay=0.0, fused=True if cuda else None)
            for name, mod in modules.items()}
    trainable = sum(p.numel() for mod in modules.values() for p in mod.parameters() if p.requires_grad)
    res = cfg.data.resolution
    phases = task.phases(0)
    vision = modules[MAIN].unilip.vision.vision_tower.config
    attn = getattr(vision, "_attn_implementation", None) or "default"  # the ViT's (model.attn_impl is gen's)

    def step(images):
        for phase in phases:
            loss, _ = task.loss(phase, {"image": images, "__key__": ["x"] * len(images)}, 0, modules)
            loss.backward()
            opts[phase].step()
            opts[phase].zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for batch in bench_util.int_list(args.batch):
        base = {"config": args.config, "flavor": args.flavor, "resolution": res, "batch": batch, "attn": attn,
                "dtype": args.dtype,
                "device": args.device, "grad_checkpointing": bool(cfg.model.grad_checkpointing), "phases": phases,
                "command": one_command(args, batch)}
        images = torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(batch)).to(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, oom = [], None
        try:
            for i in range(args.warmup + args.steps):
                sync()
                t0 = time.perf_counter()
                step(images)
                sync()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
        except RuntimeError as exc:
            if not (cuda and bench_util.is_oom(exc)):
                raise
            oom = str(exc).splitlines()[0][:200]
        if oom is not None:
            task._cache = None
            bench_util.free_memory(*opts.values())
            print(json.dumps({**base, "oom": True, "error": oom}), flush=True)
            if args.stop_at_oom:
                break
            continue
        row = bench_util.step_row(base, times, per_sample, batch, peak, peak_src, trainable)
        if cuda:
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
            row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2 ** 30, 2)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
