"""Raw data -> validated, de-duplicated, evenly sized tar shards + a manifest.

Three phases, each resumable, all writes inside --dst:
1. validate: each source unit (sources.py) is read by a worker process; every sample is
   decoded and checked, optionally re-encoded at --resize, and appended to a staging tar
   `<dst>/_staging/unit-NNNNNN.tar`; a `.json` next to it (written last) records each
   sample's content hash and byte range and the skip counts. A re-run skips units whose
   json exists.
2. plan: units in source order, the first sample of each content hash wins (later ones
   count as `duplicate`), the rest is cut into shards of equal sample count (or bytes).
3. write: each shard is a byte copy of its samples' tar blocks from staging (no
   re-decoding), written atomically with its sha256; the manifest is rewritten after
   every shard. A re-run keeps every shard the manifest lists whose size, sha256 and
   planned content match. When all shards are written the manifest says complete and
   the staging folder is removed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import sys
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

from tqdm import tqdm

from data_prep.sources import Options, PrepError, Skip, Unit, build_sample, plan_units, read_unit
from unilip_ds.data import storage
from unilip_ds.data.shards import MANIFEST_NAME, Manifest, ShardInfo, read_manifest, \
    write_manifest
from unilip_ds.data.storage import StorageError

log = logging.getLogger("data_prep")

STAGING = "_staging"
TAR_RECORD = 10240  # tar(1) pads archives to 20 blocks


@dataclass
class PrepConfig:
    srcs: List[str]
    dst: str
    kind: str = "t2i"  # t2i | edit
    resize: Optional[int] = None
    quality: int = 95
    min_side: int = 16
    shard_samples: int = 1000  # used when shard_bytes is 0
    shard_bytes: int = 0
    prefix: str = "shard"
    workers: int = 0  # 0 = all cores
    verify: str = "sha256"  # sha256 | size: how a re-run checks finished shards
    image_root: Optional[str] = None
    fields: Dict[str, str] = field(default_factory=dict)
    progress: bool = True

    def params(self) -> Dict[str, Any]:
        """What the output depends on (a re-run must use the same)."""
        return {"kind": self.kind, "src": list(self.srcs), "resize": self.resize,
                "quality": self.quality, "min_side": self.min_side,
                "shard_samples": self.shard_samples, "shard_bytes": self.shard_bytes,
                "prefix": self.prefix, "image_root": self.image_root,
                "fields": dict(self.fields)}

    def options(self) -> Options:
        return Options(resize=self.resize, quality=self.quality, min_side=self.min_side)


# ------------------------------------------------------------------------ 1. validate

def _staging(dst: str, name: str = "") -> str:
    return storage.join(storage.join(dst, STAGING), name) if name else storage.join(dst, STAGING)


def _unit_urls(dst: str, index: int) -> Tuple[str, str]:
    return (_staging(dst, f"unit-{index:06d}.tar"), _staging(dst, f"unit-{index:06d}.json"))


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def process_unit(task: Tuple[Unit, str, Options]) -> Dict[str, Any]:
    """Validate one unit into its staging tar; returns (and saves) its record."""
    unit, dst, opts = task
    tar_url, json_url = _unit_urls(dst, unit.index)
    skipped: Dict[str, int] = {}
    entries: List[Tuple[str, int, int]] = []  # (content digest, start, end) in staging tar
    read = 0
    with storage.open_output(tar_url) as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for ref, parts in read_unit(unit, skipped):
                read += 1
                try:
                    digest, members = build_sample(unit.kind, parts, ref, opts)
                except Skip as s:
                    skipped[s.args[0]] = skipped.get(s.args[0], 0) + 1
                    continue
                start = tar.offset
                for ext, data in members.items():
                    _add_member(tar, f"{digest[:16]}.{ext}", data)
                entries.append((digest, start, tar.offset))
    record = {"index": unit.index, "read": read, "entries": entries, "skipped": skipped}
    storage.write_bytes(json_url, json.dumps(record).encode())
    return record


def _pool_map(fn, tasks: List[Any], workers: int, desc: str, progress: bool) -> Iterable[Any]:
    bar = tqdm(total=len(tasks), desc=desc, unit="task", disable=not progress or not tasks,
               file=sys.stderr)
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            yield fn(t)
            bar.update()
    else:
        # fork: workers inherit the imports; storage re-creates s3 clients per process
        with multiprocessing.get_context("fork").Pool(min(workers, len(tasks))) as pool:
            for out in pool.imap_unordered(fn, tasks):
                yield out
                bar.update()
    bar.close()


# ---------------------------------------------------------------------------- 2. plan

@dataclass
class ShardPlan:
    name: str
    ranges: List[Tuple[int, int, int]]  # (unit index, start, end), merged when contiguous
    samples: int
    content: str  # sha256 over the sample digests


def plan_shards(records: List[Dict[str, Any]], cfg: PrepConfig) -> Tuple[List[ShardPlan],
                                                                        Dict[str, int]]:
    skipped: Dict[str, int] = {}
    kept: List[Tuple[str, int, int, int]] = []
    seen = set()
    for rec in sorted(records, key=lambda r: r["index"]):
        for reason, n in rec["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
        for digest, start, end in rec["entries"]:
            d = bytes.fromhex(digest[:32])  # 16 bytes per sample in memory
            if d in seen:
                skipped["duplicate"] = skipped.get("duplicate", 0) + 1
                continue
            seen.add(d)
            kept.append((digest, rec["index"], start, end))
    if not kept:
        raise PrepError(f"no valid samples in --src (skipped: {skipped or 'nothing read'})")
    total = sum(e - s for _, _, s, e in kept)
    if cfg.shard_bytes:
        n = max(1, math.ceil(total / cfg.shard_bytes))
        cum, assign = 0, []
        for _, _, s, e in kept:  # contiguous cut at equal byte fractions
            assign.append(min(n - 1, cum * n // total))
            cum += e - s
    else:
        n = math.ceil(len(kept) / cfg.shard_samples)
        assign = [i * n // len(kept) for i in range(len(kept))]  # sizes differ by <= 1
    width = max(6, len(str(n - 1)))
    plans = [ShardPlan(f"{cfg.prefix}-{j:0{width}d}.tar", [], 0, "") for j in range(n)]
    hashes = [hashlib.sha256() for _ in range(n)]
    for (digest, unit, s, e), j in zip(kept, assign):
        p = plans[j]
        p.samples += 1
        hashes[j].update(bytes.fromhex(digest))
        if p.ranges and p.ranges[-1][0] == unit and p.ranges[-1][2] == s:
            p.ranges[-1] = (unit, p.ranges[-1][1], e)
        else:
            p.ranges.append((unit, s, e))
    for p, h in zip(plans, hashes):
        p.content = h.hexdigest()
    return [p for p in plans if p.samples], skipped


# --------------------------------------------------------------------------- 3. write

def write_shard(task: Tuple[ShardPlan, str]) -> ShardInfo:
    """Write one planned shard; a transient storage failure rewrites it from the start
    (the upload only becomes visible when complete)."""
    plan, dst = task
    url = storage.join(dst, plan.name)

    def write() -> ShardInfo:
        h = hashlib.sha256()
        with storage.open_output(url, hasher=h) as f:
            for unit, start, end in plan.ranges:
                f.write(storage.read_bytes(_unit_urls(dst, unit)[0], start=start,
                                           length=end - start))
            # end-of-archive: two zero blocks, padded to a whole record
            f.write(b"\0" * (1024 + (-(f.nbytes + 1024)) % TAR_RECORD))
            nbytes = f.nbytes
        return ShardInfo(plan.name, plan.samples, nbytes, h.hexdigest(), plan.content)

    return storage.with_retry(write, url, what="shard")


def verify_shard(url: str, info: ShardInfo, mode: str = "sha256") -> bool:
    try:
        if storage.size(url) != info.bytes:
            return False
        if mode == "size":
            return True
        h = hashlib.sha256()
        with storage.open_shard(url) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest() == info.sha256
    except (StorageError, OSError):
        return False


# ----------------------------------------------------------------------------- driver

def _check_paths(cfg: PrepConfig) -> None:
    """Refuse a --dst that overlaps a --src: we only ever write and delete inside --dst."""
    def norm(u: str) -> str:
        u = u if storage.is_s3(u) else os.path.realpath(storage.local_path(u))
        return u.rstrip("/") + "/"
    dst = norm(cfg.dst)
    for src in cfg.srcs:
        s = norm(re.split(r"[{*?\[]", src)[0])
        if s.startswith(dst) or dst.startswith(s):
            raise PrepError(f"--dst {cfg.dst} overlaps --src {src}; use a separate folder")


def run(cfg: PrepConfig) -> Manifest:
    """Build (or finish) the shards of cfg.srcs in cfg.dst; returns the final manifest."""
    t0 = time.time()
    if cfg.kind not in ("t2i", "edit"):
        raise PrepError(f"kind must be t2i or edit, got {cfg.kind!r}")
    if cfg.shard_samples < 1 and cfg.shard_bytes < 1:
        raise PrepError("--shard-size must be positive")
    _check_paths(cfg)
    workers = cfg.workers or os.cpu_count() or 1
    manifest_url = storage.join(cfg.dst, MANIFEST_NAME)
    old = read_manifest(manifest_url) if storage.exists(manifest_url) else None
    if old is not None and old.params != cfg.params():
        diff = sorted(k for k in set(old.params) | set(cfg.params())
                      if old.params.get(k) != cfg.params().get(k))
        raise PrepError(f"--dst {cfg.dst} holds shards made with other settings "
                        f"({', '.join(diff)} differ); use another --dst")
    good: Dict[str, ShardInfo] = {}
    if old is not None:
        for info in old.shards:
            if verify_shard(storage.join(cfg.dst, info.name), info, cfg.verify):
                good[info.name] = info
            else:
                log.warning("shard %s fails verification; it will be rewritten", info.name)
        if old.complete and len(good) == len(old.shards):
            log.info("%s: all %d shards verified, nothing to do", cfg.dst, len(good))
            return old

    # 1. validate
    units = plan_units(cfg.srcs, cfg.kind, image_root=cfg.image_root, fields=cfg.fields)
    records, todo = [], []
    for u in units:
        json_url = _unit_urls(cfg.dst, u.index)[1]
        if storage.exists(json_url):
            records.append(json.loads(storage.read_bytes(json_url)))
        else:
            todo.append((u, cfg.dst, cfg.options()))
    if records:
        log.info("resuming: %d of %d source units already validated", len(records), len(units))
    records += list(_pool_map(process_unit, todo, workers, "validate", cfg.progress))

    # 2. plan
    plans, skipped = plan_shards(records, cfg)

    # 3. write
    manifest = Manifest(kind=cfg.kind, skipped=skipped, params=cfg.params())
    done = {p.name: good[p.name] for p in plans
            if p.name in good and good[p.name].content == p.content}
    manifest.shards = sorted(done.values(), key=lambda s: s.name)
    write_manifest(manifest_url, manifest)
    tasks = [(p, cfg.dst) for p in plans if p.name not in done]
    for info in _pool_map(write_shard, tasks, workers, "write", cfg.progress):
        done[info.name] = info
        manifest.shards = sorted(done.values(), key=lambda s: s.name)
        write_manifest(manifest_url, manifest)
    manifest.complete = True
    write_manifest(manifest_url, manifest)
    storage.remove(_staging(cfg.dst), recursive=True)
    read = sum(r["read"] for r in records)
    log.info("%s: %d shards, %d samples, %.1f MB from %d read in %.1fs; skipped %s",
             cfg.dst, len(manifest.shards), manifest.samples, manifest.bytes / 1e6, read,
             time.time() - t0, skipped or "none")
    return manifest


# -------------------------------------------------------------------------------- CLI

def parse_size(text: str) -> Tuple[int, int]:
    """'1000' -> (1000 samples, 0); '512MB' / '1GiB' -> (0, bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"--shard-size {text!r}: a sample count or e.g. 512MB")
    if not m.group(2):
        return int(float(m.group(1))), 0
    unit = m.group(2)
    base = 1024 if "i" in unit else 1000
    return 0, int(float(m.group(1)) * base ** ("kmgt".index(unit[0]) + 1))


def input_layouts(kind: Optional[str]) -> str:
    """The --src layouts a kind accepts (the --help epilog)."""
    from data_prep.sources import FIELDS, IMAGE_EXTS
    field = lambda role, what: f"             {what}: {', '.join(FIELDS[role])}\n"  # noqa: E731
    json_ = ("  json     a list of records (or .jsonl{})\n"
             "           image paths relative to --image-root; the fields tried:\n")
    t2i = ("t2i --src layouts (files, brace or glob patterns, directories, s3:// prefixes):\n"
           f"  tars     webdataset tars of <key>.jpg + <key>.txt (BLIP3o-Pretrain, BLIP3o-60k)\n"
           f"  folders  <stem>.jpg + <stem>.txt pairs at any depth ({'/'.join(IMAGE_EXTS)})\n"
           + json_.format("") + field("image", "image") + field("text", "caption") +
           "  output   <key>.jpg, <key>.txt, <key>.json (provenance)")
    edit = ("edit --src layouts (files, brace or glob patterns, directories, s3:// prefixes):\n"
            "  tars, folders  <key>.input.jpg + <key>.output.jpg + <key>.txt\n"
            + json_.format("; GPT-Image-Edit, ShareGPT-4o-Image") +
            field("input", "input image") + field("output", "output image") + field("text", "instruction") +
            "  output   <key>.input.jpg, <key>.output.jpg, <key>.txt, <key>.json")
    return {"t2i": t2i, "edit": edit}.get(kind or "", t2i + "\n\n" + edit)


def build_parser(description: str, kind: Optional[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, epilog=input_layouts(kind),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if kind is None:
        p.add_argument("--kind", choices=("t2i", "edit"), required=True,
                       help="t2i: image + caption samples; edit: input + output image + instruction")
    p.add_argument("--src", nargs="+", required=True,
                   help="tar / json files, brace or glob patterns, directories or s3:// "
                        "prefixes (local, file:// or s3://); layouts below")
    p.add_argument("--dst", required=True, help="output directory or s3:// prefix (shards + manifest.json); "
                                                "nothing is written outside it")
    p.add_argument("--resize", type=int, default=None,
                   help="re-encode images whose longer side exceeds N to N")
    p.add_argument("--shard-size", type=parse_size, default=(1000, 0),
                   help="samples per shard (1000) or a size like 512MB")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    p.add_argument("--min-side", type=int, default=16, help="drop images smaller than this")
    p.add_argument("--prefix", default="shard", help="shard file name prefix")
    p.add_argument("--workers", type=int, default=0, help="processes (0 = all cores)")
    p.add_argument("--verify", choices=("sha256", "size"), default="sha256",
                   help="how a re-run checks the shards it already wrote")
    p.add_argument("--image-root", default=None,
                   help="json sources: image paths are relative to this (default: the "
                        "json file's folder)")
    roles = {"t2i": ("image", "text"), "edit": ("input", "output", "text")}.get(kind or "",
                                                                              ("input", "output", "image", "text"))
    for role in roles:
        p.add_argument(f"--{role}-field", default=None,
                       help=f"json sources: record field of the {role} (default: the names below)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p


def main(kind: Optional[str], description: str, argv: Optional[List[str]] = None) -> int:
    args = build_parser(description, kind).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    samples, nbytes = args.shard_size
    cfg = PrepConfig(
        srcs=args.src, dst=args.dst, kind=kind or args.kind, resize=args.resize,
        quality=args.quality, min_side=args.min_side, shard_samples=samples,
        shard_bytes=nbytes, prefix=args.prefix, workers=args.workers, verify=args.verify,
        image_root=args.image_root, progress=not args.no_progress,
        fields={r: getattr(args, f"{r}_field") for r in ("input", "output", "image", "text")
                if getattr(args, f"{r}_field", None)})
    try:
        manifest = run(cfg)
    except (PrepError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"dst": cfg.dst, "shards": len(manifest.shards),
                      "samples": manifest.samples, "bytes": manifest.bytes,
                      "skipped": manifest.skipped}))
    return 0

