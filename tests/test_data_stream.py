"""The resumable stream: shard split, exact resume, mixing, bad data, S3 restarts."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from unilip_ds.data import DataError, SkipTracker, build_eval_batches, build_train_loader
from unilip_ds.data.config import DataConfig, SourceConfig
from unilip_ds.data.skips import SkipStats
from unilip_ds.data.stream import SourceStream, iter_shard

RES = 16


def jpeg(rng: np.random.Generator, h: int = 24, w: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_shards(root: Path, prefix: str, n_shards: int, per_shard: int, seed: int = 0,
                 kind: str = "t2i") -> List[str]:
    """Small real shards: jpg + txt (or input/output jpg + txt for edit)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(n_shards):
        path = root / f"{prefix}-{s:06d}.tar"
        with wds.TarWriter(str(path)) as w:
            for i in range(per_shard):
                key = f"{prefix}{s:03d}_{i:04d}"
                if kind == "edit":
                    w.write({"__key__": key, "input.jpg": jpeg(rng), "output.jpg": jpeg(rng),
                             "txt": f"make it {key}"})
                else:
                    w.write({"__key__": key, "jpg": jpeg(rng), "txt": f"a photo {key}"})
        paths.append(str(path))
    return paths


def make_cfg(train_urls=None, sources=None, eval_urls=None, workers=0, batch=4,
             shuffle=8, seed=0, **data):
    from unilip_ds.config import Config
    cfg = Config()
    cfg.run.seed = seed
    cfg.train.micro_batch_size = batch
    cfg.data.resolution = RES
    cfg.data.shuffle_buffer = shuffle
    cfg.data.num_workers = workers
    if sources:
        cfg.data.train.sources = sources
    else:
        cfg.data.train.urls = list(train_urls)
    cfg.data.eval.urls = list(eval_urls or [])
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def make_data_cfg():
    return DataConfig(shuffle_buffer=4, resolution=RES)


def take(loader, n: int) -> List[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def keys_of(batches: Sequence[dict]) -> List[List[str]]:
    return [b["__key__"] for b in batches]


def all_keys(paths: Sequence[str]) -> List[str]:
    out = []
    for p in paths:
        out += [s["__key__"] for s in iter_shard(p, None, None)]
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Dict[str, List[str]]:
    root = tmp_path_factory.mktemp("shards")
    return {"a": write_shards(root, "a", 8, 6, seed=1),
            "b": write_shards(root, "b", 6, 5, seed=2),
            "c": write_shards(root, "c", 4, 5, seed=3),
            "edit": write_shards(root, "e", 4, 5, seed=4, kind="edit")}


# -- shard split -----------------------------------------------------------------------

def test_worker_shards_partition_each_epoch():
    src = SourceConfig(name="s", urls=["x"], repeats=2)
    shards = [f"shard{i}" for i in range(7)]
    orders = []
    for epoch in range(2):
        got: List[str] = []
        for g in range(3):
            stream = SourceStream(0, src, shards, make_data_cfg(), 0, g, 3, SkipStats())
            got += stream.worker_shards(epoch)
        # every shard exactly `repeats` times per epoch across the readers
        assert sorted(got) == sorted(shards * 2)
        orders.append(got)
    assert orders[0] != orders[1]  # a new order every epoch


def test_split_covers_every_sample_once_across_ranks_and_workers(shards):
    # 8 shards x 6 samples over 2 ranks x 2 workers: 12 samples (3 batches) per worker
    world, workers, batch = 2, 2, 4
    seen: List[str] = []
    for rank in range(world):
        cfg = make_cfg(shards["a"], workers=workers, batch=batch, shuffle=6)
        seen += sum(keys_of(take(build_train_loader(cfg, rank, world), 6)), [])
    assert sorted(seen) == sorted(all_keys(shards["a"]))


# -- exact resume ----------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers, 2 cores
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_resume_is_exact(shards, workers):
    sources = [SourceConfig(name="a", urls=shards["a"], weight=2.0),
               SourceConfig(name="b", urls=shards["b"], weight=1.0)]
    k, m = 5, 7

    def loader():
        return build_train_loader(make_cfg(sources=sources, workers=workers, shuffle=7), 0, 1)

    straight = take(loader(), k + m)

    first = loader()
    it = iter(first)
    for _ in range(k):
        next(it)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # the state is what the checkpoint holds
    del it, first

    resumed = loader()
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    after = take(resumed, m)

    assert keys_of(after) == keys_of(straight[k:])
    for a, b in zip(after, straight[k:]):
        # uint8 (B,3,H,W) from the workers (built in shared memory there)
        assert a["image"].dtype == torch.uint8 and a["image"].shape == (4, 3, RES, RES)
        assert torch.equal(a["image"], b["image"])  # same crops and flips too
        # nothing emitted before the stop was decoded again
        assert a["__stats__"]["decoded"] == b["__stats__"]["decoded"]
        assert a["__stats__"]["read"] == b["__stats__"]["read"]
        # back into position by re-reading at most one shard plus one block
        assert a["__stats__"]["reread"] <= 2 * (6 + 7)  # two sources per worker


def test_resume_with_other_worker_count_is_refused(shards):
    cfg = make_cfg(shards["a"], workers=0)
    first = build_train_loader(cfg, 0, 1)
    take(first, 2)
    state = first.state_dict()
    cfg.data.num_workers = 0
    other = build_train_loader(cfg, 1, 2)  # another rank layout
    other.load_state_dict(state)
    with pytest.raises(DataError, match="same layout"):
        take(other, 1)


# -- mixing ----------------------------------------------------------------------------

def test_mixing_proportions(shards):
    sources = [SourceConfig(name="short", urls=shards["a"], weight=0.2),
               SourceConfig(name="long", urls=shards["b"], weight=0.6),
               SourceConfig(name="jdb", urls=shards["c"], weight=0.2)]
    batches = take(build_train_loader(make_cfg(sources=sources, batch=8), 0, 1), 150)
    names = sum((b["__source__"] for b in batches), [])
    frac = {n: names.count(n) / len(names) for n in ("short", "long", "jdb")}
    assert abs(frac["short"] - 0.2) < 0.04
    assert abs(frac["long"] - 0.6) < 0.04
    assert abs(frac["jdb"] - 0.2) < 0.04
    # a source's samples come from its own shards
    for b in batches:
        for key, name in zip(b["__key__"], b["__source__"]):
            assert key[0] == {"short": "a", "long": "b", "jdb": "c"}[name]


def test_task_homogeneous_batches_same_task_on_every_rank(shards):
    sources = [SourceConfig(name="t2i", urls=shards["a"], task="t2i", weight=3.0),
               SourceConfig(name="edit", urls=shards["edit"], task="edit", weight=1.0,
                            repeats=2)]
    per_rank = []
    for rank in range(2):
        cfg = make_cfg(sources=sources, batch=2)
        per_rank.append(take(build_train_loader(cfg, rank, 2), 60))
    tasks = [b["__task__"] for b in per_rank[0]]
    assert tasks == [b["__task__"] for b in per_rank[1]]
    assert 0.6 < tasks.count("t2i") / len(tasks) < 0.9
    for b in per_rank[0]:
        if b["__task__"] == "t2i":
            assert set(b["__source__"]) == {"t2i"}
            assert b["image"].shape == (2, 3, RES, RES) and len(b["caption"]) == 2
        else:
            assert set(b["__source__"]) == {"edit"}
            assert b["input_image"].shape == b["image"].shape == (2, 3, RES, RES)
            assert all(t.startswith("make it") for t in b["instruction"])


def test_too_few_shards_for_readers_is_a_clear_error(shards):
    cfg = make_cfg(shards["c"][:1], workers=0)
    with pytest.raises(DataError, match="1 shard"):
        take(build_train_loader(cfg, 0, 2), 1)


def test_config_errors(shards):
    with pytest.raises(DataError, match="duplicate source name"):
        build_train_loader(make_cfg(sources=[SourceConfig(name="x", urls=shards["a"]),
                                             SourceConfig(name="x", urls=shards["b"])]), 0, 1)
    with pytest.raises(DataError, match="task"):
        build_train_loader(make_cfg(sources=[SourceConfig(name="x", urls=shards["a"],
                                                          task="video")]), 0, 1)
    with pytest.raises(DataError, match="weight"):
        build_train_loader(make_cfg(sources=[SourceConfig(name="x", urls=shards["a"],
                                                          weight=0.0)]), 0, 1)


# -- eval ------------------------------------------------------------------------------

def test_eval_batches_deterministic_and_split_by_rank(shards):
    cfg = make_cfg(shards["a"], eval_urls=shards["b"], batch=4)
    one = build_eval_batches(cfg, 0, 2, max_batches=10)
    again = build_eval_batches(cfg, 0, 2, max_batches=10)
    other = build_eval_batches(cfg, 1, 2, max_batches=10)
    assert keys_of(one) == keys_of(again)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(one, again))
    assert one[0]["image"].dtype == torch.uint8 and one[0]["image"].shape == (4, 3, RES, RES)
    k0, k1 = sum(keys_of(one), []), sum(keys_of(other), [])
    assert not set(k0) & set(k1)
    assert sorted(k0 + k1) == sorted(all_keys(shards["b"]))
    assert len(build_eval_batches(cfg, 0, 1, max_batches=2)) == 2


# -- bad data --------------------------------------------------------------------------

def _tar_bytes(members: Dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT,
                                 tarfile.PAX_FORMAT], ids=["ustar", "gnu", "pax"])
def test_tar_formats_long_names_and_member_bytes(tmp_path, fmt):
    """Members come out whole under their full names, whatever wrote the tar: GNU long
    names and pax path/mtime records apply to the member after them only."""
    rng = np.random.default_rng(9)
    deep = "d" * 60 + "/" + "e" * 60  # a 121-char directory: past ustar's 100-char name
    names = ["short0", "short1"]
    if fmt != tarfile.USTAR_FORMAT:  # long names between short ones
        names = ["short0", f"{deep}/long_{'x' * 90}", "short1", f"{deep}/caf\u00e9_{'y' * 80}",
                 "short2"]
    blobs = {n: rng.integers(0, 256, int(rng.integers(1, 3000)), dtype=np.uint8).tobytes()
             for n in names}
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tf:
        for n in names:
            for ext, data in (("bin", blobs[n]), ("txt", n.encode())):
                info = tarfile.TarInfo(f"{n}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    skips: List[str] = []
    got = list(iter_shard(str(path), None, lambda reason, detail: skips.append(reason)))
    assert not skips
    assert [g["__key__"] for g in got] == names
    for g in got:
        assert g["bin"] == blobs[g["__key__"]] and g["txt"] == g["__key__"].encode()


def test_data_after_the_end_marker_is_corrupt(tmp_path):
    whole = _tar_bytes({"a.txt": b"x", "b.txt": b"y"})
    path = tmp_path / "t.tar"
    path.write_bytes(whole + _tar_bytes({"c.txt": b"z"}))  # two tars glued together
    skips: List[str] = []
    got = list(iter_shard(str(path), None, lambda reason, detail: skips.append(reason)))
    assert [g["__key__"] for g in got] == ["a", "b"] and skips == ["tar_corrupt"]


def test_every_kind_of_bad_input_is_skipped_and_counted(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    good = {f"g{i:02d}": jpeg(rng) for i in range(12)}
    d = tmp_path / "bad"
    d.mkdir()

    def members(keys, extra=None):
        m = {}
        for k in keys:
            m[f"{k}.jpg"] = good[k]
            m[f"{k}.txt"] = f"caption {k}".encode()
        m.update(extra or {})
        return m

    # 0: bad samples between good ones
    truncated = good["g00"][: len(good["g00"]) // 2]
    (d / "s-000.tar").write_bytes(_tar_bytes(members(["g00", "g01"], {
        "x_trunc.jpg": truncated, "x_trunc.txt": b"cap",
        "x_junk.jpg": b"this is not an image", "x_junk.txt": b"cap",
        "x_nojpg.txt": b"only a caption",
        "x_empty.jpg": good["g02"], "x_empty.txt": b"   ",
    })))
    # 1: a tar cut in the middle of a member (a broken upload)
    whole = _tar_bytes(members(["g03", "g04", "g05"]))
    cut = whole.index(b"g04.jpg") + 512 + 100  # inside g04.jpg's bytes
    (d / "s-001.tar").write_bytes(whole[:cut])
    # 2: a corrupt header after the first sample: tarfile would stop silently
    tb = bytearray(_tar_bytes(members(["g06", "g07", "g08"])))
    first_two = 512 + 512 * ((len(good["g06"]) + 511) // 512) + 512 + 512
    tb[first_two: first_two + 100] = b"\x07" * 100
    (d / "s-002.tar").write_bytes(bytes(tb))
    # 3: not a tar at all
    (d / "s-003.tar").write_bytes(b"garbage" * 1000)
    # 4: listed, then gone before it is read (an unreadable shard)
    (d / "s-004.tar").write_bytes(_tar_bytes(members(["g02"])))
    # 5, 6: good shards (last, so the final batch carries every count)
    (d / "s-005.tar").write_bytes(_tar_bytes(members(["g09", "g10"])))
    (d / "s-006.tar").write_bytes(_tar_bytes(members(["g11"])))

    # one exact pass: eval reads every listed shard once, in order
    cfg = make_cfg([str(d / "*.tar")], eval_urls=[str(d / "*.tar")], batch=1, shuffle=4)
    cfg.data.eval.task = cfg.data.train.task = "t2i"
    from unilip_ds.data import loader as loader_mod
    listed = loader_mod.list_shards([str(d / "*.tar")], cfg.data)
    assert len(listed) == 7
    # s-004 vanishes after it was listed
    monkeypatch.setattr(loader_mod, "list_shards", lambda specs, c=None: listed)
    os.remove(d / "s-004.tar")
    batches = build_eval_batches(cfg, 0, 1, max_batches=100)
    train = take(build_train_loader(cfg, 0, 1), 30)
    keys = sum(keys_of(batches), [])
    assert not any(k.startswith("x_") for k in keys)
    assert {"g00", "g01", "g06", "g09", "g10", "g11"} <= set(keys)
    assert not {"g07", "g08"} & set(keys)  # behind the corrupt header
    stats = batches[-1]["__stats__"]
    assert stats["skipped"] == {"bad_image": 2, "missing_key": 1, "empty_text": 1,
                                "bad_text": 0, "tar_corrupt": 2, "shard_unreadable": 2, "caption_too_long": 0}

    # the training stream skips the same things, epoch after epoch, and keeps going
    tracker = SkipTracker(max_skip_rate=1.0, check_after=0)
    for b in train:
        tracker.update(b)
        assert not b["__key__"][0].startswith("x_")
    totals = tracker.totals()
    for reason in ("bad_image", "missing_key", "empty_text", "tar_corrupt", "shard_unreadable"):
        assert totals[f"data/skipped/{reason}"] >= 1, reason
    assert totals["data/read"] >= 30


def test_edit_samples_missing_an_image_or_with_bad_text_are_skipped_and_counted(tmp_path):
    # wide photos, red left / blue right; the output is the input mirrored
    wide = np.zeros((24, 72, 3), np.uint8)
    wide[:, :24] = (255, 0, 0)
    wide[:, 24:48] = (0, 255, 0)
    wide[:, 48:] = (0, 0, 255)

    def jpg(arr):
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, "JPEG", quality=95)
        return buf.getvalue()

    src, dst = jpg(wide), jpg(wide[:, ::-1])
    pair = {"input.jpg": src, "output.jpg": dst}
    bad = {"x_noout": {"input.jpg": src, "txt": b"flip"},
           "x_noin": {"output.jpg": dst, "txt": b"flip"},
           "x_notxt": dict(pair),
           "x_latin1": {**pair, "txt": b"retourn\xe9"},
           "x_ctrl": {**pair, "txt": b" \x00\x07\x1b "},
           "x_blank": {**pair, "txt": b" \n "}}
    d = tmp_path / "edit"
    d.mkdir()
    for s, keys in enumerate([["g0", "x_noout", "x_noin", "g1", "x_notxt"],
                              ["x_latin1", "g2", "x_ctrl", "x_blank", "g3"]]):
        members = {}
        for k in keys:
            parts = bad.get(k) or {**pair, "txt": b"flip the image horizontally"}
            members.update({f"{k}.{ext}": v for ext, v in parts.items()})
        (d / f"e-{s:03d}.tar").write_bytes(_tar_bytes(members))

    cfg = make_cfg([str(d / "*.tar")], eval_urls=[str(d / "*.tar")], batch=2, shuffle=4)
    cfg.data.eval.task = cfg.data.train.task = "edit"
    batches = build_eval_batches(cfg, 0, 1, max_batches=100)
    assert sum(keys_of(batches), []) == ["g0", "g1", "g2", "g3"]
    stats = batches[-1]["__stats__"]
    assert stats["read"] == 10 and stats["decoded"] == 4
    assert stats["skipped"] == {"bad_image": 0, "missing_key": 3, "empty_text": 1,
                                "bad_text": 2, "tar_corrupt": 0, "shard_unreadable": 0, "caption_too_long": 0}
    # both images squashed whole (both edges kept), aligned, the same in eval and training
    evals = {}
    for b in batches:
        assert b["instruction"] == ["flip the image horizontally"] * len(b["__key__"])
        for i, key in enumerate(b["__key__"]):
            inp, out = b["input_image"][i].int(), b["image"][i].int()
            assert inp[0, :, 0].min() > 200 and inp[2, :, -1].min() > 200  # red | blue
            assert out[2, :, 0].min() > 200 and out[0, :, -1].min() > 200  # blue | red
            assert (out.flip(-1) - inp).abs().float().mean() < 8
            evals[key] = (b["input_image"][i], b["image"][i])
    tracker = SkipTracker(max_skip_rate=1.0, check_after=0)
    for b in take(build_train_loader(cfg, 0, 1), 12):
        tracker.update(b)
        for i, key in enumerate(b["__key__"]):
            assert torch.equal(b["input_image"][i], evals[key][0])
            assert torch.equal(b["image"][i], evals[key][1])
    totals = tracker.totals()
    for reason in ("missing_key", "empty_text", "bad_text"):
        assert totals[f"data/skipped/{reason}"] >= 1, reason


def test_skip_rate_limit_stops_the_run():
    tracker = SkipTracker(max_skip_rate=0.1, check_after=100)
    skipped = {"bad_image": 5, "missing_key": 0, "empty_text": 0, "tar_corrupt": 0,
               "shard_unreadable": 0, "caption_too_long": 0}
    tracker.update({"__stats__": {"worker": 0, "read": 50, "decoded": 45, "skipped": skipped}})
    tracker.check()  # 10% but under check_after reads: no verdict yet
    tracker.update({"__stats__": {"worker": 1, "read": 60, "decoded": 50,
                                  "skipped": {**skipped, "bad_image": 10}}})
    assert tracker.totals()["data/skipped/bad_image"] == 15
    assert tracker.totals()["data/read"] == 110
    with pytest.raises(DataError, match=r"skip rate 0\.136 > data\.max_skip_rate 0\.1"):
        tracker.check()
    # a worker's counters are cumulative: a newer batch replaces, never adds
    tracker.update({"__stats__": {"worker": 1, "read": 900, "decoded": 890,
                                  "skipped": {**skipped, "bad_image": 10}}})
    assert tracker.totals()["data/read"] == 950
    tracker.check()


def test_a_source_without_any_readable_shard_fails_clearly(tmp_path):
    for i in range(2):
        (tmp_path / f"s-{i}.tar").write_bytes(b"not a tar" * 100)
    cfg = make_cfg([str(tmp_path / "*.tar")])
    with pytest.raises(DataError, match="no readable sample"):
        take(build_train_loader(cfg, 0, 1), 1)


# -- real storage ----------------------------------------------------------------------

def test_reads_data_prep_shards_through_their_manifest(sample_shards):
    # 60 samples in 10 shards of 6, two ranks x one worker: one epoch = 5 batches of 6 each
    seen: List[str] = []
    for rank in range(2):
        cfg = make_cfg([sample_shards.manifest], batch=6, shuffle=6)
        cfg.data.train.task = "t2i"
        batches = take(build_train_loader(cfg, rank, 2), 5)
        assert all(len(c) > 0 for b in batches for c in b["caption"])
        seen += sum(keys_of(batches), [])
    assert sorted(seen) == sorted(sample_shards.keys)


def test_s3_server_restart_mid_epoch_loses_and_duplicates_nothing(s3_server, s3_sample_shards):
    # 10 shards of 6 over 2 workers; one shard per shuffle block, so every other batch
    # a worker opens a new shard: after the restart they all come from the new server
    cfg = make_cfg([f"{s3_sample_shards.dir}/"], workers=2, batch=3, shuffle=6,
                   io_retry_seconds=60.0)
    cfg.data.train.task = "t2i"
    it = iter(build_train_loader(cfg, 0, 1))
    before = [next(it) for _ in range(6)]
    s3_server.restart(down_seconds=3.0)
    after = [next(it) for _ in range(14)]  # the rest of the epoch
    keys = sum(keys_of(before + after), [])
    assert len(keys) == len(set(keys)) == 60
    assert sorted(keys) == sorted(s3_sample_shards.keys)
    for worker_last in {b["__stats__"]["worker"]: b for b in after}.values():
        assert sum(worker_last["__stats__"]["skipped"].values()) == 0
