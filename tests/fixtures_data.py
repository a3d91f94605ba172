"""Data fixtures: a real SeaweedFS S3 server and real shards built by data_prep.

- `seaweed`          (session) a running `weed mini` with bucket "unilip"; no env changes.
- `s3_server`        (function) the same server, with AWS_* variables of its identity set
                     in the environment for this test (monkeypatch) and storage's
                     per-process filesystems dropped, so s3:// URLs reach it.
- `shard_factory`    (session) make_shards(count=, shard_size=, size=, kind=) -> SampleShards,
                     local shards built with data_prep from sample_images (cached by args).
- `sample_shards`    (session) 60 t2i samples at 96 px in 10 shards of 6.
- `sample_edit_shards` (session) 21 edit samples at 96 px in 3 shards of 7.
- `s3_sample_shards` (session) sample_shards uploaded to s3://unilip/sample/ (use it with
                     `s3_server` so the credentials are in the environment).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List

import pytest

from unilip_ds.data import storage
from unilip_ds.data.seaweed import SeaweedS3

BUCKET = "unilip"


@dataclass
class SampleShards:
    dir: str  # local directory or s3:// prefix
    manifest: str  # URL of manifest.json
    urls: List[str]  # shard URLs, sorted
    keys: List[str]  # every sample key, in shard order
    kind: str


def _reset_filesystems() -> None:
    # storage caches one s3fs filesystem per process and endpoint; a test that changes
    # credentials must not get one built with another test's
    storage.reset_filesystems()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    server = SeaweedS3(str(tmp_path_factory.mktemp("seaweed")))
    server.start()
    server.create_bucket(BUCKET)
    server.bucket = BUCKET
    yield server
    server.close()


@pytest.fixture
def s3_server(seaweed, monkeypatch):
    if not seaweed.running:  # a test that stopped it must not break the next one
        seaweed.start()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    _reset_filesystems()
    yield seaweed
    _reset_filesystems()


def _keys(urls: List[str]) -> List[str]:
    import tarfile

    keys = []
    for url in urls:
        with tarfile.open(storage.local_path(url)) as tar:
            for name in tar.getnames():
                if name.endswith(".json"):
                    keys.append(name.split(".", 1)[0])
    return keys


@pytest.fixture(scope="session")
def shard_factory(tmp_path_factory) -> Callable[..., SampleShards]:
    from data_prep.sharding import PrepConfig, run
    from unilip_ds.data.sample_images import write_caption_folder, write_edit_folder

    made = {}

    def make(count: int = 60, shard_size: int = 6, size: int = 96,
             kind: str = "t2i") -> SampleShards:
        args = (count, shard_size, size, kind)
        if args in made:
            return made[args]
        root = tmp_path_factory.mktemp(f"shards-{kind}-{count}-{shard_size}-{size}")
        src, dst = root / "src", root / "shards"
        if kind == "t2i":
            write_caption_folder(src, count=count, size=size)
        else:
            write_edit_folder(src, count=count, size=size)
        manifest = run(PrepConfig(srcs=[str(src)], dst=str(dst), kind=kind,
                                  shard_samples=shard_size, workers=1, progress=False))
        urls = [str(dst / s.name) for s in manifest.shards]
        made[args] = SampleShards(str(dst), str(dst / "manifest.json"), urls, _keys(urls), kind)
        return made[args]

    return make


@pytest.fixture(scope="session")
def sample_shards(shard_factory) -> SampleShards:
    return shard_factory()


@pytest.fixture(scope="session")
def sample_edit_shards(shard_factory) -> SampleShards:
    return shard_factory(count=21, shard_size=7, kind="edit")


@pytest.fixture(scope="session")
def s3_sample_shards(seaweed, sample_shards) -> SampleShards:
    fs = seaweed.client()
    prefix = f"{BUCKET}/sample"
    for name in sorted(os.listdir(sample_shards.dir)):
        fs.put_file(str(Path(sample_shards.dir) / name), f"{prefix}/{name}")
    base = f"s3://{prefix}"
    return SampleShards(base, f"{base}/manifest.json",
                        [f"{base}/{Path(u).name}" for u in sample_shards.urls],
                        list(sample_shards.keys), "t2i")
