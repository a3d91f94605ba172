"""The main job on embedded defaults, on CPU, in about ten minutes:

  1. a small data set from scikit-image's bundled photos (captions written by hand) and a
     deterministic edit set (each photo's colours inverted or turned black and white, the
     instruction saying which), sharded by
     data_prep/shard_blip3o.py and shard_edit.py into a local S3 server (SeaweedFS);
  2. recon_stage1 -> recon_stage2 on the tiny flavor, 2 processes, read from S3,
     each stage exported and the next started from the export (EMA weights); each
     evaluation scores (PSNR) and writes originals over reconstructions of a view of
     training photos and of the held-out photos, and the PSNR of both before and after
     each stage is printed;
  3. reconstructions of held-out photos next to the originals;
  4. gen_stage1 -> gen_stage2 (T2I + edit) on the tiny flavors, the MLLM's vision path being
     the recon_stage2 export, each stage exported as a UniLIPPipeline directory; gen_stage2
     runs twice, first with identity edits ("keep the image as it is": the DiT learns to take
     each place of its output from the same place of the reference), then with the colour
     edits from that export; each reads caches of the frozen outputs
     (data_prep/cache_features.py);
  5. images generated from the held-out captions, and the held-out photos edited, written
     next to their inputs as one PNG grid; the edit is scored against copying the input.

Training runs stream their progress (step/max, loss, ETA, eval metrics) to the console; the
full output goes to <out>/demo.log. Each run's plots (python -m unilip_ds.plot) are written
to <out>/runs/<stage>/plots/.

    python launch/demo.py [--out demo_out] [--nproc 2] [--stage1-steps 400] [--stage2-steps 100]
                          [--gen1-steps 40] [--gen2-identity-steps 1500] [--gen2-steps 1500]
                          [--gen2-lr 1e-3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HELD_OUT = ("chelsea", "coffee", "astronaut")  # photos never seen in training
TRAIN_VIEW = 8  # training photos also evaluated: what the model learnt beside how it generalises


# the trainer's rank-0 console lines (unilip_ds/tracking.py): "[eval ]step N/max elapsed [ETA t] k=v ..."
PROGRESS = re.compile(r"\[rank0\] (eval )?step (\d+)/(\d+) (\S+)(?: ETA (\S+))? (.*)$")
SHOWN = re.compile(r"^(loss/total|loss/flow|eval/(?:\w+/)?psnr|eval/flow)$")  # what the console shows


def progress(line: str, label: str, shown: set) -> None:
    """Echo a training run's progress: about every tenth of the run, and every evaluation."""
    m = PROGRESS.search(line)
    if not m:
        return
    is_eval, step, total, elapsed, eta, rest = m.groups()
    step, total = int(step), int(total)
    tenth = step * 10 // total
    if not is_eval and (tenth in shown and step < total):
        return
    shown.add(tenth)
    values = dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)
    text = " ".join(f"{k}={v}" for k, v in values.items() if SHOWN.match(k))
    when = f"ETA {eta}" if eta else f"{elapsed} elapsed"
    print(f"  {label} {'eval at ' if is_eval else ''}step {step}/{total} {text}"
          f"{'' if is_eval else '  ' + when}", flush=True)


def sh(cmd, env, log: Path, label: str = "") -> None:
    """Run a step, its output appended to the log; a training run's progress also echoed."""
    t0 = time.time()
    print(f"$ {' '.join(str(c) for c in cmd)}", flush=True)
    shown: set = set()
    with open(log, "a") as f:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        for line in proc.stdout:
            f.write(line)
            if line.startswith("note: DeepSpeed builds"):  # the first run's op build (launch/train.py)
                print(f"  {line.strip()}", flush=True)
            if label:
                progress(line, label, shown)
        proc.wait()
    if proc.returncode != 0:
        print(f"demo: step failed (rc {proc.returncode}); last lines of {log}:", file=sys.stderr)
        print("\n".join(log.read_text().splitlines()[-30:]), file=sys.stderr)
        sys.exit(proc.returncode)
    print(f"  done in {time.time() - t0:.0f}s", flush=True)


def write_images(dst: Path, count: int) -> None:
    from unilip_ds.data.sample_images import PHOTOS, jpeg_bytes, samples
    for part in ("train", "heldout", "train_view"):
        (dst / part).mkdir(parents=True)
    photos = len(PHOTOS)
    for i, s in enumerate(samples(count, seed=0)):
        part = "heldout" if s.key.split("_")[0] in HELD_OUT else "train"
        if part == "heldout" and (dst / part / f"{s.key.split('_')[0]}.jpg").exists():
            continue  # variants of held-out photos are left out altogether
        name = s.key.split("_")[0] if part == "heldout" else s.key
        views = [part] + (["train_view"] if part == "train" and i < photos and
                          len(list((dst / "train_view").glob("*.jpg"))) < TRAIN_VIEW else [])
        for view in views:  # the train view: the first training photos (not their variants)
            (dst / view / f"{name}.jpg").write_bytes(jpeg_bytes(s.image))
            (dst / view / f"{name}.txt").write_text(s.caption + "\n")


# per task, the cache level: latents for T2I, the prompt prefix too for edit (each gen_stage2
# run's caches under s3://demo/cache/<run>/<task>/)
CACHE = {"t2i": "latents", "edit": "prefix"}
IDENTITY_RUN = "gen_stage2_identity"
GEN_COMMON = ["train.micro_batch_size=4", "train.precision=fp32", "train.log_every=20",
              "optim.weight_decay=0.0", "checkpoint.every_steps=200", "wandb.mode=offline",
              "data.num_workers=1", "data.shuffle_buffer=64", "gen.sample_steps=10"]


def write_edit_images(dst: Path, count: int) -> None:
    """Colour edits (COLOUR_EDITS) of the training photos (and their variants) and of the
    held-out photos, and identity edits of the training photos (the first gen_stage2 run).
    Not flips: a tiny generator trained for CPU minutes learns an edit that keeps the
    layout, not one that moves it (benchmarks/edit_learns.py, README)."""
    from unilip_ds.data.sample_images import COLOUR_EDITS, IDENTITY_EDIT, write_edit_pairs_folder
    train = lambda s: s.key.split("_")[0] not in HELD_OUT  # noqa: E731
    write_edit_pairs_folder(dst / "train", count=count, edits=COLOUR_EDITS, keep=train)
    write_edit_pairs_folder(dst / "identity", count=count, edits=(IDENTITY_EDIT,), keep=train)
    write_edit_pairs_folder(dst / "heldout", edits=COLOUR_EDITS,  # the originals
                           keep=lambda s: s.key.split("_")[0] in HELD_OUT)


def cache_url(run: str, task: str) -> str:
    return f"s3://demo/cache/{run}/{task}/"


def evals(run_dir: Path, key: str) -> list:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if key in r]


def recon_summary(stage: str, run_dir: Path) -> str:
    """PSNR of the training view and the held-out photos at the first and last evaluation."""
    rows = evals(run_dir, "eval/psnr")
    first, last = rows[0], rows[-1]
    views = [f"{name} {first[f'eval/{key}/psnr']:.2f} -> {last[f'eval/{key}/psnr']:.2f} dB"
             for key, name in (("train_view", "training view"), ("heldout", "held-out"))]
    return f"{stage}: PSNR (step {first['step']} -> {last['step']}) " + ", ".join(views)


def plot(run_dir: Path) -> Path:
    """The run's loss / eval plots (python -m unilip_ds.plot); returns the overview."""
    from unilip_ds.plot import plot_run
    return [p for p in plot_run(run_dir) if p.name == "overview.png"][0]


def psnr(a, b) -> float:
    import numpy as np
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-10))


def latent_scale(recon_export: Path, folder: Path, resolution: int = 224) -> float:
    """1 / std of the UniLIP latents of the images under `folder` (3 significant digits): the
    factor that gives the generator unit-variance targets, as the reference's 10.6 does for
    its 1b UniLIP. A tiny UniLIP's latents are smaller (std ~0.008 random, ~0.06 after the
    recon stages here: x10.6 leaves 0.08 / 0.6 against the flow's unit noise; at 0.08 the DiT
    learns the noise, not the image: benchmarks/edit_learns.py)."""
    import torch
    from unilip_ds.inference.reconstruct import iter_images, load_autoencoder, to_tensor
    model, _ = load_autoencoder(recon_export)
    images = torch.stack([to_tensor(im, resolution) for _, im in iter_images([str(folder)])][:64])
    with torch.no_grad():
        std = float(model.encode(images).std())
    return float(f"{1.0 / std:.3g}")


def generator_demo(out: Path, args, env, log: Path, bin_dir: Path, recon_common, recon_export: Path,
                   internvl: Path) -> dict:
    """gen_stage1 -> gen_stage2 on the tiny flavors, then generate and edit held-out data."""
    from PIL import Image

    from unilip_ds.data.sample_images import PHOTOS
    from unilip_ds.inference.sampling import EDIT_COLUMNS, grid
    from unilip_ds.models import tiny_assets as T
    print("generator: tiny SANA / DC-AE directories", flush=True)
    assets = out / "assets"
    T.save_tiny_sana(assets / "sana")
    T.save_tiny_dcae(assets / "dcae")
    write_edit_images(out / "images" / "edit", args.images)
    scale = latent_scale(recon_export, out / "images" / "edit" / "train" / "images")
    print(f"  gen_stage2 latent scale (1 / std of the recon export's latents): {scale:g}", flush=True)
    for part in ("train", "heldout", "identity"):
        sh([sys.executable, "data_prep/shard_edit.py", "--src", out / "images" / "edit" / part,
            "--dst", f"s3://demo/shards/edit_{part}/", "--shard-size", "32", "--no-progress"], env, log)
    t2i = {"train": "s3://demo/shards/train/", "heldout": "s3://demo/shards/heldout/"}
    edit = {p: f"s3://demo/shards/edit_{p}/" for p in ("train", "heldout", "identity")}

    def gen2(run: str, steps: int, edits: str, t2i_weight: float) -> list:
        sources = [f"{{name: edit, task: edit, weight: {1 - t2i_weight:g}, urls: [{edit[edits]}], "
                   f"cache: {cache_url(run, 'edit')}}}"]
        if t2i_weight:
            sources.append(f"{{name: t2i, task: t2i, weight: {t2i_weight:g}, urls: [{t2i['train']}], "
                           f"cache: {cache_url(run, 't2i')}}}")
        # a constant LR (min_lr = lr): the routing switches on after ~1000 steps at the full LR
        # (benchmarks/edit_learns.py), which a cosine decay over the run's 1500 steps delays
        return ["model.flavor=tiny", "data.resolution=224", "optim.warmup_steps=20", f"gen.latent_scale={scale}",
                f"optim.lr={args.gen2_lr}", f"optim.min_lr={args.gen2_lr}", "data.train.mix=weight",
                f"data.train.sources=[{', '.join(sources)}]",
                "data.eval.sources=[{name: t2i, task: t2i, urls: [%s]}, {name: edit, task: edit, urls: [%s]}]"
                % (t2i["heldout"], edit["heldout"]), f"train.sample_every={steps}"]
    gen1 = ["model.flavor=tiny", f"model.internvl_path={internvl}", f"model.unilip_path={recon_export}",
            f"model.sana_path={assets / 'sana'}", f"model.dcae_path={assets / 'dcae'}", "data.resolution=256",
            f"data.train.urls=[{t2i['train']}]", f"data.eval.urls=[{t2i['heldout']}]", "optim.warmup_steps=10",
            "optim.lr=3e-4"]
    # (run, steps, its edit set (gen_stage2 runs), T2I's share): the identity run trains edits
    # alone; the colour edits share their run with T2I
    stages = (("gen_stage1", args.gen1_steps, None, 1.0), (IDENTITY_RUN, args.gen2_identity_steps, "identity", 0.0),
              ("gen_stage2", args.gen2_steps, "train", 0.4))
    init: list = []
    for run, steps, edits, t2i_weight in stages:
        run_dir, export_dir = out / "runs" / run, out / "exports" / run
        if not steps:
            continue
        if edits:  # the frozen parts' outputs, computed once (caches)
            for task, src in [("edit", edit[edits])] + ([("t2i", t2i["train"])] if t2i_weight else []):
                sh([sys.executable, "data_prep/cache_features.py", "--config", "gen_stage2", "--task", task,
                    "--src", src, "--dst", cache_url(run, task), "--what", CACHE[task], "--dtype", "fp32",
                    "--no-progress", "model.flavor=tiny", "data.resolution=224", f"gen.latent_scale={scale}",
                    *init], env, log)
        extra = gen2(run, steps, edits, t2i_weight) if edits else gen1
        sh([bin_dir / "torchrun", "--nproc_per_node", args.nproc, "launch/train.py", "--config",
            "gen_stage2" if edits else "gen_stage1",
            "--ds_config", "ds_configs/zero2.json", *GEN_COMMON, *extra, *init, f"run.output_dir={run_dir}",
            f"train.max_steps={steps}", f"train.eval_every={max(1, steps // 4)}"], env, log, label=run)
        print(f"  plots: {plot(run_dir)}", flush=True)
        sh([sys.executable, "launch/export.py", "--run", run_dir, "--out", export_dir], env, log)
        init = [f"model.init_from={export_dir}"]

    export = out / "exports" / "gen_stage2"
    held = [(name.split(".")[0], caption) for name, caption in PHOTOS if name.split(".")[0] in HELD_OUT]
    gen_dir, edit_dir = out / "generated", out / "edited"
    sh([sys.executable, "-m", "unilip_ds.inference.generate", "--ckpt", export, "--steps", "20",
        *[a for _, c in held for a in ("--prompt", c)], "--out", gen_dir], env, log)
    records = json.loads((out / "images" / "edit" / "heldout" / "edits.json").read_text())
    src = out / "images" / "edit" / "heldout"
    cmd = [sys.executable, "-m", "unilip_ds.inference.edit", "--ckpt", export, "--steps", "20", "--out", edit_dir]
    for r in records:
        cmd += ["--image", src / r["input"], "--instruction", r["instruction"]]
    sh(cmd, env, log)

    size = (224, 224)
    rows, p_edit, p_copy, p_in = [], [], [], []
    for i, r in enumerate(records):
        inp = Image.open(src / r["input"]).convert("RGB").resize(size, Image.BICUBIC)
        target = Image.open(src / r["output"]).convert("RGB").resize(size, Image.BICUBIC)
        edited = Image.open(edit_dir / f"{i:03d}_0.png").convert("RGB")
        p_edit.append(psnr(edited, target))
        p_copy.append(psnr(inp, target))
        p_in.append(psnr(edited, inp))
        rows.append([inp, edited, target])  # EDIT_COLUMNS: input | edited | target
    generated = [Image.open(gen_dir / f"{i:03d}_0.png").convert("RGB") for i in range(len(held))]
    # one PNG: the edits (header input | edited | target, each row labelled with its
    # instruction and photo), then the images generated from the held-out captions (each
    # column headed by its caption)
    edits = grid(rows, columns=EDIT_COLUMNS,
                 labels=[f"edit: {r['instruction']} ({Path(r['input']).stem})" for r in records])
    gens = grid([generated], columns=[c for _, c in held], labels=["generated from the caption above each image"])
    both = Image.new("RGB", (max(edits.width, gens.width), edits.height + gens.height), "white")
    both.paste(edits, (0, 0))
    both.paste(gens, (0, edits.height))
    path = out / "edited_and_generated.png"
    both.save(path)
    result = {"psnr_edit": sum(p_edit) / len(p_edit), "psnr_edit_vs_input": sum(p_in) / len(p_in),
              "psnr_copy": sum(p_copy) / len(p_copy), "latent_scale": scale, "grid": str(path),
              "edits": [{**r, "psnr_edit": a, "psnr_edit_vs_input": c, "psnr_copy": b}
                        for r, a, b, c in zip(records, p_edit, p_copy, p_in)]}
    (out / "edit_scores.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--images", type=int, default=200, help="training samples (photos + variants)")
    ap.add_argument("--stage1-steps", type=int, default=400)
    ap.add_argument("--stage2-steps", type=int, default=100)
    ap.add_argument("--gen1-steps", type=int, default=40)
    ap.add_argument("--gen2-identity-steps", type=int, default=1500,
                    help="the first gen_stage2 run, on identity edits alone (0: none)")
    ap.add_argument("--gen2-steps", type=int, default=1500)
    ap.add_argument("--gen2-lr", type=float, default=1e-3)
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
        for part in ("train", "heldout", "train_view"):
            sh([sys.executable, "data_prep/shard_blip3o.py", "--src", out / "images" / part,
                "--dst", f"s3://demo/shards/{part}/", "--shard-size", "32", "--no-progress"], env, log)

        # the tiny InternVL3 stand-in: the recon encoder starts from its vision path (a fixed
        # sin-cos position table, as a pretrained ViT has one) and the generator's LLM is its
        from unilip_ds.data.sample_images import COLOUR_EDITS, IDENTITY_EDIT, PHOTOS
        from unilip_ds.models import tiny_assets as T
        corpus = [c for _, c in PHOTOS] + [instruction for instruction, _ in COLOUR_EDITS + (IDENTITY_EDIT,)]
        internvl = T.save_tiny_internvl(out / "assets" / "internvl", corpus=corpus)
        common = ["model.flavor=tiny", "model.perceptual_pretrained=false", "data.num_workers=1",
                  "data.shuffle_buffer=64", "data.train.urls=[s3://demo/shards/train/]",
                  "data.eval.sources=[{name: train_view, urls: [s3://demo/shards/train_view/]}, "
                  "{name: heldout, urls: [s3://demo/shards/heldout/]}]", "train.micro_batch_size=4",
                  "train.precision=fp32", "train.log_every=20", "optim.warmup_steps=20",
                  "checkpoint.every_steps=100", "wandb.mode=offline"]
        runs = {}
        init = []
        for stage, steps, extra in (
                # stage 1: a high LR, the random tiny encoder being frozen; stage 2 fine-tunes
                # everything at a lower LR and adds the GAN for its last quarter
                ("recon_stage1", args.stage1_steps, ["optim.lr=1e-3", f"model.internvl_path={internvl}"]),
                ("recon_stage2", args.stage2_steps, ["optim.lr=1e-4",
                                                     f"recon.gan_start_step={3 * args.stage2_steps // 4}"])):
            run_dir = out / "runs" / stage
            sh([bin_dir / "torchrun", "--nproc_per_node", args.nproc, "launch/train.py",
                "--config", stage, "--ds_config", "ds_configs/zero2.json", *common, *extra, *init,
                f"run.output_dir={run_dir}", f"train.max_steps={steps}",
                f"train.eval_every={max(1, steps // 4)}"], env, log, label=stage)
            print(f"  {recon_summary(stage, run_dir)}\n  plots: {plot(run_dir)}", flush=True)
            export_dir = out / "exports" / stage
            sh([sys.executable, "launch/export.py", "--run", run_dir, "--out", export_dir], env, log)
            runs[stage] = (run_dir, export_dir)
            # stage 2 starts from the stage-1 export and distils to its encoder (the original)
            init = [f"model.init_from={export_dir}", f"recon.teacher_path={export_dir}"]

        recon_dir = out / "reconstructions"
        sh([sys.executable, "-m", "unilip_ds.inference.reconstruct", "--ckpt", runs["recon_stage2"][1],
            "--images", out / "images" / "heldout", "--out", recon_dir], env, log)
        gen = generator_demo(out, args, env, log, bin_dir, common, runs["recon_stage2"][1], internvl)

    print("\n== demo finished ==")
    for stage, (run_dir, export_dir) in runs.items():
        print(recon_summary(stage, run_dir))
        grids = sorted((run_dir / "samples").glob("*_recon_*.png"))
        print(f"  originals over reconstructions at the last evaluation: {', '.join(str(g) for g in grids[-2:])}")
        print(f"  plots (loss, PSNR, LR, throughput): {run_dir / 'plots'}")
        print(f"  checkpoints: {run_dir / 'checkpoints'}")
        print(f"  export:      {export_dir}")
        wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
        if wandb_runs:
            print(f"  W&B (offline; `wandb sync {wandb_runs[-1]}`): {wandb_runs[-1]}")
    grids = sorted(recon_dir.glob("*grid*.png"))
    print(f"side-by-side originals | reconstructions: {grids[0] if grids else recon_dir}")
    for stage in ("gen_stage1", IDENTITY_RUN, "gen_stage2"):
        if not (out / "runs" / stage).is_dir():
            continue
        rows = evals(out / "runs" / stage, "eval/flow")
        if rows:
            print(f"{stage}: held-out flow loss {rows[0]['eval/flow']:.4f} at step {rows[0]['step']} -> "
                  f"{rows[-1]['eval/flow']:.4f} at step {rows[-1]['step']}")
        print(f"  plots: {out / 'runs' / stage / 'plots'}")
        print(f"  export (UniLIPPipeline.from_pretrained): {out / 'exports' / stage}")
    rows = [json.loads(x) for x in (out / "runs" / "gen_stage2" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "data/cached_latents" in r]
    if rows:
        print(f"gen_stage2 read its frozen outputs from caches ({', '.join(cache_url('gen_stage2', t) for t in CACHE)}): "
              f"latents for {100 * sum(r['data/cached_latents'] for r in rows) / len(rows):.0f}% of the "
              f"samples, prefix for {100 * sum(r['data/cached_prefix'] for r in rows) / len(rows):.0f}%")
    print(f"edit, held-out photos: PSNR(edited, target) {gen['psnr_edit']:.2f} dB, PSNR(edited, input) "
          f"{gen['psnr_edit_vs_input']:.2f} dB; PSNR(input, target) {gen['psnr_copy']:.2f} dB (copying the input)")
    print(f"edited and generated images (edit rows: input | edited | target, labelled with the instruction; "
          f"last row: generated from the held-out captions, each headed by its caption): {gen['grid']}")
    print(f"full log: {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
