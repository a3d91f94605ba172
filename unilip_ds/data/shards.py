"""Shard lists from specs, and the manifest that data_prep writes next to its shards.

A spec is one of
  - a brace pattern   /data/shard-{000000..000127}.tar, s3://b/p/shard-{0..9}.tar
  - a glob            /data/*.tar, s3://b/p/*.tar
  - a directory or s3 prefix (ends in / or is a directory): every *.tar directly in it
  - a manifest file   .../manifest.json (written by data_prep): its complete shards
  - one shard         /data/shard-000000.tar
local paths, file:// and s3:// alike. `list_shards` returns sorted, de-duplicated URLs
and fails with one StorageError line for a spec that names nothing.

Brace expansions are checked against one listing per parent directory (one LIST request
per prefix on S3, not one HEAD per shard).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from braceexpand import braceexpand

from unilip_ds.data import storage
from unilip_ds.data.storage import StorageError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "unilip_ds.shards/1"
SHARD_SUFFIXES = (".tar",)


# --------------------------------------------------------------------------- manifest

@dataclass
class ShardInfo:
    name: str  # relative to the manifest's directory
    samples: int
    bytes: int
    sha256: str
    # hash of the sample digests it holds (data_prep uses it to decide a re-run's shard
    # is the one it planned, not just a file of the right name)
    content: str = ""


@dataclass
class Manifest:
    """What data_prep wrote: shards with counts and checksums, and what it skipped.

    `complete` is false while data_prep is still writing (shards listed so far are
    finished and verified); readers refuse an incomplete manifest.
    """

    kind: str  # t2i | edit
    shards: List[ShardInfo] = field(default_factory=list)
    skipped: Dict[str, int] = field(default_factory=dict)
    complete: bool = False
    # parameters and the source, so a re-run with different ones is caught
    params: Dict[str, Any] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> str:
        d = asdict(self)
        d["samples"], d["bytes"] = self.samples, self.bytes
        return json.dumps(d, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "Manifest":
        try:
            d = json.loads(text)
            if d.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {d.get('format')!r} is not {MANIFEST_FORMAT!r}")
            return cls(kind=d["kind"], shards=[ShardInfo(**s) for s in d["shards"]],
                       skipped={str(k): int(v) for k, v in d.get("skipped", {}).items()},
                       complete=bool(d["complete"]), params=dict(d.get("params", {})))
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"{where}: not a shard manifest ({storage.describe(exc)})") \
                from exc


def read_manifest(url: str, cfg: Any = None) -> Manifest:
    if not storage.exists(url, cfg):
        raise StorageError(f"manifest {url}: no such file")
    return Manifest.from_json(storage.read_bytes(url, cfg).decode("utf-8"), url)


def write_manifest(url: str, manifest: Manifest, cfg: Any = None) -> None:
    storage.write_bytes(url, manifest.to_json().encode("utf-8"), cfg)


def manifest_shards(url: str, cfg: Any = None) -> List[str]:
    m = read_manifest(url, cfg)
    if not m.complete:
        raise StorageError(f"manifest {url}: incomplete (data_prep still running or "
                           f"interrupted; re-run it to finish)")
    base = storage.parent(url)
    return [storage.join(base, s.name) for s in m.shards]


# ---------------------------------------------------------------------------- listing

def _is_manifest(spec: str) -> bool:
    return spec.endswith(".json")


def _has_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _expand_braces(spec: str, cfg: Any) -> List[str]:
    urls = list(braceexpand(spec))
    by_dir: Dict[str, List[str]] = {}
    for u in urls:
        by_dir.setdefault(storage.parent(u), []).append(u)
    missing: List[str] = []
    for d, members in by_dir.items():
        if not storage.isdir(d, cfg):
            missing += members
            continue
        present = set(storage.list_files(d, cfg))
        missing += [u for u in members if u not in present]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise StorageError(f"shard spec {spec}: {missing[0]} does not exist{more}")
    return urls


def _expand_one(spec: str, cfg: Any) -> List[str]:
    if _is_manifest(spec):
        return manifest_shards(spec, cfg)
    if "{" in spec:
        return _expand_braces(spec, cfg)
    if _has_glob(spec):
        return [u for u in storage.glob(spec, cfg) if u.endswith(SHARD_SUFFIXES)]
    if spec.endswith("/") or storage.isdir(spec, cfg):
        return [u for u in storage.list_files(spec, cfg) if u.endswith(SHARD_SUFFIXES)]
    if storage.exists(spec, cfg):
        return [spec]
    raise StorageError(f"shard spec {spec}: no such file, directory or prefix")


def list_shards(specs: List[str], cfg: Any = None) -> List[str]:
    """Expand shard specs (see module doc) into sorted, de-duplicated shard URLs."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise StorageError("no shard specs given (set data.train.urls / data.eval.urls)")
    out: List[str] = []
    for spec in specs:
        spec = str(spec).strip()
        urls = _expand_one(spec, cfg)
        if not urls:
            raise StorageError(f"shard spec {spec}: matches no *.tar shards")
        other = [u for u in urls if not u.endswith(SHARD_SUFFIXES)]
        if other:  # e.g. an image: the stream reads webdataset tars, nothing else
            more = f" (and {len(other) - 1} more)" if len(other) > 1 else ""
            raise StorageError(f"shard spec {spec}: {other[0]}{more} is not a .tar shard; name webdataset "
                               "shards (data_prep/shard_blip3o.py or shard_edit.py writes them from images + "
                               "captions), a folder of them or their manifest.json")
        out += urls
    return sorted(set(out))


def shard_sizes(specs: List[str], cfg: Any = None) -> Optional[Dict[str, int]]:
    """Sample counts per shard URL when every spec is a manifest, else None."""
    counts: Dict[str, int] = {}
    for spec in specs:
        if not _is_manifest(spec):
            return None
        m = read_manifest(spec, cfg)
        base = storage.parent(spec)
        counts.update({storage.join(base, s.name): s.samples for s in m.shards})
    return counts
