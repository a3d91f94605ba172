"""Per-task decoding of raw webdataset samples into uint8 training batches.

Speed matters more here than anywhere else in the data path: a 1024 px JPEG decoded for
224 px training is decoded at 1/4 scale by libjpeg (PIL `draft`: DCT scaling, 16x fewer
pixels), the crop box (if any) is applied inside the one resampling call (no resize of
pixels that are cropped away), and each image is written once, channel by channel, straight into its
slot of a preallocated uint8 (B,3,H,W) batch. In a loader worker that batch lives in
shared memory from the start, so handing it to the trainer copies nothing. Images stay
uint8 (4x less to move than float32); the trainer converts them to float in [0,1] on the
device.
"""

from __future__ import annotations

import io
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import get_worker_info

# a truncated file is bad data, never a half-grey image
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt",)

# image fields of each task's batches, and its text field (None: none)
IMAGE_FIELDS: Dict[str, Tuple[str, ...]] = {
    "recon": ("image",), "t2i": ("image",), "edit": ("input_image", "image")}
TEXT_FIELD: Dict[str, Optional[str]] = {"recon": None, "t2i": "caption", "edit": "instruction"}
# how each task's images become size x size (the one place that decides it):
#   "crop"   a square crop of the shorter side: random in training, plus a random horizontal
#            flip when data.random_flip; centred and unflipped in eval
#   "squash" the whole image resized to the square, aspect ignored: no crop, no flip, no
#            randomness, the same in training and eval. Generation data: a
#            caption or instruction may name what a crop cuts away or a flip mirrors, and
#            an edit's input and output stay aligned whatever their sizes.
FIT: Dict[str, str] = {"recon": "crop", "t2i": "squash", "edit": "squash"}


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
    """Decode to RGB with both sides >= `size` (what a crop of the shorter side and a
    squash alike need), at the coarsest JPEG DCT scale that allows it."""
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
                flip: bool = False) -> Image.Image:
    """Square crop (random when `rng` is given, else centred) of the shorter side,
    resampled to size x size in one call (RGB)."""
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
    return out


def squash(img: Image.Image, size: int) -> Image.Image:
    """The whole image resampled to size x size in one call, aspect ignored (RGB)."""
    return img.resize((size, size), Image.BICUBIC)


def write_chw(img: Image.Image, out: np.ndarray) -> None:
    """Copies an RGB image into a uint8 (3,H,W) array, one plane per channel.

    PIL packs a single band of an RGB image directly ("raw" mode "R"/"G"/"B"), so this
    costs what one HWC copy does, without the HWC -> CHW transpose.
    """
    for c, band in enumerate("RGB"):
        out[c] = np.frombuffer(img.tobytes("raw", band), np.uint8).reshape(out.shape[1:])


def new_image_batch(n: int, size: int) -> torch.Tensor:
    """An uninitialised uint8 (n,3,size,size) tensor; in shared memory inside a loader
    worker (as torch's default_collate does), so sending it to the main process is free."""
    shape = (n, 3, size, size)
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(n * 3 * size * size)
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def _text(sample: dict, what: str) -> str:
    """The stripped caption / instruction, never truncated (the tokenizer does that).
    empty_text: nothing left after stripping whitespace; bad_text: not UTF-8, or only
    control / format / invisible characters (e.g. NULs, zero-width spaces)."""
    raw = _field(sample, "", TEXT_EXTS)
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError as exc:
        raise SampleError("bad_text", f"{what} is not utf-8 ({exc.reason} at byte "
                          f"{exc.start})") from None
    text = text.strip()
    if not text:
        raise SampleError("empty_text", f"empty {what}")
    if not any(c.isprintable() and not c.isspace() for c in text):
        raise SampleError("bad_text", f"{what} has no visible character: {text[:40]!r}")
    return text


class Decoder:
    """Decodes raw samples of one task into slots of uint8 image tensors.

    Each task fits its images to the square as FIT says: crop tasks take random crops in
    training (and flips when `random_flip`), centred ones in eval; squash tasks squash
    the whole image, the same in training and eval (they never draw from the rng).
    """

    def __init__(self, task: str, resolution: int, train: bool = True,
                 random_flip: bool = True, max_caption_chars: int = 0):
        self.task = task
        self.max_caption_chars = max_caption_chars  # 0: no limit
        self.size = resolution
        self.train = train
        self.squash = FIT[task] == "squash"
        self.random = train and not self.squash  # random crops
        self.flip = self.random and random_flip
        self.image_fields = IMAGE_FIELDS[task]
        self.text_field = TEXT_FIELD[task]

    def _image(self, data: bytes, rng: Optional[np.random.Generator], out: np.ndarray) -> None:
        img = load_image(data, self.size)
        if self.squash:
            write_chw(squash(img, self.size), out)
            return
        rng = rng if self.random else None
        flip = self.flip and rng is not None and bool(rng.integers(0, 2))
        write_chw(resize_crop(img, self.size, rng, flip), out)

    def decode_into(self, sample: dict, rng: Optional[np.random.Generator],
                    out: Dict[str, np.ndarray], images: bool = True) -> Optional[str]:
        """Writes the sample's images into `out[field]` ((3,H,W) uint8 arrays) and returns
        its text (None for recon); raises SampleError for bad data (the slots then hold
        garbage, to be overwritten by the next sample). images=False: the text only (a
        t2i / edit sample whose image outputs come from a cache; the slots are left as
        they are)."""
        if self.task == "recon":
            self._image(_field(sample, "", IMAGE_EXTS), rng, out["image"])
            return None
        if self.task == "t2i":
            caption = _text(sample, "caption")  # cheap checks before the decode
            if self.max_caption_chars and len(caption) > self.max_caption_chars:
                raise SampleError("caption_too_long", f"{len(caption)} characters > "
                                  f"data.max_caption_chars={self.max_caption_chars}")
            if images:
                self._image(_field(sample, "", IMAGE_EXTS), rng, out["image"])
            return caption
        instruction = _text(sample, "instruction")
        if not images:
            return instruction
        src = _field(sample, "input.", IMAGE_EXTS)
        dst = _field(sample, "output.", IMAGE_EXTS)
        # input and output are fitted alike (a crop task would draw the same crop twice)
        state = None if rng is None else rng.bit_generator.state
        self._image(src, rng, out["input_image"])
        if state is not None:
            rng.bit_generator.state = state
        self._image(dst, rng, out["image"])
        return instruction

    def __call__(self, sample: dict, rng: Optional[np.random.Generator] = None) -> dict:
        """Decoded fields of one sample: images as uint8 (3,H,W) tensors, text as str."""
        images = {name: torch.empty((3, self.size, self.size), dtype=torch.uint8)
                  for name in self.image_fields}
        text = self.decode_into(sample, rng, {k: v.numpy() for k, v in images.items()})
        fields: dict = dict(images)
        if self.text_field is not None:
            fields[self.text_field] = text
        return fields

    def new_batch(self, capacity: int) -> "BatchBuilder":
        return BatchBuilder(self, capacity)


class BatchBuilder:
    """Fills one task-homogeneous batch of up to `capacity` samples, decoding each sample
    straight into its slot.

    The batch: {"image" (and "input_image"): uint8 (n,3,H,W), "__key__": [str],
    "__task__": str, plus "caption" / "instruction": [str] for t2i / edit}.
    """

    def __init__(self, decoder: Decoder, capacity: int):
        self.decoder = decoder
        self.capacity = capacity
        self.images = {name: new_image_batch(capacity, decoder.size)
                       for name in decoder.image_fields}
        self._arrays = {name: t.numpy() for name, t in self.images.items()}
        self.keys: List[str] = []
        self.texts: List[str] = []

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def full(self) -> bool:
        return len(self.keys) >= self.capacity

    def add(self, sample: dict, rng: Optional[np.random.Generator] = None, images: bool = True) -> None:
        """Decodes `sample` into the next slot (images=False: its text only, see
        Decoder.decode_into); raises SampleError (nothing added)."""
        i = len(self.keys)
        if i >= self.capacity:
            raise IndexError(f"batch is full ({self.capacity} samples)")
        text = self.decoder.decode_into(sample, rng, {k: a[i] for k, a in self._arrays.items()}, images)
        self.keys.append(sample["__key__"])
        if text is not None:
            self.texts.append(text)

    def finish(self) -> Dict[str, object]:
        n = len(self.keys)
        batch: Dict[str, object] = {"__key__": self.keys, "__task__": self.decoder.task}
        for name, t in self.images.items():
            batch[name] = t if n == self.capacity else t[:n].clone()  # short: no spare slots
        if self.decoder.text_field is not None:
            batch[self.decoder.text_field] = self.texts
        return batch
