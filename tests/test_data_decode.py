"""Per-task decoding: reduced-scale JPEG decode, crops and flips (recon), squashes
(t2i / edit), uint8 batches, bad bytes and bad text."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from unilip_ds.data.decode import (FIT, Decoder, SampleError, load_image, resize_crop, squash,
                                   write_chw)
from unilip_ds.data.skips import REASONS


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
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


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


def thirds(h: int = 40, w: int = 120) -> np.ndarray:
    """Red left third, green middle, blue right third."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 3] = (255, 0, 0)
    arr[:, w // 3: 2 * w // 3] = (0, 255, 0)
    arr[:, 2 * w // 3:] = (0, 0, 255)
    return arr


def colour(px) -> str:
    """"r", "g" or "b": the dominant channel of a clean pixel, else "?"."""
    px = np.asarray(px, np.int32)
    top = int(px.argmax())
    return "rgb"[top] if px[top] > 200 and np.delete(px, top).max() < 60 else "?"


def test_center_and_random_crops_of_the_shorter_side():
    img = Image.fromarray(thirds())
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


def test_recon_still_takes_random_crops_in_training_and_centred_ones_in_eval():
    data = encode(thirds(40, 120), "PNG")
    dec = Decoder("recon", 20, train=True, random_flip=False)
    outs = [dec({"__key__": "k", "png": data}, np.random.default_rng(s))["image"]
            for s in range(24)]
    edges = set()
    for o in outs:
        hwc = o.permute(1, 2, 0).numpy()
        left, right = colour(hwc[10, 0]), colour(hwc[10, 19])
        assert {left, right} != {"r", "b"}  # a square crop of a 3:1 image: never both edges
        edges.add((left, right))
    assert len({o.numpy().tobytes() for o in outs}) > 3  # the offset is random
    assert ("r", "g") in edges and ("g", "b") in edges  # both ends are reached
    # deterministic per seed; eval: the centre square, all green
    again = dec({"__key__": "k", "png": data}, np.random.default_rng(0))["image"]
    assert torch.equal(again, outs[0])
    ev = Decoder("recon", 20, train=False)({"png": data})["image"].permute(1, 2, 0).numpy()
    assert {colour(ev[10, x]) for x in range(20)} == {"g"}


def test_t2i_never_flips_and_keeps_caption():
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:, :16] = 255
    dec = Decoder("t2i", 32, train=True, random_flip=True)
    sample = {"__key__": "k", "png": encode(arr, "PNG"), "txt": b"  a dog on the left \n"}
    for s in range(8):
        out = dec(sample, np.random.default_rng(s))
        assert out["image"][0, 16, 2] == 255
        assert out["caption"] == "a dog on the left"


def test_fit_table_squashes_generation_data_only():
    assert FIT == {"recon": "crop", "t2i": "squash", "edit": "squash"}


@pytest.mark.parametrize("task", ["t2i", "edit"])
@pytest.mark.parametrize("shape", [(40, 120), (120, 40)], ids=["wide", "tall"])
def test_generation_images_are_squashed_whole_without_randomness(task, shape):
    arr = thirds(*shape) if shape[1] > shape[0] else thirds(*shape[::-1]).transpose(1, 0, 2)
    data = encode(arr, "PNG")
    sample = {"__key__": "k", "txt": b"red left, blue right"}
    sample.update({"png": data} if task == "t2i" else {"input.png": data, "output.png": data})
    field = "image"
    train = Decoder(task, 30, train=True, random_flip=True)
    outs = [train(sample, np.random.default_rng(s))[field] for s in range(12)]
    outs.append(train(sample, None)[field])
    outs.append(Decoder(task, 30, train=False)(sample)[field])
    # no crop, no flip, no randomness: every seed, no rng and eval give the same pixels
    assert all(torch.equal(o, outs[0]) for o in outs)
    hwc = outs[0].permute(1, 2, 0).numpy()
    ref = np.asarray(squash(Image.fromarray(arr), 30))
    assert np.array_equal(hwc, ref)
    # the whole image is there: both edges and the middle (a square crop loses an edge)
    if shape[1] > shape[0]:
        assert [colour(hwc[15, x]) for x in (0, 15, 29)] == ["r", "g", "b"]
        assert {colour(hwc[y, 0]) for y in range(30)} == {"r"}
    else:
        assert [colour(hwc[y, 15]) for y in (0, 15, 29)] == ["r", "g", "b"]
    # the rng is never drawn from: the caller's stream of randoms is untouched
    rng = np.random.default_rng(5)
    train(sample, rng)
    assert rng.integers(0, 1 << 30) == np.random.default_rng(5).integers(0, 1 << 30)


def test_squash_decodes_jpeg_at_reduced_scale_keeping_both_sides():
    for h, w in [(1024, 1536), (1536, 1024), (256, 2048)]:
        data = encode(smooth(h, w), quality=95)
        img = load_image(data, 224)
        assert min(img.size) >= 224  # both sides: a squash needs every row and column
        got = Decoder("t2i", 224, train=False)({"jpg": data, "txt": b"x"})["image"]
        full = Image.open(io.BytesIO(data)).convert("RGB")
        ref = np.asarray(full.resize((224, 224), Image.BICUBIC))
        assert psnr(got.permute(1, 2, 0).numpy(), ref) > 35, (h, w)
    # the reduced decode happens: 1/4 for 1024 x 1536, none when a side is already small
    assert load_image(encode(smooth(1024, 1536)), 224).size == (384, 256)
    assert load_image(encode(smooth(256, 2048)), 224).size == (2048, 256)


def test_edit_input_and_output_are_squashed_alike():
    # output = the input mirrored, stored at another size (edit outputs may differ)
    arr = thirds(40, 120)
    src = encode(arr, "PNG")
    dst = encode(np.asarray(Image.fromarray(arr[:, ::-1]).resize((240, 60), Image.NEAREST)),
                 "PNG")
    dec = Decoder("edit", 24, train=True)
    outs = [dec({"__key__": "k", "input.png": src, "output.png": dst, "txt": b"flip it"},
                np.random.default_rng(s)) for s in range(6)]
    for out in outs:
        assert torch.equal(out["input_image"], outs[0]["input_image"])
        assert torch.equal(out["image"], outs[0]["image"])
    inp = outs[0]["input_image"].permute(1, 2, 0).numpy()
    res = outs[0]["image"].permute(1, 2, 0).numpy()
    assert [colour(inp[12, x]) for x in (0, 12, 23)] == ["r", "g", "b"]
    assert [colour(res[12, x]) for x in (0, 12, 23)] == ["b", "g", "r"]
    # pixel-aligned: the output is the input mirrored, up to resampling at the borders
    diff = np.abs(res[:, ::-1].astype(int) - inp.astype(int))
    assert np.median(diff) == 0 and diff.mean() < 8
    data = encode(smooth(48, 96), "PNG")
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


def test_missing_fields_empty_and_bad_text():
    img = encode(smooth(16, 16), "PNG")
    t2i, edit = Decoder("t2i", 8), Decoder("edit", 8)
    pair = {"input.png": img, "output.png": img}
    cases = [
        (Decoder("recon", 8), {"__key__": "k", "txt": b"caption only"}, "missing_key"),
        (t2i, {"__key__": "k", "png": img}, "missing_key"),
        (t2i, {"__key__": "k", "png": img, "txt": b" \n\t"}, "empty_text"),
        (t2i, {"__key__": "k", "png": img, "txt": b"\xff\xfe"}, "bad_text"),
        (t2i, {"__key__": "k", "png": img, "txt": b"a cat \xe9t\xe9"}, "bad_text"),  # latin-1
        (t2i, {"__key__": "k", "png": img, "txt": b"\x00\x00\x00"}, "bad_text"),
        (t2i, {"__key__": "k", "png": img, "txt": b" \x07\x1b\x7f \n"}, "bad_text"),
        (t2i, {"__key__": "k", "png": img,
               "txt": "\u200b\ufeff\u200d".encode()}, "bad_text"),  # zero-width only
        (edit, {"__key__": "k", "input.png": img, "txt": b"x"}, "missing_key"),
        (edit, {"__key__": "k", "output.png": img, "txt": b"x"}, "missing_key"),
        (edit, {"__key__": "k", "txt": b"x"}, "missing_key"),
        (edit, {"__key__": "k", **pair}, "missing_key"),
        (edit, {"__key__": "k", **pair, "txt": b""}, "empty_text"),
        (edit, {"__key__": "k", **pair, "txt": b"\xc3\x28"}, "bad_text"),
        (edit, {"__key__": "k", **pair, "txt": b"\x00\t\x01"}, "bad_text"),
    ]
    for dec, sample, reason in cases:
        with pytest.raises(SampleError) as err:
            dec(sample, None)
        assert err.value.reason == reason, sample
        assert reason in REASONS
    # usable text is kept whole: stripped, never truncated or otherwise altered
    long = ("a very long caption " * 500).strip()
    for txt in (long, "一只猫 🐱", "a\x00b", "\u200bzero-width first"):
        out = t2i({"__key__": "k", "png": img, "txt": f"  {txt}\n".encode()})
        assert out["caption"] == txt
