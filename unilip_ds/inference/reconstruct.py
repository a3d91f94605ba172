"""Reconstruct images with an exported UniLIP autoencoder and report PSNR / SSIM.

    python -m unilip_ds.inference.reconstruct --ckpt exports/unilip_1b \\
        --images a.jpg some_dir/ shard-000000.tar --out recon_out/

The export dir holds `config.yaml` (the resolved run config) and one sub-dir per component
(vision / adapter / decoder). Images are resized (shorter side) and centre-cropped to
--resolution (default: the run's data.resolution); any size works: multiples of 28 go the
training path, others (e.g. 256) the reference's reflect-pad path (`unilip.reconstruct_padded`).
Writes into --out (new or empty) one PNG per reconstruction and `grid.png` (columns
original | reconstruction, one row per image labelled with its name and PSNR); prints
per-image and mean PSNR / SSIM (data range 1, on the uint8-rounded reconstruction) as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Iterator, List, Tuple

import numpy as np
import torch
from PIL import Image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class ReconstructError(ValueError):
    """Bad command-line input (missing export, no images, unreadable file)."""


def load_autoencoder(ckpt: str | Path):
    """(UniLIP with the exported weights, the export's run config)."""
    from omegaconf import OmegaConf
    from unilip_ds.config import from_dict
    from unilip_ds.engine.weights import load_component
    from unilip_ds.models.flavors import get_flavor
    from unilip_ds.models.unilip import UniLIP
    ckpt = Path(ckpt)
    if not (ckpt / "config.yaml").is_file():
        raise ReconstructError(f"--ckpt: {ckpt} is not an export dir (no config.yaml)")
    cfg = from_dict(OmegaConf.to_container(OmegaConf.load(ckpt / "config.yaml")))
    model = UniLIP(get_flavor(cfg.model.flavor))
    for name, comp in model.export_components().items():
        if not (ckpt / name).is_dir():
            raise ReconstructError(f"--ckpt: {ckpt} has no '{name}' component")
        load_component(comp, ckpt / name)
    return model.eval(), cfg


def iter_images(specs: List[str]) -> Iterator[Tuple[str, Image.Image]]:
    """(name, RGB image) from files, directories (recursive) and .tar shards."""
    for spec in specs:
        p = Path(spec)
        if not p.exists():
            raise ReconstructError(f"--images: no such file or directory {spec}")
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
            for f in files:
                yield str(f.relative_to(p)), _open(f.read_bytes(), str(f))
        elif p.suffix == ".tar":
            with tarfile.open(p) as tar:
                for member in tar:
                    if member.isfile() and Path(member.name).suffix.lower() in IMAGE_EXTS:
                        yield f"{p.stem}/{member.name}", _open(tar.extractfile(member).read(), member.name)
        elif p.suffix.lower() in IMAGE_EXTS:
            yield p.name, _open(p.read_bytes(), str(p))
        else:
            raise ReconstructError(f"--images: {spec} is not an image, directory or .tar shard")


def _open(data: bytes, name: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except Exception as exc:  # PIL raises several types for bad files
        raise ReconstructError(f"cannot decode image {name}: {exc}") from None


def to_tensor(img: Image.Image, resolution: int) -> torch.Tensor:
    """Shorter side -> resolution (bicubic), centre crop; (3, R, R) in [0, 1]."""
    w, h = img.size
    s = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def to_image(t: torch.Tensor) -> Image.Image:
    return Image.fromarray((t.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))


def reconstruct(ckpt, images: List[str], out: str | Path, resolution: int = 0, batch_size: int = 8) -> dict:
    from unilip_ds.evaluation.metrics import psnr, ssim, to_uint8_levels
    from unilip_ds.models.unilip import reconstruct_any
    if resolution and resolution < 28:
        raise ReconstructError(f"--resolution: must be >= 28, got {resolution}")
    out = Path(out)
    from unilip_ds.writable import unwritable
    why = unwritable(out)
    if why:
        raise ReconstructError(f"--out {out}: {why}; choose a directory you can write")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReconstructError(f"--out {out} exists and is not empty; nothing was written")
    model, cfg = load_autoencoder(ckpt)
    res = resolution or cfg.data.resolution
    named = [(n, to_tensor(img, res)) for n, img in iter_images(images)]
    if not named:
        raise ReconstructError(f"--images: no images ({', '.join(IMAGE_EXTS)}) in {' '.join(images)}")
    out.mkdir(parents=True, exist_ok=True)  # only once there is something to write
    rows, labels, results = [], [], []
    with torch.no_grad():
        for i in range(0, len(named), batch_size):
            chunk = named[i:i + batch_size]
            x = torch.stack([t for _, t in chunk])
            y = to_uint8_levels(reconstruct_any(model, x))
            for (name, orig), rec, p, s in zip(chunk, y, psnr(y, x), ssim(y, x)):
                stem = name.replace("/", "__").rsplit(".", 1)[0]
                to_image(rec).save(out / f"{stem}.recon.png")
                rows.append([to_image(orig), to_image(rec)])
                labels.append(f"{name}: {p.item():.2f} dB")
                results.append({"name": name, "psnr": round(p.item(), 4), "ssim": round(s.item(), 4)})
    from unilip_ds.inference.sampling import grid
    grid(rows, columns=["original", "reconstruction"], labels=labels).save(out / "grid.png")
    summary = {"images": results,
               "mean": {"psnr": round(float(np.mean([r["psnr"] for r in results])), 4),
                        "ssim": round(float(np.mean([r["ssim"] for r in results])), 4)},
               "resolution": res}
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Reconstruct images with an exported UniLIP autoencoder.")
    ap.add_argument("--ckpt", required=True, help="export dir (config.yaml + vision/adapter/decoder)")
    ap.add_argument("--images", required=True, nargs="+", help="image files, directories or .tar shards")
    ap.add_argument("--out", required=True, help="new (or empty) output directory")
    ap.add_argument("--resolution", type=int, default=0, help="input size (default: the run's data.resolution)")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    try:
        summary = reconstruct(args.ckpt, args.images, args.out, args.resolution, args.batch_size)
    except ReconstructError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
