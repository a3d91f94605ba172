"""A 2-process NCCL run: tiny recon_stage1 trained by launch/train.py under torchrun, DeepSpeed
ZeRO-2, one GPU per process (the trainer's process group is NCCL whenever CUDA is there), on
a few shards of the bundled sample photos. One JSON line: the steps done, the loss, samples/s,
MFU and peak memory from metrics.jsonl, the run summary (run_summary.jsonl) and the exact
torchrun command. `--nproc 1`: the same trainer run as one process (the CUDA path of the
trainer, DeepSpeed and the hardware meter on a one-GPU machine).

    .venv/bin/python benchmarks/nccl_check.py --work /tmp/nccl_check
    .venv/bin/python benchmarks/nccl_check.py --work /tmp/train_1gpu --nproc 1

Needs `--nproc` CUDA devices (prints a `skipped` line and exits 0 with fewer).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="folder for the shards and the run (a new run folder each time)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--timeout", type=int, default=300, help="seconds for the torchrun command")
    ap.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)  # the same run over gloo (checks only)
    args = ap.parse_args()
    import torch
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found < args.nproc and not args.cpu:
        print(json.dumps({"skipped": True, "reason": f"needs {args.nproc} CUDA devices, found {found}"}))
        return 0
    from unilip_ds.data.sample_images import write_caption_tars
    from unilip_ds.engine.dist import free_port
    work = Path(args.work).resolve()
    shards = work / "shards"
    if not any(shards.glob("*.tar")):
        write_caption_tars(shards, count=24, per_tar=6, size=256)
    n = 0
    while (work / f"run_{n}").exists():
        n += 1
    out = work / f"run_{n}"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--nproc_per_node", str(args.nproc), "--master_port", str(free_port()), "launch/train.py",
           "--config", "recon_stage1", "--ds_config", "ds_configs/zero2.json", "model.flavor=tiny",
           "model.perceptual_pretrained=false", f"run.output_dir={out}", f"data.train.urls=[{shards}]",
           "data.num_workers=1", "data.shuffle_buffer=8", "data.resolution=224", f"train.max_steps={args.steps}",
           "train.micro_batch_size=2", "train.log_every=1", "optim.warmup_steps=2",
           "checkpoint.every_steps=1000000", "wandb.mode=disabled"]
    env = dict(os.environ, DS_ACCELERATOR="cpu" if args.cpu else "cuda", OMP_NUM_THREADS="1")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.time() - t0
    shown = " ".join(shlex.quote(c) for c in [".venv/bin/torchrun"] + cmd[1:])
    metrics = out / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    rows = [r for r in rows if "loss/total" in r]
    last = rows[-1] if rows else {}
    loss = last.get("loss/total")
    result = {"world_size": args.nproc, "backend": "gloo" if args.cpu else "nccl", "rc": proc.returncode, "steps": len(rows),
              "final_loss": loss, "loss_finite": loss is not None and math.isfinite(loss),
              "samples_per_s": last.get("samples_per_s"), "step_time_s": last.get("step_time_s"),
              "mfu": last.get("mfu"), "tflops_per_device": last.get("tflops_per_device"),
              "peak_reserved_gb": last.get("mem/peak_reserved_gb"), "wall_s": round(wall, 1), "command": shown}
    summary = (out / "run_summary.jsonl").read_text().splitlines() if (out / "run_summary.jsonl").is_file() else []
    if summary:
        result["run_summary"] = json.loads(summary[-1])
    print(json.dumps(result), flush=True)
    if proc.returncode != 0 or len(rows) != args.steps or not result["loss_finite"]:
        sys.stderr.write(proc.stdout[-3000:] + "\n" + proc.stderr[-6000:])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
