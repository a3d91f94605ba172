"""Images/s of the recon data pipeline on this machine, all in one run.

    .venv/bin/python benchmarks/data_pipeline.py [--images 256] [--source-size 1024]
        [--resolution 224] [--workers 2] [--batch 32] [--seconds 5] [--rounds 3]

Builds `--images` JPEG sources of `--source-size` px and shards them with data_prep, then
prints four figures for decoding them for `--resolution` px training, each with
`--workers` loader workers:
  1. the full recon pipeline (build_train_loader: uint8 (B,3,H,W) batches) from local
     shards;
  2. the same from a local S3 server (SeaweedFS `weed mini`);
  3. the limit: bare decode-and-resize of the same images in one process x workers (the
     pipeline's per-image work alone: reduced-scale decode, random crop resampled to the
     resolution, flip, uint8 (3,H,W) output; bytes already in memory);
  4. a plain webdataset + PIL pipeline of the kind reference trainers use (full-size
     decode, then resize / crop / flip, to a float tensor).
Targets: (1) >= 0.8 x (3), and (1) >= 2 x (4).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import numpy as np
import psutil
import torch
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.sharding import PrepConfig, run as prep  # noqa: E402
from unilip_ds.config import Config  # noqa: E402
from unilip_ds.data import build_train_loader  # noqa: E402
from unilip_ds.data.decode import load_image, resize_crop, write_chw  # noqa: E402
from unilip_ds.data.sample_images import write_caption_folder  # noqa: E402
from unilip_ds.data.seaweed import SeaweedS3  # noqa: E402


def write_shards(root: Path, images: int, size: int, per_shard: int) -> List[Path]:
    """Shards as training reads them: an image + caption folder re-sharded by data_prep
    (the same tool and tar layout as for BLIP3o: USTAR, jpg + txt + json members)."""
    write_caption_folder(root / "src", images, size=size, quality=90)
    manifest = prep(PrepConfig(srcs=[str(root / "src")], dst=str(root / "shards"), kind="t2i",
                               shard_samples=per_shard, progress=False))
    if manifest.samples != images:
        raise SystemExit(f"data_prep kept {manifest.samples} of {images} images: "
                         f"{manifest.skipped}")
    shutil.rmtree(root / "src")
    return sorted((root / "shards").glob("*.tar"))


def measure(batches: Iterator, count: Callable[[object], int], seconds: float,
            warmup: int, drain: int, workers: int,
            server=None) -> Callable[[], Tuple[float, float]]:
    """A function giving images/s of `batches` over about `seconds`. The first call
    first takes `warmup` batches (worker start-up, first shuffle block); every call
    first drops `drain` batches (what idle workers prefetched since the last round)."""
    pending = [warmup]

    def run() -> Tuple[float, float]:
        for _ in range((pending.pop() if pending else 0) + drain):
            next(batches)
        # this process, the loader's workers (a DataLoader iterator's `_workers`) and the
        # S3 server when it serves this loader
        procs = [psutil.Process()] + [psutil.Process(w.pid) for w in batches._workers]
        if server is not None:
            procs.append(psutil.Process(server._proc.pid))
        n, t0, c0 = 0, time.perf_counter(), cpu_seconds(procs)
        while time.perf_counter() - t0 < seconds:
            n += count(next(batches))
        out = n / (time.perf_counter() - t0), workers * n / (cpu_seconds(procs) - c0)
        time.sleep(2.0)  # let the workers refill their prefetch before the next loader runs
        return out
    return run


def cpu_seconds(procs) -> float:
    """CPU time of `procs`: images per CPU-second stays meaningful when other jobs
    share the cores."""
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def recon_loader(urls: List[str], args) -> Iterator[dict]:
    cfg = Config()
    cfg.data.train.urls = urls
    cfg.data.num_workers = args.workers
    cfg.data.resolution = args.resolution
    cfg.data.shuffle_buffer = args.shuffle
    cfg.train.micro_batch_size = args.batch
    return iter(build_train_loader(cfg, 0, 1))


def bare_decode_rate(paths: List[Path], args) -> Tuple[float, float]:
    """One process, encoded images already in memory, nothing but the per-image work the
    pipeline does: reduced-scale decode, random crop resampled to the resolution, random
    flip, written as uint8 (3,H,W) into one reused buffer."""
    data = [s["jpg"] for p in paths for s in wds.WebDataset(str(p), shardshuffle=False)]
    res = args.resolution
    out = np.empty((3, res, res), np.uint8)
    rng = np.random.default_rng(0)

    def one(jpg: bytes) -> None:
        img = load_image(jpg, res)
        write_chw(resize_crop(img, res, rng, flip=bool(rng.integers(0, 2))), out)

    for d in data[:8]:
        one(d)
    me = psutil.Process()
    n, t0, c0 = 0, time.perf_counter(), sum(me.cpu_times()[:2])
    while time.perf_counter() - t0 < args.seconds:
        one(data[n % len(data)])
        n += 1
    # x workers: the rate of that many processes on as many free cores
    return (args.workers * n / (time.perf_counter() - t0),
            args.workers * n / (sum(me.cpu_times()[:2]) - c0))


def plain_loader(urls: List[str], args) -> Iterator[dict]:
    """webdataset + PIL as the reference trainers do it: decode at full size, then
    Resize(shorter side, bicubic) + RandomCrop + RandomHorizontalFlip + ToTensor."""
    res = args.resolution

    def transform(img: Image.Image) -> torch.Tensor:
        w, h = img.size
        s = res / min(w, h)
        img = img.resize((max(res, round(w * s)), max(res, round(h * s))), Image.BICUBIC)
        x0 = np.random.randint(0, img.size[0] - res + 1)
        y0 = np.random.randint(0, img.size[1] - res + 1)
        img = img.crop((x0, y0, x0 + res, y0 + res))
        if np.random.rand() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)

    ds = (wds.WebDataset(urls, resampled=True, nodesplitter=wds.split_by_node)
          .shuffle(args.shuffle).decode("pil").to_tuple("jpg", "__key__")
          .map_tuple(transform, lambda k: k).batched(args.batch))
    return iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=args.workers))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256, help="JPEG source images to generate (256)")
    ap.add_argument("--source-size", type=int, default=1024, help="their side in px (1024)")
    ap.add_argument("--resolution", type=int, default=224, help="training resolution decoded to (224)")
    ap.add_argument("--workers", type=int, default=2, help="loader worker processes (2)")
    ap.add_argument("--batch", type=int, default=32, help="images per batch (32)")
    ap.add_argument("--shuffle", type=int, default=256, help="shuffle block / buffer in samples (256)")
    ap.add_argument("--per-shard", type=int, default=32, help="images per shard (32)")
    ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per figure and round (5)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each figure keeps its best (3)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    tmp = Path(tempfile.mkdtemp(prefix="unilip-bench-"))
    paths = write_shards(tmp, args.images, args.source_size, args.per_shard)
    mb = sum(p.stat().st_size for p in paths) / 2**20
    print(f"{args.images} JPEG sources of {args.source_size} px ({mb:.0f} MiB in "
          f"{len(paths)} shards) -> {args.resolution} px, batch {args.batch}, "
          f"{args.workers} workers, {os.cpu_count()} CPU cores", flush=True)
    warm, drain = 2 * args.workers, 2 * args.workers
    local = [str(p) for p in paths]
    imgs = lambda b: b["image"].shape[0]  # noqa: E731

    # the machine may be shared: measure in interleaved rounds and keep each one's best
    with SeaweedS3() as s3:
        os.environ.update(s3.env())  # credentials only in the environment
        bucket = s3.create_bucket("bench")
        fs = s3.client()
        for p in paths:
            fs.put(str(p), f"bench/shards/{p.name}")
        runs = {
            "limit": lambda: bare_decode_rate(paths, args),
            "local": measure(recon_loader(local, args), imgs, args.seconds, warm, drain,
                             args.workers),
            "s3": measure(recon_loader([f"{bucket}/shards/"], args), imgs, args.seconds, warm,
                          drain, args.workers, server=s3),
            "plain": measure(plain_loader(local, args), lambda b: b[0].shape[0],
                             args.seconds, warm, drain, args.workers),
        }
        figures = {k: [] for k in runs}
        for r in range(args.rounds):
            for name, fn in runs.items():
                figures[name].append(fn())
            print(f"  round {r + 1} (wall / per-CPU x {args.workers}): " + ", ".join(
                f"{k} {v[-1][0]:.0f} / {v[-1][1]:.0f}" for k, v in figures.items()), flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    wall = {k: max(v[0] for v in vs) for k, vs in figures.items()}
    cpu = {k: max(v[1] for v in vs) for k, vs in figures.items()}
    print(f"images/s, best of {args.rounds} rounds of {args.seconds:g} s (load average now "
          f"{os.getloadavg()[0]:.1f}). 'wall': measured; 'cpu': images per CPU-second of all "
          f"processes involved x {args.workers} (the rate on {args.workers} free cores)")
    rows = [("limit", f"limit: bare decode-and-resize, 1 process x {args.workers}"),
            ("local", "unilip_ds recon pipeline, local shards"),
            ("s3", "unilip_ds recon pipeline, local S3 (SeaweedFS)"),
            ("plain", "plain webdataset + PIL (full-size decode)")]
    for key, label in rows:
        print(f"  {label:<50s} wall {wall[key]:7.1f}   cpu {cpu[key]:7.1f}")
    for name, f in (("wall", wall), ("cpu", cpu)):
        print(f"{name}: local / limit = {f['local'] / f['limit']:.2f} (target >= 0.8); "
              f"local / plain = {f['local'] / f['plain']:.2f} (target >= 2); "
              f"s3 / local = {f['s3'] / f['local']:.2f}")


if __name__ == "__main__":
    main()
