"""Per-task decoding of raw webdataset samples into training tensors.

Speed matters more here than anywhere else in the data path: a 1024 px JPEG decoded for
224 px training is decoded at 1/4 scale by libjpeg (PIL `draft`: DCT scaling, 16x fewer
pixels), the crop box is applied inside the one resampling call (no resize of pixels that
are cropped away), and images stay uint8 until the whole batch is converted at once.
"""

from __future__ import annotations

import io
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile

# a truncated file is bad data, never a half-grey image
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt",)


class SampleError(Exception):
    """A sample that cannot be used; `reason` is one of skips.REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _field(sample: dict, prefix: str, exts: Sequence[str]) -> bytes:
    for ext in exts:
        value = sample.get(prefix + ext)
        if value is not None:
            return value
    raise SampleError("missing_key", f"no {prefix}{{{','.join(exts)}}} in sample "
                      f"(has {', '.join(k for k in sample if not k.startswith('__'))})")


def load_image(data: bytes, size: int) -> Image.Image:
    """Decode to RGB with the shorter side >= `size`, at the coarsest JPEG DCT scale
    that allows it."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            # picks the largest 1/2^k reduction keeping both sides >= size
            img.draft("RGB", (size, size))
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise SampleError("bad_image", f"{type(exc).__name__}: {exc}") from None
    return img


def resize_crop(img: Image.Image, size: int, rng: Optional[np.random.Generator],
                flip: bool = False) -> np.ndarray:
    """Square crop (random when `rng` is given, else centred) of the shorter side,
    resampled to size x size in one call; uint8 HWC."""
    w, h = img.size
    side = min(w, h)
    if rng is None:
        x0, y0 = (w - side) // 2, (h - side) // 2
    else:
        x0 = int(rng.integers(0, w - side + 1))
        y0 = int(rng.integers(0, h - side + 1))
    out = img.resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + side, y0 + side))
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def _text(sample: dict, what: str) -> str:
    raw = _field(sample, "", TEXT_EXTS)
    try:
        text = raw.decode("utf-8").strip() if isinstance(raw, bytes) else str(raw).strip()
    except UnicodeDecodeError:
        raise SampleError("empty_text", f"{what} is not utf-8") from None
    if not text:
        raise SampleError("empty_text", f"empty {what}")
    return text


class Decoder:
    """Turns raw samples of one task into fields, and lists of fields into a batch.

    `train=True`: random crops (and flips for recon when `random_flip`); else centred.
    """

    def __init__(self, task: str, resolution: int, train: bool = True,
                 random_flip: bool = True):
        self.task = task
        self.size = resolution
        self.train = train
        self.flip = train and random_flip and task == "recon"
        self._decode: Callable[[dict, Optional[np.random.Generator]], dict] = {
            "recon": self._recon, "t2i": self._t2i, "edit": self._edit}[task]

    def _image(self, data: bytes, rng: Optional[np.random.Generator]) -> np.ndarray:
        img = load_image(data, self.size)
        rng = rng if self.train else None
        flip = self.flip and rng is not None and bool(rng.integers(0, 2))
        return resize_crop(img, self.size, rng, flip)

    def _recon(self, sample: dict, rng) -> dict:
        return {"image": self._image(_field(sample, "", IMAGE_EXTS), rng)}

    def _t2i(self, sample: dict, rng) -> dict:
        caption = _text(sample, "caption")  # cheap checks before the decode
        return {"image": self._image(_field(sample, "", IMAGE_EXTS), rng), "caption": caption}

    def _edit(self, sample: dict, rng) -> dict:
        instruction = _text(sample, "instruction")
        src = _field(sample, "input.", IMAGE_EXTS)
        dst = _field(sample, "output.", IMAGE_EXTS)
        # the same crop for input and output keeps them aligned
        state = None if rng is None else rng.bit_generator.state
        inp = self._image(src, rng)
        if state is not None:
            rng.bit_generator.state = state
        return {"input_image": inp, "image": self._image(dst, rng), "instruction": instruction}

    def __call__(self, sample: dict, rng: Optional[np.random.Generator] = None) -> dict:
        """Decoded fields of one sample; raises SampleError for bad data."""
        return self._decode(sample, rng)

    def collate(self, items: List[dict], keys: List[str]) -> Dict[str, object]:
        """uint8 HWC images -> float32 (B,3,H,W) in [0,1]; text fields as lists."""
        batch: Dict[str, object] = {"__key__": keys, "__task__": self.task}
        for name in items[0]:
            values = [it[name] for it in items]
            if isinstance(values[0], np.ndarray):
                # one pass uint8 -> float into a contiguous (B,3,H,W) tensor
                u8 = torch.from_numpy(np.stack(values)).permute(0, 3, 1, 2)
                out = torch.empty(u8.shape, dtype=torch.float32)
                batch[name] = torch.div(u8, 255, out=out)
            else:
                batch[name] = values
        return batch
