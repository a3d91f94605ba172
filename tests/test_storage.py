"""Storage layer against the local disk and a real SeaweedFS S3 server."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time

import pytest

from unilip_ds.data import storage
from unilip_ds.data.config import DataConfig
from unilip_ds.data.shards import Manifest, ShardInfo, list_shards, shard_sizes, write_manifest
from unilip_ds.data.storage import StorageError, open_shard


def _read_all(f, chunk=1 << 20) -> bytes:
    return b"".join(iter(lambda: f.read(chunk), b""))


# ------------------------------------------------------------------------------ local

def test_local_and_file_url_read(tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "a.tar").write_bytes(data)
    for url in (str(tmp_path / "a.tar"), f"file://{tmp_path}/a.tar"):
        with open_shard(url) as f:
            assert _read_all(f, 12345) == data


def test_local_missing_fails_at_once_naming_the_shard(tmp_path):
    url = str(tmp_path / "nope.tar")
    t0 = time.monotonic()
    with pytest.raises(StorageError) as e:
        open_shard(url, DataConfig(io_retry_seconds=30))
    assert time.monotonic() - t0 < 2  # nothing to wait for on a local path
    msg = str(e.value)
    assert url in msg and "\n" not in msg and "FileNotFoundError" in msg


def test_open_output_is_atomic(tmp_path):
    url = str(tmp_path / "out.bin")
    with pytest.raises(RuntimeError):
        with storage.open_output(url) as f:
            f.write(b"partial")
            raise RuntimeError("writer died")
    assert os.listdir(tmp_path) == []
    with storage.open_output(url) as f:
        f.write(b"whole")
    assert open(url, "rb").read() == b"whole"


def test_messages_never_carry_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-123")
    exc = OSError("denied for key s3cr3t-value-123\nmore")
    assert storage.describe(exc) == "OSError: denied for key ***"


# --------------------------------------------------------------------------- listing

def _touch(d, names):
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        (d / n).write_bytes(b"x")


def test_list_shards_specs(tmp_path):
    d = tmp_path / "s"
    _touch(d, [f"shard-{i:06d}.tar" for i in range(4)] + ["notes.txt"])
    all4 = [str(d / f"shard-{i:06d}.tar") for i in range(4)]
    assert list_shards([str(d)]) == all4
    assert list_shards([str(d) + "/"]) == all4
    assert list_shards([str(d / "shard-{000000..000003}.tar")]) == all4
    assert list_shards([str(d / "*.tar")]) == all4
    # overlapping specs: sorted, de-duplicated
    assert list_shards([str(d / "shard-000003.tar"), str(d / "shard-{000000..000001}.tar"),
                        str(d / "shard-000001.tar")]) == [all4[0], all4[1], all4[3]]
    write_manifest(str(d / "manifest.json"), Manifest(
        kind="t2i", complete=True, shards=[ShardInfo("shard-000001.tar", 5, 1, "0"),
                                           ShardInfo("shard-000000.tar", 7, 1, "0")]))
    assert list_shards([str(d / "manifest.json")]) == all4[:2]
    assert shard_sizes([str(d / "manifest.json")]) == {all4[0]: 7, all4[1]: 5}


@pytest.mark.parametrize("spec, needle", [
    ("s/shard-{000000..000009}.tar", "shard-000004.tar does not exist and 5 more"),
    ("s/*.tgz", "matches no *.tar shards"),
    ("missing_dir/", "no such file, directory or prefix"),
    ("s/incomplete.json", "incomplete"),
    ("s/nothing.tar", "no such file"),
])
def test_list_shards_errors_are_one_line(tmp_path, spec, needle):
    d = tmp_path / "s"
    _touch(d, [f"shard-{i:06d}.tar" for i in range(4)] + ["notes.txt"])
    write_manifest(str(d / "incomplete.json"), Manifest(kind="t2i", complete=False))
    with pytest.raises(StorageError) as e:
        list_shards([str(tmp_path / spec)])
    assert needle in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------- S3

def test_s3_listing_and_manifest(s3_server, s3_sample_shards, sample_shards):
    base = s3_sample_shards.dir
    n = len(sample_shards.urls)
    assert list_shards([base + "/"]) == s3_sample_shards.urls
    assert list_shards([base + f"/shard-{{000000..{n - 1:06d}}}.tar"]) == s3_sample_shards.urls
    assert list_shards([base + "/*.tar"]) == s3_sample_shards.urls
    assert list_shards([s3_sample_shards.manifest]) == s3_sample_shards.urls
    with pytest.raises(StorageError, match=rf"shard-{n:06d}.tar does not exist$"):
        list_shards([base + f"/shard-{{{n - 1:06d}..{n:06d}}}.tar"])
    with open_shard(s3_sample_shards.urls[0]) as f, open(sample_shards.urls[0], "rb") as g:
        assert _read_all(f) == g.read()


def test_s3_read_survives_server_restart(s3_server, caplog):
    """A multi-MB shard read from S3 while the server goes down for 3 s and comes back
    (same data, new process): the bytes are identical, and the reader did retry."""
    data = os.urandom(24 << 20)
    s3_server.client().pipe(f"{s3_server.bucket}/big/restart.tar", data)
    url = f"s3://{s3_server.bucket}/big/restart.tar"
    cfg = DataConfig(io_retry_seconds=40)
    caplog.set_level(logging.WARNING, logger="unilip_ds.data.storage")
    with open_shard(url, cfg) as f:
        got = bytearray(f.read(2 << 20))  # first ranged GET done (readahead ~9 MB)
        s3_server.stop()
        up = threading.Thread(target=s3_server.start, daemon=True)
        timer = threading.Timer(3.0, up.start)
        timer.start()
        got += _read_all(f)
        timer.join()
        up.join()
    assert s3_server.running
    assert len(got) == len(data) and bytes(got) == data
    assert any("retrying" in r.getMessage() and url in r.getMessage() for r in caplog.records)


def test_s3_missing_and_denied_fail_after_bounded_wait(s3_server, monkeypatch):
    cfg = DataConfig(io_retry_seconds=1.5)
    missing = f"s3://{s3_server.bucket}/nowhere/shard-000000.tar"
    t0 = time.monotonic()
    with pytest.raises(StorageError) as e:
        open_shard(missing, cfg)
    waited = time.monotonic() - t0
    assert 1.5 <= waited < 15
    msg = str(e.value)
    assert msg.startswith(f"shard {missing}") and "\n" not in msg
    assert "io_retry_seconds=1.5" in msg

    s3_server.client().pipe(f"{s3_server.bucket}/denied.tar", b"x" * 1000)
    secret = "wrong-secret-" + "9" * 20
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    storage.reset_filesystems()
    denied = f"s3://{s3_server.bucket}/denied.tar"
    t0 = time.monotonic()
    with pytest.raises(StorageError) as e:
        open_shard(denied, DataConfig(io_retry_seconds=60))
    assert time.monotonic() - t0 < 10  # rejected credentials are not retried for 60 s
    msg = str(e.value)
    assert msg.startswith(f"shard {denied}") and "\n" not in msg
    assert "rejected the credentials" in msg
    assert secret not in msg and s3_server.secret_key not in msg


def _child_read(url, q):
    try:
        q.put(storage.read_bytes(url, DataConfig(io_retry_seconds=10))[:4])
    except Exception as exc:  # reported to the parent
        q.put(repr(exc))


def test_s3_filesystem_is_per_process(s3_server):
    """A forked worker must not reuse the parent's s3fs (event loop thread, sockets)."""
    url = f"s3://{s3_server.bucket}/fork.bin"
    s3_server.client().pipe(url[5:], b"fork-safe")
    parent_fs = storage.s3_filesystem()
    assert storage.read_bytes(url) == b"fork-safe"  # parent's loop is live now
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_read, args=(url, q))
    p.start()
    out = q.get(timeout=30)
    p.join(10)
    assert out == b"fork"
    assert storage.s3_filesystem() is parent_fs


def test_s3_open_output_commits_only_on_success(s3_server):
    url = f"s3://{s3_server.bucket}/atomic/obj.bin"
    with pytest.raises(RuntimeError):
        with storage.open_output(url) as f:
            f.write(b"a" * 100)
            raise RuntimeError("writer died")
    assert not storage.exists(url)
    with storage.open_output(url) as f:
        f.write(b"b" * 100)
    assert storage.read_bytes(url) == b"b" * 100


def test_retry_only_covers_storage_failures():
    """A bug inside a storage call is not retried for io_retry_seconds: it surfaces as is."""
    t0 = time.monotonic()
    with pytest.raises(ZeroDivisionError):
        storage.with_retry(lambda: 1 / 0, "s3://bucket/shard.tar", DataConfig(io_retry_seconds=30))
    assert time.monotonic() - t0 < 1
