"""Checks the dry run's memory estimate against a real run: a recon stage at real dimensions
(1b flavor) trains a few steps on CPU at world size 1 through launch/train.py, and its peak
resident memory is printed next to the dry run's per-GPU total, term by term.

    .venv/bin/python benchmarks/dryrun_memory.py --config recon_stage1 --work /tmp/dryrun_mem
    .venv/bin/python benchmarks/dryrun_memory.py --config recon_stage2 --work /tmp/dryrun_mem  # ~16 GiB

Nothing is downloaded: the weights are random, written once under --work in the real layouts
(an InternVL `-hf` vision path in bf16, a diffusers AutoencoderDC at the flavor's dimensions;
the perceptual networks are the seeded random ones), and the data is data_prep shards of the
bundled sample photos. Each part runs in its own process: preparing the files, the dry run,
and the measured run, whose resident memory after its imports (before any model exists) is
the baseline and whose peak (VmHWM) is read when training returns.

On CPU, pages that are allocated but never written do not count as resident, so the
measured figure sees only the used part of DeepSpeed's gradient buckets (a GPU's caching
allocator holds all of it), and torch's AdamW is not fused on CPU (two fp32 temporaries of
the parameter group it updates, none on CUDA); the CPU-comparable estimate accounts for both.
Activations, which the dry run leaves out, are most of the rest (--micro-batch 1 and
activation checkpointing keep them small; compare two micro-batch sizes to see them grow).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GiB = 1024 ** 3


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def prepare(work: Path, flavor: str) -> None:
    """Real-layout random weights and a few shards, written once."""
    import torch

    from unilip_ds.engine.weights import full_state_dict, write_safetensors
    from unilip_ds.models import tiny_assets
    from unilip_ds.models.flavors import get_flavor
    from unilip_ds.models.unilip import HFVisionLayout, VisionPath
    internvl = work / f"internvl_{flavor}"
    if not (internvl / "model.safetensors").is_file():
        internvl.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        vision = HFVisionLayout(VisionPath(get_flavor(flavor)))
        write_safetensors(full_state_dict(vision, dtype=torch.bfloat16), internvl / "model.safetensors")
        del vision
    if not (work / f"dcae_{flavor}" / "config.json").is_file():
        tiny_assets.save_tiny_dcae(work / f"dcae_{flavor}", flavor=flavor)
    if not (work / "shards" / "manifest.json").is_file():
        from data_prep.sharding import PrepConfig, run
        from unilip_ds.data.sample_images import write_caption_folder
        write_caption_folder(work / "photos", count=8, size=256)
        run(PrepConfig(srcs=[str(work / "photos")], dst=str(work / "shards"), kind="t2i",
                       shard_samples=4, workers=1, progress=False))


def measured_child(out_json: str, argv: list) -> None:
    """launch/train.py in this process; the baseline is taken after its imports."""
    import deepspeed  # noqa: F401
    import diffusers  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import unilip_ds.tasks  # noqa: F401
    import unilip_ds.trainer  # noqa: F401
    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    sys.argv = [str(ROOT / "launch" / "train.py"), *argv]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        rc = 0
    except SystemExit as exc:
        rc = exc.code or 0
    Path(out_json).write_text(json.dumps({"rc": rc, "baseline": baseline, "peak": _status("VmHWM"),
                                          "end": _status("VmRSS")}))


def compare(rep: dict, got: dict) -> dict:
    """The dry run's estimate (`rep`, its JSON) next to the measured run (`got`), in GiB."""
    mem = rep["memory"]

    def terms(*words: str) -> float:
        return sum(t["gpu_gib"] for t in mem["terms"] if all(w in t["term"] for w in words))
    # the bucket pages a CPU run writes: the main engine's gradients pass through its buckets
    # (the discriminator's engine runs no backward before recon.gan_start_step)
    main_trainable = rep["total"]["trainable"] - rep["components"].get("discriminator", {}).get("trainable", 0)
    grad_bytes = 2 if mem["precision"] == "bf16" else 4
    touched = min(terms("model:", "reduce bucket"), main_trainable * grad_bytes / GiB)
    # torch's AdamW on CPU is not fused: its step holds two fp32 temporaries of the group it
    # updates (sqrt(v), then its quotient); on CUDA the fused kernel holds none
    step_copies = terms("model:", "flat gradient copies")
    adam_tmp = 2 * step_copies * 4 / (4 + (grad_bytes if grad_bytes != 4 else 0))
    measured = (got["peak"] - got["baseline"]) / GiB
    comparable = mem["gpu_gib"] - terms("reduce bucket") + touched + adam_tmp
    return {"dry_run_gpu_gib": round(mem["gpu_gib"], 3),
            "terms": {t["term"]: round(t["gpu_gib"], 3) for t in mem["terms"] if t["gpu_gib"] or t["cpu_gib"]},
            "bucket_gib_allocated": round(terms("reduce bucket"), 3), "bucket_gib_written_on_cpu": round(touched, 3),
            "cpu_only_adamw_temporaries_gib": round(adam_tmp, 3),
            "estimate_cpu_comparable_gib": round(comparable, 3),
            "baseline_rss_gib": round(got["baseline"] / GiB, 3), "peak_rss_gib": round(got["peak"] / GiB, 3),
            "measured_peak_minus_baseline_gib": round(measured, 3),
            "difference_gib (activations, transients)": round(measured - comparable, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="recon_stage1", help="a recon preset")
    ap.add_argument("--flavor", default="1b")
    ap.add_argument("--work", required=True, help="directory for the weights, shards and the run")
    ap.add_argument("--ds-config", default="ds_configs/zero2.json")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--no-grad-checkpointing", action="store_true")
    ap.add_argument("--json", action="store_true", help="one JSON object")
    ap.add_argument("--_prepare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    work = Path(args.work).resolve()
    if args._prepare:
        prepare(work, args.flavor)
        return 0
    if args._child:
        measured_child(args._child, rest)
        return 0

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    me = [sys.executable, str(Path(__file__).resolve())]
    subprocess.run(me + ["--_prepare", "--work", str(work), "--flavor", args.flavor], check=True, env=env)
    run_dir = work / f"run_{args.config}"
    n = 0
    while (run_dir.parent / f"{run_dir.name}_{n}").exists():  # never reuse (or resume) a run dir
        n += 1
    train_args = [
        "--config", args.config, "--ds_config", args.ds_config,
        f"model.flavor={args.flavor}", f"model.internvl_path={work / f'internvl_{args.flavor}'}",
        f"model.dcae_path={work / f'dcae_{args.flavor}'}", "model.perceptual_pretrained=false",
        f"model.grad_checkpointing={str(not args.no_grad_checkpointing).lower()}",
        f"data.train.urls=[{work / 'shards'}]", "data.num_workers=0", "data.resolution=224",
        f"train.max_steps={args.steps}", f"train.micro_batch_size={args.micro_batch}", "train.log_every=1",
        "optim.warmup_steps=1", "checkpoint.every_steps=1000000", "wandb.mode=disabled",
        f"run.output_dir={run_dir.parent / f'{run_dir.name}_{n}'}"]
    dry = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *train_args, "--dry-run",
                          "--json"], capture_output=True, text=True, env=env, cwd=ROOT)
    if dry.returncode != 0:
        print(dry.stderr[-3000:], file=sys.stderr)
        return 1
    (work / f"dry_run_{args.config}_{n}.json").write_text(dry.stdout.strip().splitlines()[-1])
    out_json = work / f"measured_{args.config}_{n}.json"
    proc = subprocess.run(me + ["--_child", str(out_json), "--work", str(work), *train_args], env=env, cwd=ROOT)
    if proc.returncode != 0 or not out_json.is_file() or json.loads(out_json.read_text())["rc"] != 0:
        print(f"error: the measured run failed (exit {proc.returncode}); see above", file=sys.stderr)
        return 1
    report = {"config": args.config, "flavor": args.flavor, "ds_config": args.ds_config, "steps": args.steps,
              "micro_batch": args.micro_batch, "grad_checkpointing": not args.no_grad_checkpointing,
              **compare(json.loads(dry.stdout.strip().splitlines()[-1]), json.loads(out_json.read_text()))}
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            if k == "terms":
                for name, g in v.items():
                    print(f"  {name:<78}{g:>8.3f} GiB")
            else:
                print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
