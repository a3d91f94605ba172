"""Small real data sets from scikit-image's bundled photos, for tests, the demo and the
benchmark (nothing can be downloaded here).

- `write_caption_folder`: `<key>.jpg` + `<key>.txt` pairs (the "image + caption folder"
  input of data_prep/shard_blip3o.py). Variants beyond the ~20 photos are distinct random
  crops/flips, so they survive de-duplication by content hash.
- `write_caption_tars`: the same samples as BLIP3o-style tars (`jpg` + `txt` members).
- `write_edit_folder`: GPT-Image-Edit-style json + image folders whose edits are real
  (flip, grayscale, rotate, invert...) and whose instructions say what was done.
- `write_flip_edit_folder`: the same layout with one simple, exactly learnable edit per
  sample: "flip the image horizontally" (output = input mirrored) or "turn the image
  upside down" (output = input flipped vertically), picked by a seeded draw per sample,
  so a model must read the instruction (the generator demo's edit set).

`size` resamples every image to size x size (e.g. 1024 for the decode benchmark).
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from PIL import Image, ImageOps

# file in skimage/data -> caption written by hand
PHOTOS: Tuple[Tuple[str, str], ...] = (
    ("astronaut.png", "An astronaut in a white spacesuit smiling in front of an American flag."),
    ("chelsea.png", "A tabby cat with green eyes looking to the side."),
    ("coffee.png", "A cup of coffee with latte art on a saucer, seen from above."),
    ("rocket.jpg", "A rocket standing on its launch pad under a blue sky."),
    ("hubble_deep_field.jpg", "Hundreds of distant galaxies scattered across black space."),
    ("retina.jpg", "A photograph of the back of a human eye with red blood vessels."),
    ("motorcycle_left.png", "A red motorcycle parked in a garage, seen from the side."),
    ("motorcycle_right.png", "A motorcycle in a workshop next to shelves and tools."),
    ("ihc.png", "A microscope slide of tissue stained brown and blue."),
    ("color.png", "A circular colour chart with bright rainbow hues."),
    ("camera.png", "A black and white photo of a man operating a camera on a tripod."),
    ("moon.png", "The grey cratered surface of the moon."),
    ("coins.png", "Rows of old coins on a dark background."),
    ("brick.png", "A grey brick wall with mortar lines."),
    ("grass.png", "A close-up of dense blades of grass."),
    ("gravel.png", "Small grey stones of gravel seen from above."),
    ("page.png", "A page of printed text photographed at an angle."),
    ("text.png", "Hand-drawn letters and words on a light background."),
    ("cell.png", "A microscope image of a single cell with a bright membrane."),
    ("clock_motion.png", "A wall clock blurred by motion."),
    ("logo.png", "A colourful logo with a snake-like shape on a plain background."),
    ("horse.png", "The black silhouette of a horse on white."),
)

# (instruction, edit) pairs for the edit data set
EDITS: Tuple[Tuple[str, Callable[[Image.Image], Image.Image]], ...] = (
    ("Flip the image horizontally.", ImageOps.mirror),
    ("Flip the image upside down.", ImageOps.flip),
    ("Make the image black and white.", lambda im: ImageOps.grayscale(im).convert("RGB")),
    ("Invert the colours of the image.", ImageOps.invert),
    ("Rotate the image by 90 degrees clockwise.", lambda im: im.transpose(Image.ROTATE_270)),
    ("Give the image a warm sepia tone.",
     lambda im: ImageOps.colorize(ImageOps.grayscale(im), "#3b2412", "#f2dfb8")),
    ("Reduce the image to a few flat colours.", lambda im: ImageOps.posterize(im, 2)),
)


# the demo's edit set: deterministic edits an image model can learn exactly
FLIP_EDITS: Tuple[Tuple[str, Callable[[Image.Image], Image.Image]], ...] = (
    ("flip the image horizontally", ImageOps.mirror),
    ("turn the image upside down", ImageOps.flip),
)


def photo_dir() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


def load_photo(name: str) -> Image.Image:
    """A bundled photo as RGB (alpha composited on white, grey expanded)."""
    im = Image.open(photo_dir() / name)
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def _variant(im: Image.Image, rng: random.Random) -> Image.Image:
    """A random crop covering 60-100% of each side, maybe mirrored."""
    w, h = im.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    im = im.crop((x, y, x + cw, y + ch))
    return ImageOps.mirror(im) if rng.random() < 0.5 else im


@dataclass
class Sample:
    key: str
    image: Image.Image
    caption: str


def samples(count: Optional[int] = None, size: Optional[int] = None,
            seed: int = 0) -> List[Sample]:
    """`count` samples (default: one per photo): the photos first, then variants."""
    count = len(PHOTOS) if count is None else count
    rng = random.Random(seed)
    cache = {}
    out = []
    for i in range(count):
        name, caption = PHOTOS[i % len(PHOTOS)]
        if name not in cache:
            cache[name] = load_photo(name)
        im = cache[name] if i < len(PHOTOS) else _variant(cache[name], rng)
        if size:
            im = im.resize((size, size), Image.BICUBIC)
        out.append(Sample(f"{Path(name).stem}_{i:05d}", im, caption))
    return out


def jpeg_bytes(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_caption_folder(dst: os.PathLike, count: Optional[int] = None,
                         size: Optional[int] = None, seed: int = 0,
                         quality: int = 90) -> List[str]:
    """Write `<key>.jpg` + `<key>.txt` pairs into dst; returns the keys."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in samples(count, size, seed):
        (dst / f"{s.key}.jpg").write_bytes(jpeg_bytes(s.image, quality))
        (dst / f"{s.key}.txt").write_text(s.caption + "\n", encoding="utf-8")
        keys.append(s.key)
    return keys


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_caption_tars(dst: os.PathLike, count: Optional[int] = None, per_tar: int = 10,
                       size: Optional[int] = None, seed: int = 0) -> List[Path]:
    """BLIP3o-style source tars: members `<key>.jpg` and `<key>.txt`."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    items = samples(count, size, seed)
    paths = []
    for t in range(0, len(items), per_tar):
        path = dst / f"src-{t // per_tar:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for s in items[t:t + per_tar]:
                _add(tar, f"{s.key}.jpg", jpeg_bytes(s.image))
                _add(tar, f"{s.key}.txt", s.caption.encode())
        paths.append(path)
    return paths


def _write_edits(dst: os.PathLike, items, quality: int) -> Path:
    """`edits.json` (a list of {"id", "input", "output", "instruction"}, image paths
    relative to it) + `images/<key>_in.jpg`, `images/<key>_out.jpg`; `items` yields
    (sample, instruction, edit). Returns the json path."""
    dst = Path(dst)
    (dst / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for s, instruction, edit in items:
        src, out = f"images/{s.key}_in.jpg", f"images/{s.key}_out.jpg"
        (dst / src).write_bytes(jpeg_bytes(s.image, quality))
        (dst / out).write_bytes(jpeg_bytes(edit(s.image), quality))
        records.append({"id": s.key, "input": src, "output": out, "instruction": instruction})
    path = dst / "edits.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def write_edit_folder(dst: os.PathLike, count: Optional[int] = None,
                      size: Optional[int] = None, seed: int = 0) -> Path:
    """GPT-Image-Edit-style source: `edits.json` (a list of {"input", "output",
    "instruction"} with paths relative to it) + `images/`. Returns the json path.
    The edits cycle through EDITS."""
    return _write_edits(dst, ((s, *EDITS[i % len(EDITS)])
                              for i, s in enumerate(samples(count, size, seed))), 90)


def write_flip_edit_folder(dst: os.PathLike, count: Optional[int] = None,
                           size: Optional[int] = None, seed: int = 0,
                           vertical: bool = True, quality: int = 95,
                           keep: Optional[Callable[[Sample], bool]] = None) -> Path:
    """The demo's edit source, in write_edit_folder's layout (`edits.json` + `images/`,
    read by data_prep/shard_edit.py --src dst): each output is its input flipped
    horizontally ("flip the image horizontally") or, when `vertical`, for about half of
    the samples, flipped vertically ("turn the image upside down"). The choice is a
    draw seeded by `seed`, independent of the photo (its variants get either edit), so
    only the instruction tells the two apart. Same arguments -> the same files. `keep`
    selects samples (e.g. train / held-out photos). Returns the json path."""
    edits = FLIP_EDITS if vertical else FLIP_EDITS[:1]
    pick = random.Random(f"flip-edits-{seed}")
    items = ((s, *edits[pick.randrange(len(edits))]) for s in samples(count, size, seed))
    return _write_edits(dst, (it for it in items if keep is None or keep(it[0])), quality)
