"""data_prep on tiny replicas of the data sets as published: GPT-Image-Edit-1.5M's task-folder
tree (and its split .tar.gz archives), the reference's LLaVA-style jsons + list file,
ShareGPT-4o-Image's jsons with the images inside part tars; resume hazards; the skip
threshold; the memory of the plan step."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import sharding
from data_prep.sharding import PrepConfig, SkipRateError, main, run
from data_prep.sources import PrepError
from unilip_ds.data.shards import list_shards, read_manifest

REPO = Path(__file__).resolve().parents[1]
EDIT_DOC = "edit"


def _color(i: int, role: str):
    """A distinct colour per (sample, role), far apart so a JPEG round trip keeps it."""
    rng = np.random.default_rng(i * 2 + (role == "output"))
    return tuple(int(c) for c in rng.integers(20, 236, 3))


def _png(color, size=(40, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _mean(data: bytes):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float64).mean((0, 1))


def _samples(dst: Path):
    """[{ext: bytes}] of all shards, through the manifest."""
    out = []
    for url in list_shards([str(dst / "manifest.json")]):
        with tarfile.open(url) as tar:
            cur = {}
            for m in tar:
                key, ext = m.name.split(".", 1)
                cur.setdefault(key, {})[ext] = tar.extractfile(m).read()
            out += list(cur.values())
    return out


def _edit_triples(dst: Path):
    """{instruction: (input colour, output colour)} of an edit set's shards."""
    got = {}
    for s in _samples(dst):
        assert set(s) == {"input.jpg", "output.jpg", "txt", "json"}
        assert Image.open(io.BytesIO(s["input.jpg"])).format == "JPEG"
        got[s["txt"].decode()] = (_mean(s["input.jpg"]), _mean(s["output.jpg"]))
    return got


def _assert_pairs(got, want):
    assert sorted(got) == sorted(want)
    for text, (cin, cout) in want.items():
        gin, gout = got[text]
        assert np.abs(gin - cin).max() < 4 and np.abs(gout - cout).max() < 4, text


# --------------------------------------------------------------- GPT-Image-Edit-1.5M

TASKS = {"hqedit": ("edit", "generate"), "omniedit": ("addition", "swap"), "ultraedit": ("edit",)}


def _write_gpt_edit(root: Path, per_task: int = 2):
    """gpt-edit/<src>/<task>/{input,output,metadata/<src>_<task>.json}; returns
    {instruction: (input colour, output colour)}."""
    want, i = {}, 0
    for src, tasks in TASKS.items():
        for task in tasks:
            folder = root / src / task
            (folder / "input").mkdir(parents=True)
            (folder / "output").mkdir()
            (folder / "metadata").mkdir()
            recs = []
            for _ in range(per_task):
                rid = f"{src}_{task}_{i:05d}"
                (folder / "input" / f"{rid}.png").write_bytes(_png(_color(i, "input")))
                (folder / "output" / f"{rid}.png").write_bytes(_png(_color(i, "output")))
                text = f"{task} number {i} of {src}"
                recs.append({"id": rid, "dataset_source": src, "task": task,
                             "input": f"input/{rid}.png", "output": f"output/{rid}.png",
                             "instruction": text})
                want[text] = (np.array(_color(i, "input")), np.array(_color(i, "output")))
                i += 1
            (folder / "metadata" / f"{src}_{task}.json").write_text(json.dumps(recs, indent=1))
    return want


def _readme_extract(root: Path) -> str:
    """The README's GPT-Image-Edit extract command, with its /raw folder replaced."""
    lines = [ln.strip() for ln in (REPO / "README.md").read_text().splitlines()
             if "tar -xzf -" in ln and ln.startswith("    ")]
    assert len(lines) == 1, lines
    return lines[0].replace("/raw/", f"{root}/")


def test_gpt_image_edit_archives_and_task_folders(tmp_path):
    # the published archives: <src>.tar.gz split into .partNNN pieces
    tree = tmp_path / "tree"
    want = _write_gpt_edit(tree)
    pub = tmp_path / "raw" / "GPT-Image-Edit-1.5M" / "gpt-edit"
    pub.mkdir(parents=True)
    for src in TASKS:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(tree / src, arcname=src)
        data = buf.getvalue()
        step = len(data) // 3 + 1
        for k in range(3):
            (pub / f"{src}.tar.gz.part{k:03d}").write_bytes(data[k * step:(k + 1) * step])
    # pointed at the archives alone: one line saying how to extract them
    with pytest.raises(PrepError, match=r"no metadata json; extract them first: .*tar -xzf -"):
        run(PrepConfig(srcs=[str(pub)], dst=str(tmp_path / "no"), kind="edit", workers=1,
                       progress=False))
    # the README's extract command, as written; one source folder reached by a symlink
    subprocess.run(["bash", "-c", _readme_extract(tmp_path / "raw")], check=True)
    elsewhere = tmp_path / "other_disk"
    elsewhere.mkdir()
    os.rename(pub / "ultraedit", elsewhere / "ultraedit")
    os.symlink(elsewhere / "ultraedit", pub / "ultraedit")
    dst = tmp_path / "shards"
    rc = main("edit", EDIT_DOC, ["--src", str(pub), "--dst", str(dst), "--shard-size", "4",
                                 "--workers", "2", "--no-progress"])
    assert rc == 0
    m = read_manifest(str(dst / "manifest.json"))
    assert m.complete and m.kind == "edit" and m.samples == 10 and m.skipped == {}
    assert [s.samples for s in m.shards] == [4, 3, 3]
    _assert_pairs(_edit_triples(dst), want)  # every task folder, paths resolved in it


# ------------------------------------------------------- the reference's LLaVA jsons

def _llava(rid: str, text: str, images=None):
    return {"id": rid, "image": images or [f"input/{rid}.png", f"output/{rid}.png"],
            "conversations": [{"from": "human", "value": f"<image>\n{text}\n"},
                              {"from": "gpt", "value": "<image>"}]}


def test_llava_jsons_and_list_file(tmp_path):
    root = tmp_path / "GPT-Image-Edit-1.5M"
    want = _write_gpt_edit(root / "gpt-edit", per_task=2)
    (root / "training_json").mkdir()
    lines, expect = [], {}
    for src, tasks in TASKS.items():
        for task in tasks:
            meta = json.loads((root / "gpt-edit" / src / task / "metadata" /
                               f"{src}_{task}.json").read_text())
            recs = []
            for r in meta:
                text = f"LLaVA {r['instruction']}"
                recs.append(_llava(r["id"], f"  {text}"))
                expect[text] = want[r["instruction"]]
            # a multi-turn record (3 images): dropped, as convert_gpt_edit.py does
            recs.append(_llava("multi", "two edits", [meta[0]["input"], meta[0]["output"],
                                                      meta[1]["output"]]))
            name = f"training_json/{src}_gpt_{task}.json"
            if src == "omniedit":  # JSON Lines in a .json
                (root / name).write_text("\n".join(json.dumps(r) for r in recs) + "\n")
            else:
                (root / name).write_text(json.dumps(recs))
            lines.append(f"gpt-edit/{src}/{task},{name},false")
    (root / "gptedit.txt").write_text("\n".join(lines) + "\n")
    dst = tmp_path / "shards"
    m = run(PrepConfig(srcs=[str(root / "gptedit.txt")], dst=str(dst), kind="edit",
                       shard_samples=100, workers=1, progress=False))
    assert m.samples == 10 and m.skipped == {"not_single_turn": 5}
    got = _edit_triples(dst)
    _assert_pairs(got, expect)  # <image> and newlines gone from the instructions
    # one json read directly, its image dir given as --image-root
    one = run(PrepConfig(srcs=[str(root / "training_json" / "hqedit_gpt_edit.json")],
                         dst=str(tmp_path / "one"), kind="edit", workers=1, progress=False,
                         image_root=str(root / "gpt-edit" / "hqedit" / "edit")))
    assert one.samples == 2 and one.skipped == {"not_single_turn": 1}


# ------------------------------------------------------------------ ShareGPT-4o-Image

def _write_sharegpt(root: Path):
    """text_to_image.json, text_and_image_to_image.json; images only in *_part_N.tar."""
    root.mkdir(parents=True)
    images, t2i, edit, want_t2i, want_edit = {}, [], [], {}, {}
    for i in range(5):
        name = f"image/{i}.png"
        images[name] = _png(_color(i, "output"))
        t2i.append({"input_prompt": f"a picture number {i}", "output_image": name})
        want_t2i[f"a picture number {i}"] = np.array(_color(i, "output"))
    for i in range(5, 10):
        src, out = f"image/{i}_in.png", f"image/{i}.png"
        images[src], images[out] = _png(_color(i, "input")), _png(_color(i, "output"))
        edit.append({"input_prompt": f"edit number {i}", "input_image": [src],
                     "output_image": out})
        want_edit[f"edit number {i}"] = (np.array(_color(i, "input")),
                                         np.array(_color(i, "output")))
    edit.append({"input_prompt": "merge two", "input_image": ["image/5_in.png", "image/6_in.png"],
                 "output_image": "image/9.png"})
    (root / "text_to_image.json").write_text(json.dumps(t2i, indent=2))
    (root / "text_and_image_to_image.json").write_text(json.dumps(edit, indent=2))
    names = sorted(images)
    for part in (1, 2):
        with tarfile.open(root / f"image_part_{part}.tar", "w") as tar:
            for n in names[part - 1::2]:
                # member names as tar(1) may write them: ./image/.. or <top folder>/image/..
                info = tarfile.TarInfo(f"./{n}" if part == 1 else f"ShareGPT-4o-Image/{n}")
                info.size = len(images[n])
                tar.addfile(info, io.BytesIO(images[n]))
    return want_t2i, want_edit


def _files(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_sharegpt4o_images_read_from_part_tars(tmp_path, caplog, monkeypatch):
    root = tmp_path / "ShareGPT-4o-Image"
    want_t2i, want_edit = _write_sharegpt(root)
    published = _files(root)
    caplog.set_level("INFO", "data_prep")
    t2i = run(PrepConfig(srcs=[str(root / "text_to_image.json")], dst=str(tmp_path / "t2i"),
                         kind="t2i", shard_samples=3, workers=1, progress=False))
    assert t2i.samples == 5 and t2i.skipped == {}
    got = {s["txt"].decode(): _mean(s["jpg"]) for s in _samples(tmp_path / "t2i")}
    assert sorted(got) == sorted(want_t2i)
    assert all(np.abs(got[k] - want_t2i[k]).max() < 4 for k in got)
    edit = run(PrepConfig(srcs=[str(root / "text_and_image_to_image.json")],
                          dst=str(tmp_path / "edit"), kind="edit", workers=2, progress=False))
    assert edit.samples == 5 and edit.skipped == {"several_input_images": 1}
    _assert_pairs(_edit_triples(tmp_path / "edit"), want_edit)
    # the folder itself: its tars are the jsons' images, not shards; the other file's
    # records are left out under their own reason
    folder = run(PrepConfig(srcs=[str(root)], dst=str(tmp_path / "folder"), kind="t2i",
                            workers=1, progress=False))
    assert folder.samples == 5 and folder.skipped == {"edit_record": 6}
    folder = run(PrepConfig(srcs=[str(root)], dst=str(tmp_path / "folder_edit"), kind="edit",
                            workers=1, progress=False))
    assert folder.samples == 5
    assert folder.skipped == {"t2i_record": 5, "several_input_images": 1}
    assert _files(root) == published  # nothing extracted
    assert caplog.text.count("indexing 2 image tars") == 4  # once per --dst
    # an interrupted run's index is reused when it resumes
    caplog.clear()
    cfg = PrepConfig(srcs=[str(root / "text_to_image.json")], dst=str(tmp_path / "resumed"),
                     kind="t2i", shard_samples=2, workers=1, progress=False)
    _interrupted(cfg, monkeypatch)
    assert run(cfg).samples == 5
    assert caplog.text.count("indexing 2 image tars") == 1
    assert sorted(s["txt"].decode() for s in _samples(tmp_path / "resumed")) == sorted(want_t2i)


# ------------------------------------------------------------------ resume hazards

def _t2i_tars(root: Path, n_tars: int, per: int, start: int = 0):
    root.mkdir(parents=True, exist_ok=True)
    for t in range(n_tars):
        with tarfile.open(root / f"{start + t:05d}.tar", "w") as tar:
            for k in range(per):
                i = (start + t) * per + k
                for ext, data in (("jpg", _jpeg(_color(i, "output"), 200)),
                                  ("txt", f"caption {i}".encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def _jpeg(color, side):
    buf = io.BytesIO()
    Image.new("RGB", (side, side), color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _interrupted(cfg, monkeypatch, after=1):
    """Run until `after` shards are written, then die like a killed process."""
    real, n = sharding.write_shard, []

    def dying(task):
        if len(n) == after:
            raise KeyboardInterrupt
        n.append(1)
        return real(task)
    monkeypatch.setattr(sharding, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(sharding, "write_shard", real)


def test_resume_never_mixes_runs(tmp_path, monkeypatch):
    src, dst = tmp_path / "tars", tmp_path / "dst"
    _t2i_tars(src, 3, 4)
    cfg = lambda **kw: PrepConfig(**{**dict(srcs=[str(src)], dst=str(dst), shard_samples=4,  # noqa
                                        workers=1, progress=False, resize=128), **kw})
    _interrupted(cfg(), monkeypatch)
    # other --resize: refused in one line naming it; nothing changed in --dst
    before = _files(dst)
    with pytest.raises(PrepError, match=r"holds a run with other settings or sources "
                                        r"\(resize 128 -> 64\); .* --restart"):
        run(cfg(resize=64))
    assert _files(dst) == before
    # a tar added to --src, one rewritten: refused, naming them
    _t2i_tars(src, 1, 4, start=3)
    size = (src / "00000.tar").stat().st_size
    with open(src / "00000.tar", "ab") as f:
        f.write(b"\0" * 10240)
    with pytest.raises(PrepError) as err:
        run(cfg())
    msg = str(err.value)
    assert "\n" not in msg and f"source added: {src / '00003.tar'}" in msg
    assert f"source changed: {src / '00000.tar'} (" in msg and f"size {size} -> {size + 10240})" in msg
    # --restart: the old set is moved aside inside --dst, the new one made from scratch
    m = run(cfg(resize=64, restart=True))
    aside = [p for p in dst.iterdir() if p.name.startswith("_replaced-")]
    assert len(aside) == 1 and (aside[0] / "manifest.json").is_file()
    assert (aside[0] / "_staging" / "run.json").is_file()
    assert (aside[0] / "shard-000000.tar").is_file()
    assert m.complete and m.samples == 16 and m.params["settings"]["resize"] == 64
    sides = {Image.open(io.BytesIO(s["jpg"])).size for s in _samples(dst)}
    assert sides == {(64, 64)}  # no 128 px shard from the old run
    # the finished set re-run as it was: nothing to do; touched source: refused
    assert run(cfg(resize=64)).to_json() == m.to_json()
    os.utime(src / "00001.tar", ns=(1, 1))
    with pytest.raises(PrepError, match="source changed: .*00001.tar .*mtime"):
        run(cfg(resize=64))


def test_skip_threshold_and_failed_units_retried(tmp_path, capsys, caplog):
    root = tmp_path / "gpt-edit"
    want = _write_gpt_edit(root)
    moved = tmp_path / "later"
    moved.mkdir()
    lost = sorted((root / "omniedit" / "addition" / "input").iterdir())
    for p in lost:  # not there yet (a partial download)
        os.rename(p, moved / p.name)
    dst = tmp_path / "dst"
    argv = ["--src", str(root), "--dst", str(dst), "--workers", "1", "--no-progress"]
    assert main("edit", EDIT_DOC, argv) == 3
    out = capsys.readouterr()
    err = out.err[out.err.index("error: "):].splitlines()
    assert err[0] == ("error: 2 of 10 samples read (20.0%) were lost, more than "
                      "--max-skip-rate 0.05; nothing written. By reason:")
    assert err[1] == "  missing_input_image: 2"
    meta = root / "omniedit" / "addition" / "metadata" / "omniedit_addition.json"
    assert err[2:4] == [f"    {meta}#{k} ({root / 'omniedit' / 'addition' / 'input' / p.name})"
                        for k, p in enumerate(lost)]
    assert not (dst / "manifest.json").exists() and not list(dst.glob("*.tar"))
    # the files arrive; the same command redoes the unit that lost them, and finishes
    for p in lost:
        os.rename(moved / p.name, p)
    caplog.set_level("INFO", "data_prep")
    assert main("edit", EDIT_DOC, argv) == 0
    assert "resuming: 4 of 5 source units already validated" in caplog.text
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["samples"] == 10
    _assert_pairs(_edit_triples(dst), want)
    # a threshold above the loss lets the run finish, the losses counted
    os.remove(root / "hqedit" / "edit" / "output" / "hqedit_edit_00000.png")
    m = run(PrepConfig(srcs=[str(root)], dst=str(tmp_path / "d2"), kind="edit", workers=1,
                       progress=False, max_skip_rate=0.1))
    assert m.samples == 9 and m.skipped == {"missing_output_image": 1}
    with pytest.raises(SkipRateError):
        run(PrepConfig(srcs=[str(root)], dst=str(tmp_path / "d3"), kind="edit", workers=1,
                       progress=False, max_skip_rate=0.05))
    # a truncated source tar (its lost samples unknown) counts as a share of the units
    tars = tmp_path / "tars"
    _t2i_tars(tars, 4, 3)
    data = (tars / "00002.tar").read_bytes()
    (tars / "00002.tar").write_bytes(data[:len(data) // 2])
    with pytest.raises(SkipRateError, match=r"1 of 4 source units \(25.0%\) are corrupt tars"):
        run(PrepConfig(srcs=[str(tars)], dst=str(tmp_path / "d4"), workers=1, progress=False))
    m = run(PrepConfig(srcs=[str(tars)], dst=str(tmp_path / "d5"), workers=1, progress=False,
                       max_skip_rate=0.25))
    assert m.skipped == {"corrupt_tar": 1} and 9 <= m.samples < 12


# ---------------------------------------------------------------- memory at scale

def test_plan_memory_per_sample(tmp_path):
    """The plan step on a synthetic staging of 1M samples (with 2% duplicates): peak
    memory per sample, measured in a fresh process (the README's figure is at 27M)."""
    out = subprocess.run([sys.executable, str(REPO / "data_prep" / "plan_memory.py"),
                          "--samples", "1000000", "--units", "200", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.splitlines()[-1])
    assert res["samples"] == 1_000_000 and res["duplicates"] == 20_000
    assert res["shards"] == 980 and res["kept"] == 980_000
    assert res["bytes_per_sample"] <= 100, res
