"""Per-task decoding: reduced-scale JPEG decode, crops, flips, uint8 batches, bad bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from unilip_ds.data.decode import Decoder, SampleError, load_image, resize_crop, write_chw


def encode(arr: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def smooth(h: int, w: int) -> np.ndarray:
    """A smooth colour ramp: resampling differences show up as real errors."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w, y / h, 0.5 + 0.5 * np.sin(x / 97.0 + y / 61.0)], -1)
    return (img * 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / mse)


def test_large_jpeg_is_decoded_at_reduced_scale():
    data = encode(smooth(1024, 1536), quality=95)
    img = load_image(data, 224)
    # 1/4 DCT scale: 256 x 384, the coarsest keeping the shorter side >= 224
    assert img.size == (384, 256) and img.mode == "RGB"
    assert load_image(data, 300).size == (768, 512)  # 1/2: 1/4 would be too small
    # the reduced decode is as good as a full decode + resize
    fast = np.asarray(resize_crop(img, 224, None))
    full = Image.open(io.BytesIO(data)).convert("RGB")
    ref = np.asarray(full.resize((224, 224), Image.BICUBIC, box=(256, 0, 1280, 1024)))
    assert fast.shape == (224, 224, 3) and fast.dtype == np.uint8
    assert psnr(fast, ref) > 35


def test_center_and_random_crops_of_the_shorter_side():
    arr = np.zeros((40, 120, 3), np.uint8)
    arr[:, :40] = (255, 0, 0)     # left third red
    arr[:, 40:80] = (0, 255, 0)   # middle green
    arr[:, 80:] = (0, 0, 255)     # right blue
    img = Image.fromarray(arr)
    center = np.asarray(resize_crop(img, 20, None))
    assert center.shape == (20, 20, 3)
    assert (center[..., 1] > 200).all() and (center[..., 0] < 50).all()
    # random crops cover the whole range of offsets, deterministically per seed
    crops = [np.asarray(resize_crop(img, 20, np.random.default_rng(s))) for s in range(40)]
    lefts = {tuple(c[10, 0]) for c in crops}
    assert len(lefts) > 3
    again = [np.asarray(resize_crop(img, 20, np.random.default_rng(s))) for s in range(40)]
    assert all(np.array_equal(a, b) for a, b in zip(crops, again))


def test_write_chw_is_the_transposed_image():
    arr = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    out = np.zeros((3, 12, 20), np.uint8)
    write_chw(Image.fromarray(arr), out)
    assert np.array_equal(out, arr.transpose(2, 0, 1))


def test_recon_batch_layout_and_flips():
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:, :16] = 255  # left half white
    arr[:, :, 2] = 77  # blue constant: channel order is visible
    dec = Decoder("recon", 32, train=True, random_flip=True)
    sample = {"__key__": "k", "png": encode(arr, "PNG")}
    outs = [dec(sample, np.random.default_rng(s))["image"] for s in range(16)]
    assert outs[0].dtype == torch.uint8 and outs[0].shape == (3, 32, 32)
    assert (outs[0][2] == 77).all()
    flipped = [o[0, 16, 2] < 128 for o in outs]  # left edge dark => flipped
    assert any(flipped) and not all(flipped)
    # a batch: uint8 (B,3,H,W), each slot exactly what the single-sample decode gives
    batch_of = dec.new_batch(3)
    for s, key in enumerate("abc"):
        batch_of.add({**sample, "__key__": key}, np.random.default_rng(s))
    assert batch_of.full
    batch = batch_of.finish()
    img = batch["image"]
    assert img.dtype == torch.uint8 and img.shape == (3, 3, 32, 32) and img.is_contiguous()
    assert all(torch.equal(img[i], outs[i]) for i in range(3))
    assert batch["__key__"] == ["a", "b", "c"] and batch["__task__"] == "recon"
    assert set(batch) == {"image", "__key__", "__task__"}
    with pytest.raises(IndexError):
        batch_of.add(sample)
    # eval: centred, never flipped, no rng needed
    ev = Decoder("recon", 32, train=False)(sample)["image"]
    assert ev[0, 16, 2] == 255


def test_t2i_never_flips_and_keeps_caption():
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:, :16] = 255
    dec = Decoder("t2i", 32, train=True, random_flip=True)
    sample = {"__key__": "k", "png": encode(arr, "PNG"), "txt": b"  a dog on the left \n"}
    for s in range(8):
        out = dec(sample, np.random.default_rng(s))
        assert out["image"][0, 16, 2] == 255
        assert out["caption"] == "a dog on the left"


def test_edit_input_and_output_share_the_crop():
    arr = smooth(48, 96)
    data = encode(arr, "PNG")
    dec = Decoder("edit", 24, train=True)
    out = dec({"__key__": "k", "input.png": data, "output.png": data, "txt": b"make it red"},
              np.random.default_rng(3))
    assert torch.equal(out["input_image"], out["image"])
    assert out["instruction"] == "make it red"
    builder = dec.new_batch(2)
    for key in "ab":
        builder.add({"__key__": key, "input.png": data, "output.png": data, "txt": b"red"})
    batch = builder.finish()
    assert batch["input_image"].shape == batch["image"].shape == (2, 3, 24, 24)
    assert batch["input_image"].dtype == batch["image"].dtype == torch.uint8
    assert batch["instruction"] == ["red"] * 2 and batch["__task__"] == "edit"


def test_a_failed_sample_leaves_the_batch_unchanged():
    good = encode(smooth(40, 40), "PNG")
    dec = Decoder("t2i", 16, train=False)
    builder = dec.new_batch(4)
    builder.add({"__key__": "a", "png": good, "txt": b"one"})
    with pytest.raises(SampleError):
        builder.add({"__key__": "bad", "png": b"junk", "txt": b"two"})
    builder.add({"__key__": "c", "png": good, "txt": b"three"})
    batch = builder.finish()  # short: only the two good samples
    assert batch["__key__"] == ["a", "c"] and batch["caption"] == ["one", "three"]
    assert batch["image"].shape == (2, 3, 16, 16)
    assert torch.equal(batch["image"][1], dec({"png": good, "txt": b"x"})["image"])


def test_grayscale_and_cmyk_become_rgb():
    gray = encode(smooth(40, 40)[..., 0], "JPEG")
    assert load_image(gray, 16).mode == "RGB"
    buf = io.BytesIO()
    Image.fromarray(smooth(40, 40)).convert("CMYK").save(buf, "JPEG")
    assert resize_crop(load_image(buf.getvalue(), 16), 16, None).size == (16, 16)


@pytest.mark.parametrize("data", [
    b"definitely not an image",
    b"",
], ids=["junk", "empty"])
def test_non_image_bytes_are_bad_image(data):
    with pytest.raises(SampleError) as err:
        Decoder("recon", 16)({"__key__": "k", "jpg": data}, None)
    assert err.value.reason == "bad_image"


def test_truncated_jpeg_is_bad_image():
    data = encode(smooth(256, 256), quality=90)
    with pytest.raises(SampleError) as err:
        load_image(data[: len(data) // 2], 64)
    assert err.value.reason == "bad_image"


def test_missing_fields_and_empty_text():
    img = encode(smooth(16, 16), "PNG")
    cases = [
        (Decoder("recon", 8), {"__key__": "k", "txt": b"caption only"}, "missing_key"),
        (Decoder("t2i", 8), {"__key__": "k", "png": img}, "missing_key"),
        (Decoder("t2i", 8), {"__key__": "k", "png": img, "txt": b" \n\t"}, "empty_text"),
        (Decoder("t2i", 8), {"__key__": "k", "png": img, "txt": b"\xff\xfe"}, "empty_text"),
        (Decoder("edit", 8), {"__key__": "k", "input.png": img, "txt": b"x"}, "missing_key"),
        (Decoder("edit", 8), {"__key__": "k", "input.png": img, "output.png": img,
                              "txt": b""}, "empty_text"),
    ]
    for dec, sample, reason in cases:
        with pytest.raises(SampleError) as err:
            dec(sample, None)
        assert err.value.reason == reason, sample.keys()
