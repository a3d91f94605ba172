"""The main job on embedded defaults, on CPU, in a few minutes:

  1. a small data set from scikit-image's bundled photos (captions written by hand),
     sharded by data_prep/shard_blip3o.py into a local S3 server (SeaweedFS);
  2. recon_stage1 -> recon_stage2 on the tiny flavor, 2 processes, read from S3,
     each stage exported and the next started from the export (EMA weights);
  3. reconstructions of held-out photos next to the originals.

    python launch/demo.py [--out demo_out] [--nproc 2] [--stage1-steps 240] [--stage2-steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HELD_OUT = ("chelsea", "coffee", "astronaut")  # photos never seen in training


def sh(cmd, env, log: Path) -> None:
    t0 = time.time()
    print(f"$ {' '.join(str(c) for c in cmd)}", flush=True)
    with open(log, "a") as f:
        proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, stdout=f,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        print(f"demo: step failed (rc {proc.returncode}); last lines of {log}:", file=sys.stderr)
        print("\n".join(log.read_text().splitlines()[-30:]), file=sys.stderr)
        sys.exit(proc.returncode)
    print(f"  done in {time.time() - t0:.0f}s", flush=True)


def write_images(dst: Path, count: int) -> None:
    from unilip_ds.data.sample_images import jpeg_bytes, samples
    (dst / "train").mkdir(parents=True)
    (dst / "heldout").mkdir(parents=True)
    for s in samples(count, seed=0):
        part = "heldout" if s.key.split("_")[0] in HELD_OUT else "train"
        if part == "heldout" and (dst / part / f"{s.key.split('_')[0]}.jpg").exists():
            continue  # variants of held-out photos are left out altogether
        name = s.key.split("_")[0] if part == "heldout" else s.key
        (dst / part / f"{name}.jpg").write_bytes(jpeg_bytes(s.image))
        (dst / part / f"{name}.txt").write_text(s.caption + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--images", type=int, default=200, help="training samples (photos + variants)")
    ap.add_argument("--stage1-steps", type=int, default=240)
    ap.add_argument("--stage2-steps", type=int, default=60)
    args = ap.parse_args()

    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        print(f"error: --out {out} exists and is not empty; choose a new directory", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    from unilip_ds.data.seaweed import SeaweedS3

    write_images(out / "images", args.images)
    bin_dir = Path(sys.executable).parent
    (out / "s3").mkdir()
    with SeaweedS3(root=str(out / "s3")) as s3:
        s3.create_bucket("demo")
        env = {**os.environ, **s3.env(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
        print(f"S3 server (SeaweedFS) at {s3.endpoint}, bucket s3://demo", flush=True)
        for part in ("train", "heldout"):
            sh([sys.executable, "data_prep/shard_blip3o.py", "--src", out / "images" / part,
                "--dst", f"s3://demo/shards/{part}/", "--shard-size", "32", "--no-progress"], env, log)

        common = ["model.flavor=tiny", "model.perceptual_pretrained=false", "data.num_workers=1",
                  "data.shuffle_buffer=64", "data.train.urls=[s3://demo/shards/train/]",
                  "data.eval.urls=[s3://demo/shards/heldout/]", "train.micro_batch_size=4",
                  "train.precision=fp32", "train.log_every=20", "optim.lr=3e-4",
                  "optim.warmup_steps=20", "checkpoint.every_steps=100", "wandb.mode=offline"]
        runs = {}
        init = []
        for stage, steps, extra in (
                ("recon_stage1", args.stage1_steps, []),
                ("recon_stage2", args.stage2_steps, [f"recon.gan_start_step={args.stage2_steps // 2}"])):
            run_dir = out / "runs" / stage
            sh([bin_dir / "torchrun", "--nproc_per_node", args.nproc, "launch/train.py",
                "--config", stage, "--ds_config", "ds_configs/zero2.json", *common, *extra, *init,
                f"run.output_dir={run_dir}", f"train.max_steps={steps}",
                f"train.eval_every={max(1, steps // 4)}"], env, log)
            export_dir = out / "exports" / stage
            sh([sys.executable, "launch/export.py", "--run", run_dir, "--out", export_dir], env, log)
            runs[stage] = (run_dir, export_dir)
            init = [f"model.init_from={export_dir}"]

        recon_dir = out / "reconstructions"
        sh([sys.executable, "-m", "unilip_ds.inference.reconstruct", "--ckpt", runs["recon_stage2"][1],
            "--images", out / "images" / "heldout", "--out", recon_dir], env, log)

    print("\n== demo finished ==")
    for stage, (run_dir, export_dir) in runs.items():
        evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evals = [e for e in evals if "eval/psnr" in e]
        if evals:
            print(f"{stage}: held-out PSNR {evals[0]['eval/psnr']:.2f} dB at step {evals[0]['step']}"
                  f" -> {evals[-1]['eval/psnr']:.2f} dB at step {evals[-1]['step']}")
        print(f"  checkpoints: {run_dir / 'checkpoints'}")
        print(f"  export:      {export_dir}")
        wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
        if wandb_runs:
            print(f"  W&B (offline; `wandb sync {wandb_runs[-1]}`): {wandb_runs[-1]}")
    grids = sorted(recon_dir.glob("*grid*.png"))
    print(f"side-by-side originals | reconstructions: {grids[0] if grids else recon_dir}")
    print(f"full log: {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
