"""data_prep: raw samples -> validated, de-duplicated, evenly sized shards + manifest."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_prep import sharding
from data_prep.sharding import PrepConfig, run
from data_prep.sources import PrepError
from unilip_ds.data import sample_images
from unilip_ds.data.shards import list_shards, read_manifest

REPO = Path(__file__).resolve().parents[1]


def _members(shard: str):
    """{key: {ext: bytes}} of a shard, in order."""
    out = {}
    with tarfile.open(shard) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def _all_samples(dst):
    samples = {}
    for url in list_shards([str(Path(dst) / "manifest.json")]):
        samples.update(_members(url))
    return samples


def _snapshot(root: Path, exclude: Path):
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and exclude not in p.parents}


def test_folder_to_even_shards_with_manifest(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    keys = sample_images.write_caption_folder(src, count=29, size=64)
    before = _snapshot(tmp_path, dst)
    m = run(PrepConfig(srcs=[str(src)], dst=str(dst), shard_samples=8, workers=1,
                       progress=False))
    assert _snapshot(tmp_path, dst) == before  # nothing written outside --dst
    assert sorted(os.listdir(dst)) == ["manifest.json"] + [f"shard-{i:06d}.tar" for i in range(4)]
    assert m.complete and m.samples == 29 and m.skipped == {}
    assert [s.samples for s in m.shards] == [8, 7, 7, 7]  # 29 in 4 shards, sizes differ <= 1
    for s in m.shards:
        data = (dst / s.name).read_bytes()
        assert len(data) == s.bytes and hashlib.sha256(data).hexdigest() == s.sha256
    assert read_manifest(str(dst / "manifest.json")).to_json() == m.to_json()
    samples = _all_samples(dst)
    assert len(samples) == 29
    captions = {k: (src / f"{k}.txt").read_text().strip() for k in keys}
    for key, parts in samples.items():
        assert set(parts) == {"jpg", "txt", "json"}
        source_key = Path(json.loads(parts["json"])["source"]).name
        assert parts["txt"].decode() == captions[source_key]
        # not resized: the original JPEG bytes; the key is the hash of (image, caption)
        original = (src / f"{source_key}.jpg").read_bytes()
        assert parts["jpg"] == original
        sha = lambda b: hashlib.sha256(b).digest()  # noqa: E731
        assert key == hashlib.sha256(sha(original) + sha(parts["txt"])).hexdigest()[:16]


def _jpeg(im, **kw):
    return sample_images.jpeg_bytes(im, **kw)


def test_bad_inputs_are_skipped_and_counted(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    sample_images.write_caption_folder(src, count=10, size=64)
    good = (src / "astronaut_00000.jpg").read_bytes()
    png = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(png, format="PNG")
    bad = {
        "trunc.jpg": good[: len(good) // 2], "trunc.txt": b"a truncated jpeg",
        "noimg.jpg": b"this is not an image", "noimg.txt": b"text bytes",
        "nocap.jpg": _jpeg(Image.new("RGB", (32, 32), (1, 2, 3))),
        "empty.jpg": _jpeg(Image.new("RGB", (32, 32), (4, 5, 6))), "empty.txt": b"  \n\t",
        "latin.jpg": _jpeg(Image.new("RGB", (32, 32), (7, 8, 9))), "latin.txt": b"caf\xe9",
        "orphan.txt": b"a caption without image",
        "tiny.jpg": _jpeg(Image.new("RGB", (8, 8))), "tiny.txt": b"too small",
        "zdup.jpg": good, "zdup.txt": (src / "astronaut_00000.txt").read_bytes(),
        # the same image with another caption is another sample (the reference keeps it)
        "zother.jpg": good, "zother.txt": b"the same astronaut, captioned again",
        "png.png": png.getvalue(), "png.txt": b"a red png",
    }
    for name, data in bad.items():
        (src / name).write_bytes(data)
    # a BLIP3o-style tar whose 4th member header is corrupt: 1 sample read, rest lost
    tars = sample_images.write_caption_tars(tmp_path / "tars", count=5, per_tar=5, size=56,
                                            seed=1)
    with tarfile.open(tars[0]) as tar:
        offset = tar.getmembers()[3].offset
    with open(tars[0], "r+b") as f:
        f.seek(offset + 148)  # the header checksum field
        f.write(b"garbage!")
    m = run(PrepConfig(srcs=[str(src), str(tmp_path / "tars")], dst=str(dst),
                       shard_samples=100, workers=1, progress=False, max_skip_rate=0.5))
    assert m.skipped == {"bad_image": 2, "missing_caption": 1, "empty_caption": 1,
                         "bad_caption": 1, "missing_image": 1, "small_image": 1,
                         "duplicate": 1, "corrupt_tar": 1}
    samples = _all_samples(dst)
    assert m.samples == len(samples) == 10 + 1 + 1 + 1  # folder + other caption + png + tar
    png_sample = [p for p in samples.values() if p["txt"] == b"a red png"][0]
    assert Image.open(io.BytesIO(png_sample["jpg"])).format == "JPEG"  # re-encoded


def test_resize_reencodes_only_large_images(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    sample_images.write_caption_folder(src, count=6, size=None)  # 300..1411 px photos
    small = Image.new("RGB", (100, 50), (10, 200, 30))
    (src / "small.jpg").write_bytes(_jpeg(small))
    (src / "small.txt").write_text("a small green image")
    m = run(PrepConfig(srcs=[str(src)], dst=str(dst), resize=256, workers=1, progress=False))
    samples = _all_samples(dst)
    assert m.samples == 7
    for parts in samples.values():
        im = Image.open(io.BytesIO(parts["jpg"]))
        assert max(im.size) <= 256 and im.format == "JPEG"
        if parts["txt"] == b"a small green image":
            assert parts["jpg"] == (src / "small.jpg").read_bytes()
        else:
            assert max(im.size) == 256


def test_resumable_and_deterministic(tmp_path, monkeypatch):
    src = tmp_path / "src"
    sample_images.write_caption_folder(src, count=40, size=48)
    one = run(PrepConfig(srcs=[str(src)], dst=str(tmp_path / "one"), shard_samples=5,
                         workers=1, progress=False))
    # 2 worker processes give the same bytes
    two = run(PrepConfig(srcs=[str(src)], dst=str(tmp_path / "two"), shard_samples=5,
                         workers=2, progress=False))
    assert [(s.name, s.sha256) for s in one.shards] == [(s.name, s.sha256) for s in two.shards]

    # an interrupted run (dies after 3 shards) ...
    dst = tmp_path / "dst"
    cfg = PrepConfig(srcs=[str(src)], dst=str(dst), shard_samples=5, workers=1, progress=False)
    real_write, calls = sharding.write_shard, []

    def dying_write(task):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(task[0].name)
        return real_write(task)

    monkeypatch.setattr(sharding, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    partial = read_manifest(str(dst / "manifest.json"))
    assert not partial.complete and [s.name for s in partial.shards] == calls
    with pytest.raises(Exception, match="incomplete"):
        list_shards([str(dst / "manifest.json")])
    assert (dst / "_staging").is_dir()

    # ... is finished by a re-run that keeps the 3 verified shards and validates nothing
    monkeypatch.setattr(sharding, "write_shard", lambda t: calls.append(t[0].name) or
                        real_write(t))
    monkeypatch.setattr(sharding, "process_unit", lambda t: pytest.fail("re-validated"))
    mtimes = {n: (dst / n).stat().st_mtime_ns for n in calls}
    done = run(cfg)
    assert done.complete and done.to_json() == one.to_json().replace(
        str(tmp_path / "one"), str(dst))
    assert calls[3:] == [s.name for s in one.shards[3:]]
    assert {n: (dst / n).stat().st_mtime_ns for n in mtimes} == mtimes
    assert not (dst / "_staging").exists()

    # a damaged and a deleted shard are found by the manifest and rebuilt from the source
    monkeypatch.setattr(sharding, "process_unit", real_process_unit)
    with open(dst / "shard-000001.tar", "r+b") as f:
        f.seek(600)
        f.write(b"X")
    os.remove(dst / "shard-000005.tar")
    calls.clear()
    again = run(cfg)
    assert sorted(calls) == ["shard-000001.tar", "shard-000005.tar"]
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in one.shards]
    calls.clear()
    run(cfg)  # complete and verified: nothing to do
    assert calls == []


real_process_unit = sharding.process_unit


def test_refuses_other_settings_and_overlap(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    sample_images.write_caption_folder(src, count=3, size=32)
    run(PrepConfig(srcs=[str(src)], dst=str(dst), shard_samples=2, workers=1, progress=False))
    with pytest.raises(PrepError, match=r"\(shard_samples 2 -> 3\); rerun with the same ones, or add --restart"):
        run(PrepConfig(srcs=[str(src)], dst=str(dst), shard_samples=3, workers=1,
                       progress=False))
    with pytest.raises(PrepError, match="overlaps --src"):
        run(PrepConfig(srcs=[str(tmp_path)], dst=str(dst), workers=1, progress=False))
    with pytest.raises(PrepError, match="no such file"):
        run(PrepConfig(srcs=[str(tmp_path / "nope")], dst=str(tmp_path / "d2"), workers=1,
                       progress=False))


def test_edit_json_to_shards(tmp_path):
    src = sample_images.write_edit_folder(tmp_path / "raw", count=9, size=48)
    records = json.loads(src.read_text())
    records.append({"input": "images/missing.jpg", "output": records[0]["output"],
                    "instruction": "edit a missing image"})
    records.append({"input": records[1]["input"], "output": records[1]["output"],
                    "instruction": ""})
    src.write_text(json.dumps(records))
    m = run(PrepConfig(srcs=[str(src)], dst=str(tmp_path / "dst"), kind="edit",
                       shard_samples=4, workers=1, progress=False, max_skip_rate=0.2))
    assert m.kind == "edit" and m.samples == 9 and [s.samples for s in m.shards] == [3, 3, 3]
    assert m.skipped == {"missing_input_image": 1, "empty_instruction": 1}
    got = set()
    for parts in _all_samples(tmp_path / "dst").values():
        assert set(parts) == {"input.jpg", "output.jpg", "txt", "json"}
        got.add((parts["input.jpg"], parts["output.jpg"], parts["txt"].decode()))
    expected = {((src.parent / r["input"]).read_bytes(), (src.parent / r["output"]).read_bytes(),
                 r["instruction"]) for r in records[:9]}
    assert got == expected


def test_cli_to_s3_and_back(tmp_path, s3_server):
    """The real entry point, writing to the SeaweedFS server; streams list it back."""
    src = tmp_path / "raw"
    sample_images.write_caption_tars(src, count=12, per_tar=4, size=48)
    dst = f"s3://{s3_server.bucket}/cli_t2i"
    cmd = [sys.executable, str(REPO / "data_prep" / "shard_blip3o.py"), "--src", str(src),
           "--dst", dst, "--shard-size", "5", "--workers", "2", "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["shards"] == 3 and summary["samples"] == 12
    assert s3_server.secret_key not in out.stdout + out.stderr
    urls = list_shards([f"{dst}/manifest.json"])
    assert urls == [f"{dst}/shard-{i:06d}.tar" for i in range(3)]
    fs = s3_server.client()
    assert sorted(fs.find(f"{s3_server.bucket}/cli_t2i")) == sorted(
        [u[len("s3://"):] for u in urls] + [f"{s3_server.bucket}/cli_t2i/manifest.json"])
    # re-run: verified from the manifest, nothing rewritten
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    # a bad argument is one error line
    bad = subprocess.run([sys.executable, str(REPO / "data_prep" / "shard_edit.py"), "--src",
                          str(tmp_path / "missing"), "--dst", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: --src {tmp_path / 'missing'}: no such file, directory or prefix"]
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


def _rgb(data: bytes):
    import numpy as np

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def _psnr(a, b) -> float:
    import numpy as np

    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


FLIPS = {"flip the image horizontally": lambda a: a[:, ::-1],
         "turn the image upside down": lambda a: a[::-1]}


def test_flip_edit_folder_is_deterministic_and_exact(tmp_path):
    src = sample_images.write_edit_pairs_folder(tmp_path / "a", count=40, size=32, seed=3)
    assert src == tmp_path / "a" / "edits.json"
    records = json.loads(src.read_text())
    assert len(records) == 40 and len({r["id"] for r in records}) == 40
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["edits.json", "images"]
    assert len(list((tmp_path / "a" / "images").iterdir())) == 80
    by_text = {}
    for r in records:
        assert set(r) == {"id", "input", "output", "instruction"}
        by_text.setdefault(r["instruction"], []).append(r)
        inp, out = (_rgb((src.parent / r[k]).read_bytes()) for k in ("input", "output"))
        assert inp.shape == out.shape == (32, 32, 3)
        want = FLIPS[r["instruction"]](inp)
        assert _psnr(out, want) > 30  # the edit, up to JPEG noise
        assert _psnr(out, want) > _psnr(out, inp) + 3  # and not a copy of the input
    assert set(by_text) == set(FLIPS) and min(len(v) for v in by_text.values()) >= 10
    # a photo's variants get either edit: the instruction is what tells them apart
    stems = {t: {r["id"].rsplit("_", 1)[0] for r in v} for t, v in by_text.items()}
    assert set.intersection(*stems.values())
    # the same arguments write the same bytes; another seed draws other edits
    again = sample_images.write_edit_pairs_folder(tmp_path / "b", count=40, size=32, seed=3)
    assert again.read_text() == src.read_text()
    for r in records:
        for k in ("input", "output"):
            assert (again.parent / r[k]).read_bytes() == (src.parent / r[k]).read_bytes()
    other = json.loads(sample_images.write_edit_pairs_folder(
        tmp_path / "c", count=40, size=32, seed=4).read_text())
    assert [r["instruction"] for r in other] != [r["instruction"] for r in records]
    only_h = json.loads(sample_images.write_edit_pairs_folder(
        tmp_path / "d", count=6, size=32, vertical=False).read_text())
    assert {r["instruction"] for r in only_h} == {"flip the image horizontally"}


# ITU-R 601-2 luma, as PIL's "L" conversion documents it
COLOURS = {"invert the colours": lambda a: 255.0 - a,
           "make the image black and white": lambda a: (a @ [0.299, 0.587, 0.114])[..., None].repeat(3, -1)}


def test_colour_edit_folder_is_exact_and_keeps_the_layout(tmp_path):
    src = sample_images.write_edit_pairs_folder(tmp_path / "a", count=24, size=32, seed=3,
                                                edits=sample_images.COLOUR_EDITS)
    records = json.loads(src.read_text())
    assert {r["instruction"] for r in records} == set(COLOURS)
    for r in records:
        inp, out = (_rgb((src.parent / r[k]).read_bytes()) for k in ("input", "output"))
        want = COLOURS[r["instruction"]](inp)
        assert _psnr(out, want) > 30  # the edit, up to JPEG noise
        if r["instruction"] == "invert the colours":  # (a grey photo is its own black and white)
            assert _psnr(out, want) > _psnr(out, inp) + 3


def test_flip_edit_folder_through_shard_edit_cli_and_decoder(tmp_path):
    import numpy as np

    from unilip_ds.data.decode import Decoder

    raw, dst = tmp_path / "raw", tmp_path / "dst"
    sample_images.write_edit_pairs_folder(raw, count=25, size=48, seed=0)
    cmd = [sys.executable, str(REPO / "data_prep" / "shard_edit.py"), "--src", str(raw),
           "--dst", str(dst), "--shard-size", "10", "--workers", "1", "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    m = read_manifest(str(dst / "manifest.json"))
    assert m.kind == "edit" and m.samples == 25 and m.skipped == {}
    samples = _all_samples(dst)
    assert len(samples) == 25
    dec = Decoder("edit", 48, train=True)
    texts = set()
    for key, parts in samples.items():
        assert set(parts) == {"input.jpg", "output.jpg", "txt", "json"}
        text = parts["txt"].decode()
        texts.add(text)
        got = dec({"__key__": key, **parts}, np.random.default_rng(0))
        assert got["instruction"] == text
        inp = got["input_image"].permute(1, 2, 0).numpy().astype(np.float64)
        res = got["image"].permute(1, 2, 0).numpy().astype(np.float64)
        assert _psnr(res, FLIPS[text](inp)) > 30
    assert texts == set(FLIPS)
