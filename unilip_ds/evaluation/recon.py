"""Reconstruction metrics as the paper reports them: rFID, PSNR, SSIM.

    python -m unilip_ds.evaluation.recon --ckpt <export> --data <shards> [--resolution 256|448] \\
        [--inception pt_inception-2015-12-05-6726825d.pth] --out <dir>
    torchrun --nproc_per_node 8 -m unilip_ds.evaluation.recon ...   (shards split over ranks)

As the reference evaluator: images are resized (shorter side) and centre-cropped to
--resolution, reconstructed (sizes that are not multiples of 28, e.g. 256, through the
reflect-pad path: `unilip.reconstruct_padded`), clamped and rounded to uint8 before any
metric. rFID compares the FID-Inception pool features of originals and reconstructions;
PSNR (data range 1) and SSIM are per-image means. `ssim` is the correct SSIM (data range
1); `ssim_ref` is the reference's convention (uniform 7x7 window, data_range=2.0), which the
paper's table uses. The same `ReconMetrics` runs in the trainer's periodic evaluation.
Writes `<out>/metrics.json` and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

from unilip_ds.evaluation.fid import FeatureStats, fid_from_stats
from unilip_ds.evaluation.metrics import psnr, ssim, ssim_ref, to_uint8_levels


class EvalError(ValueError):
    """Bad command-line input: one line, exit code 2."""


class ReconMetrics:
    """Accumulates rFID statistics (when given an Inception) and per-image PSNR / SSIM.
    `update(real, fake)` takes float images in [0, 1] (fake is clamped and rounded to uint8
    levels here; real images are expected to be 8-bit already, as decoded)."""

    def __init__(self, inception: Optional[torch.nn.Module] = None, device="cpu"):
        self.inception = inception
        self.device = torch.device(device)
        self.real = FeatureStats(2048, self.device) if inception is not None else None
        self.fake = FeatureStats(2048, self.device) if inception is not None else None
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # n, psnr, ssim, ssim_ref

    @torch.no_grad()
    def update(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        real = to_uint8_levels(real)
        fake = to_uint8_levels(fake)
        self.sums += torch.stack([torch.tensor(float(real.shape[0]), dtype=torch.float64, device=self.device),
                                  psnr(fake, real).double().sum().to(self.device),
                                  ssim(fake, real).double().sum().to(self.device),
                                  ssim_ref(fake, real).double().sum().to(self.device)])
        if self.inception is not None:
            dev = next(self.inception.parameters()).device
            for images, stats in ((real, self.real), (fake, self.fake)):
                u8 = torch.round(images * 255).to(torch.uint8).to(dev)
                stats.update(self.inception(u8))

    def all_reduce(self) -> None:
        """Sum the statistics of all ranks (each evaluated its own images)."""
        import torch.distributed as tdist
        if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
            return
        tdist.all_reduce(self.sums)
        if self.inception is not None:
            for stats in (self.real, self.fake):
                t = stats.tensors()
                for v in t.values():
                    tdist.all_reduce(v)
                stats.n = int(t["n"].item())

    def result(self) -> Dict[str, float]:
        n = self.sums[0].item()
        if n < 1:
            return {}
        out = {"images": n, "psnr": self.sums[1].item() / n, "ssim": self.sums[2].item() / n,
               "ssim_ref": self.sums[3].item() / n}
        if self.inception is not None and n >= 2:
            out["rfid"] = fid_from_stats(self.real, self.fake)
        return out


# ---------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------
def iter_batches(shards: List[str], resolution: int, batch_size: int, rank: int, world: int,
                 max_images: int = 0) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, R, R) batches of this rank's shards (r, r + world, ...): centred crops
    of the shorter side resized to R; undecodable samples are skipped."""
    from unilip_ds.data.config import DataConfig
    from unilip_ds.data.decode import Decoder, SampleError
    from unilip_ds.data.stream import iter_shard
    cfg = DataConfig(resolution=resolution)
    decoder = Decoder("recon", resolution, train=False)
    builder, seen = decoder.new_batch(batch_size), 0
    for url in shards[rank::world]:
        for raw in iter_shard(url, cfg, None):
            if max_images and seen >= max_images:
                break
            try:
                builder.add(raw)
            except SampleError:
                continue
            seen += 1
            if builder.full:
                yield builder.finish()["image"]
                builder = decoder.new_batch(batch_size)
    if len(builder):
        yield builder.finish()["image"]


def evaluate_export(ckpt: str, data: List[str], out: str, resolution: int = 256,
                    inception: Optional[str] = None, batch_size: int = 16, max_images: int = 0,
                    progress: bool = True) -> Dict[str, float]:
    from unilip_ds.data.shards import list_shards
    from unilip_ds.data.storage import StorageError
    from unilip_ds.engine import dist
    from unilip_ds.evaluation.inception import InceptionWeightsError, load_fid_inception
    from unilip_ds.inference.reconstruct import ReconstructError, load_autoencoder
    from unilip_ds.models.unilip import reconstruct_any
    if resolution < 28:
        raise EvalError(f"--resolution: must be >= 28, got {resolution}")
    from unilip_ds.writable import unwritable
    why = unwritable(out)
    if why:  # metrics.json is written at the end: find out now
        raise EvalError(f"--out {out}: {why}; choose a directory you can write")
    if batch_size < 1:
        raise EvalError(f"--batch-size: must be >= 1, got {batch_size}")
    try:
        shards = list_shards(list(data))
    except (StorageError, ValueError) as exc:
        raise EvalError(f"--data: {exc}") from None
    device = dist.device()
    try:
        model, _ = load_autoencoder(ckpt)
    except ReconstructError as exc:
        raise EvalError(str(exc)) from None
    net = None
    if inception:
        try:
            net = load_fid_inception(inception, device=device)
        except InceptionWeightsError as exc:
            raise EvalError(str(exc)) from None
    distributed = dist.world_size() > 1
    if distributed:
        import torch.distributed as tdist
        dist.ensure_env()
        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.rank(), dist.world_size()
    model = model.to(device)
    metrics = ReconMetrics(net, device)
    t0, done = time.time(), 0
    per_rank = -(-max_images // world) if max_images else 0
    with torch.no_grad():
        for batch in iter_batches(shards, resolution, batch_size, rank, world, per_rank):
            real = batch.to(device).float() / 255.0
            metrics.update(real, reconstruct_any(model, real))
            done += real.shape[0]
            if progress and rank == 0:
                print(f"\rrank 0: {done} images, {done / (time.time() - t0):.1f} img/s", end="",
                      file=sys.stderr, flush=True)
    if progress and rank == 0:
        print(file=sys.stderr)
    metrics.all_reduce()
    res = metrics.result()
    if not res:
        raise EvalError(f"--data: no decodable images in {len(shards)} shard(s)")
    res.update({"resolution": resolution, "export": str(ckpt), "shards": len(shards), "world_size": world})
    if rank == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.json").write_text(json.dumps(res, indent=1))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="rFID / PSNR / SSIM of an exported UniLIP autoencoder "
                                             "over a shard set (as the paper reports them).")
    ap.add_argument("--ckpt", required=True, help="export dir (config.yaml + vision/adapter/decoder)")
    ap.add_argument("--data", required=True, nargs="+", help="shards: files, brace patterns, dirs, s3:// prefixes")
    ap.add_argument("--out", required=True, help="output directory (metrics.json)")
    ap.add_argument("--resolution", type=int, default=256, help="evaluation size (paper: 256 and 448)")
    ap.add_argument("--inception", default=None,
                    help="pt_inception-2015-12-05 weights file (pytorch-fid's FID Inception); "
                         "without it rFID is not computed")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-images", type=int, default=0, help="stop after about this many images (0: all)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        res = evaluate_export(args.ckpt, args.data, args.out, args.resolution, args.inception,
                              args.batch_size, args.max_images, not args.no_progress)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from unilip_ds.engine import dist
    if dist.rank() == 0:
        print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
