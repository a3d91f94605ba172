"""Small real data sets from scikit-image's bundled photos, for tests, the demo and the
benchmark (nothing can be downloaded here).

- `write_caption_folder`: `<key>.jpg` + `<key>.txt` pairs (the "image + caption folder"
  input of data_prep/shard_blip3o.py). Variants beyond the ~20 photos are distinct random
  crops/flips, so they survive de-duplication by content hash.
- `write_caption_tars`: the same samples as BLIP3o-style tars (`jpg` + `txt` members).
- `write_edit_folder`: GPT-Image-Edit-style json + image folders whose edits are real
  (flip, grayscale, rotate, invert...) and whose instructions say what was done.
- `write_edit_pairs_folder`: the same layout with one simple, exactly learnable edit per
  sample, picked by a seeded draw per sample from an edit set, so a model must read the
  instruction: FLIP_EDITS ("flip the image horizontally" / "turn the image upside down":
  the layout moves) or COLOUR_EDITS ("invert the colours" / "make the image black and
  white": every place keeps its place, its colour changes; the demo's edit set, the one a
  tiny model learns in CPU minutes).

- `mosaic_samples`: colour-block mosaics aligned to the tiny flavor's 8 x 8 token grid; their
  identity edits (IDENTITY_EDIT) check that a generator carries the reference image's layout
  to the output (benchmarks/edit_learns.py heldout --data mosaics).

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
from typing import Callable, List, Optional, Sequence, Tuple

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

# per-pixel edits: the output keeps the input's layout, so a small model that carries the
# reference image through its condition can learn them (the tiny flavor does not learn flips)
COLOUR_EDITS: Tuple[Tuple[str, Callable[[Image.Image], Image.Image]], ...] = (
    ("invert the colours", ImageOps.invert),
    ("make the image black and white", lambda im: ImageOps.grayscale(im).convert("RGB")),
)
EDIT_SETS = {"flips": FLIP_EDITS, "colours": COLOUR_EDITS}


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


# synthetic scenes: unlimited, varied layouts whose captions say exactly what is drawn
COLOURS: Tuple[Tuple[str, Tuple[int, int, int]], ...] = (
    ("red", (220, 40, 40)), ("green", (40, 170, 60)), ("blue", (40, 70, 220)), ("yellow", (240, 220, 40)),
    ("white", (245, 245, 245)), ("black", (20, 20, 20)), ("orange", (245, 140, 30)), ("purple", (140, 50, 170)))
SHAPES = ("circle", "square", "triangle")


def _where(cx: float, cy: float) -> str:
    v = "top" if cy < 0.4 else "bottom" if cy > 0.6 else "middle"
    h = "left" if cx < 0.4 else "right" if cx > 0.6 else "centre"
    return "centre" if (v, h) == ("middle", "centre") else f"{v} {h}" if v != "middle" else f"middle {h}"


def shape_scene(rng: random.Random, size: int = 224) -> Tuple[Image.Image, str]:
    """One to three flat shapes on a plain background, and the caption naming each shape's
    colour, kind and place (so a flip moves what the caption says is where)."""
    from PIL import ImageDraw
    bg_name, bg = rng.choice(COLOURS)
    im = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(im)
    parts = []
    for _ in range(rng.randint(1, 3)):
        name, colour = rng.choice([c for c in COLOURS if c[0] != bg_name])
        kind = rng.choice(SHAPES)
        r = rng.uniform(0.12, 0.25) * size
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        if kind == "circle":
            draw.ellipse(box, fill=colour)
        elif kind == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
        parts.append(f"{'an' if name[0] in 'aeiou' else 'a'} {name} {kind} at the {_where(cx / size, cy / size)}")
    return im, f"{', '.join(parts[:-1]) + ' and ' if len(parts) > 1 else ''}{parts[-1]} on a {bg_name} background."


def shape_samples(count: int, size: int = 224, seed: int = 0) -> List[Sample]:
    """`count` synthetic scenes (shape_scene), the same for the same seed."""
    rng = random.Random(f"shapes-{seed}")
    out = []
    for i in range(count):
        im, caption = shape_scene(rng, size)
        out.append(Sample(f"shapes{seed}_{i:05d}", im, caption[0].upper() + caption[1:]))
    return out


def mosaic_scene(rng: random.Random, size: int = 224, grid: int = 8) -> Image.Image:
    """A grid x grid mosaic of flat cells, each a colour drawn independently (uniform RGB).
    At grid 8 and 224 px every cell is one token of the tiny flavor's reference image and
    latent (28 px = 2 x 2 patches of 14 px, pixel-shuffled); coarser grids are blocks of
    whole tokens. The image's mean tells little about any one place, so a "keep the image
    as it is" edit on mosaics is learnt only by carrying each reference token to its own
    place in the output (which shape scenes on a plain background, whose mean is most of
    the image, do not teach)."""
    from PIL import ImageDraw
    im = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(im)
    edges = [round(k * size / grid) for k in range(grid + 1)]
    for i in range(grid):
        for j in range(grid):
            colour = tuple(rng.randrange(256) for _ in range(3))
            draw.rectangle((edges[j], edges[i], edges[j + 1] - 1, edges[i + 1] - 1), fill=colour)
    return im


def mosaic_samples(count: int, size: int = 224, grids: Sequence[int] = (2, 4, 8), seed: int = 0) -> List[Sample]:
    """`count` mosaics (mosaic_scene), each of a grid drawn uniformly from `grids` (repeat a
    value to weight it), the same for the same seed; the caption says what they are."""
    rng = random.Random(f"mosaics-{seed}")
    out = []
    for i in range(count):
        g = rng.choice(list(grids))
        out.append(Sample(f"mosaic{seed}_{i:05d}", mosaic_scene(rng, size, g),
                          f"A mosaic of {g} by {g} flat colour squares."))
    return out


# the identity edit: the output is the input (on mosaics: is the reference's layout carried?)
IDENTITY_EDIT: Tuple[str, Callable[[Image.Image], Image.Image]] = ("keep the image as it is", lambda im: im)


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


def write_edit_pairs_folder(dst: os.PathLike, count: Optional[int] = None,
                            size: Optional[int] = None, seed: int = 0,
                            vertical: bool = True, quality: int = 95,
                            keep: Optional[Callable[[Sample], bool]] = None,
                            edits: Optional[Sequence[Tuple[str, Callable]]] = None) -> Path:
    """A learnable edit source, in write_edit_folder's layout (`edits.json` + `images/`,
    read by data_prep/shard_edit.py --src dst): each output is its input under one edit of
    `edits` (default FLIP_EDITS: flipped horizontally, or, when `vertical`, for about half
    of the samples, upside down). The choice is a draw seeded by `seed`, independent of
    the photo (its variants get either edit), so only the instruction tells the edits
    apart. Same arguments -> the same files. `keep` selects samples (e.g. train / held-out
    photos). Returns the json path."""
    if edits is None:
        edits = FLIP_EDITS if vertical else FLIP_EDITS[:1]
    pick = random.Random(f"flip-edits-{seed}")
    items = ((s, *edits[pick.randrange(len(edits))]) for s in samples(count, size, seed))
    return _write_edits(dst, (it for it in items if keep is None or keep(it[0])), quality)
