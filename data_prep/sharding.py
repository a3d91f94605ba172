"""Raw data -> validated, de-duplicated, evenly sized tar shards + a manifest.

Three phases, each resumable, all writes inside --dst:
0. find: the sources are listed and fingerprinted (every tar / json / list file with its
   size and mtime or ETag); with the settings they are the run's identity, saved in
   `<dst>/_staging/run.json` and in the manifest. A re-run with other settings or
   sources is refused in one line naming what changed; --restart moves the old set
   (manifest, shards, staging) aside to `<dst>/_replaced-<time>/` and starts anew.
1. validate: each source unit (sources.py) is read by a worker process; every sample is
   decoded and checked, optionally re-encoded at --resize, and appended to a staging tar
   `<dst>/_staging/unit-NNNNNN.tar`; a `.json` next to it (written last) records each
   sample's content digest and byte range, the skip counts and the first offending paths
   per reason. A re-run skips units whose json exists, unless that unit lost samples to
   a missing or unreadable input (then it is redone: the input may have been fixed).
2. plan: units in source order, the first sample of each content digest wins (later
   ones count as `duplicate`), the rest is cut into shards of equal sample count (or
   bytes). Held as numpy arrays: about 60 B per sample at the peak (README: 27M samples).
   If more than --max-skip-rate of the samples read were lost, the run stops here with
   the counts by reason and the first offending paths (exit 3).
3. write: each shard is a byte copy of its samples' tar blocks from staging (no
   re-decoding), written atomically with its sha256; the manifest is rewritten after
   every shard. A re-run keeps every shard the manifest lists whose size, sha256 and
   planned content match. When all shards are written the manifest says complete and
   the staging folder is removed.
"""

from __future__ import annotations

import argparse
import base64
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

import numpy as np
from tqdm import tqdm

from data_prep import sources as S
from data_prep.sources import FILTERED, RETRY, Options, PrepError, Skip, Unit, build_sample
from unilip_ds.data import storage
from unilip_ds.data.shards import MANIFEST_NAME, Manifest, ShardInfo, read_manifest, \
    write_manifest
from unilip_ds.data.storage import StorageError

log = logging.getLogger("data_prep")

STAGING = "_staging"
RUN_FILE = "run.json"
TAR_RECORD = 10240  # tar(1) pads archives to 20 blocks
# one staged sample: its 128-bit content digest (hi, lo) and byte range in the unit tar
ENTRY = np.dtype([("h", "<u8"), ("l", "<u8"), ("s", "<u8"), ("e", "<u8")])


class SkipRateError(PrepError):
    """Too many samples lost; the message has the counts and examples (several lines)."""


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
    max_skip_rate: float = 0.05  # lost / read above this stops the run (exit 3)
    restart: bool = False  # move an old set with other settings / sources aside

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
    examples: Dict[str, List[str]] = {}
    entries: List[Tuple[int, int, int, int]] = []
    read = 0
    with storage.open_output(tar_url) as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for ref, parts in S.read_unit(unit, skipped, examples):
                read += 1
                try:
                    if isinstance(parts, str):
                        raise Skip(parts, ref)
                    digest, members = build_sample(unit.kind, parts, ref, opts)
                except Skip as s:
                    S.note(skipped, examples, s.args[0],
                           f"{ref} ({s.args[1]})" if len(s.args) > 1 and s.args[1] != ref
                           else ref)
                    continue
                start = tar.offset
                key = digest[:8].hex()
                for ext, data in members.items():
                    _add_member(tar, f"{key}.{ext}", data)
                entries.append((int.from_bytes(digest[:8], "big"),
                                int.from_bytes(digest[8:16], "big"), start, tar.offset))
    record = {"index": unit.index, "id": unit.identity(), "read": read, "samples": len(entries),
              "entries": base64.b64encode(np.array(entries, ENTRY).tobytes()).decode(),
              "skipped": skipped, "examples": examples,
              "retry": any(r in skipped for r in RETRY)}
    storage.write_bytes(json_url, json.dumps(record).encode())
    record.pop("entries")
    return record


def _entries(dst: str, index: int) -> np.ndarray:
    rec = json.loads(storage.read_bytes(_unit_urls(dst, index)[1]))
    return np.frombuffer(base64.b64decode(rec["entries"]), ENTRY)


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
            for out in pool.imap_unordered(fn, tasks, chunksize=1):
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


def skip_report(records: List[Dict[str, Any]], skipped: Dict[str, int],
                max_rate: float) -> Optional[str]:
    """The message when more than max_rate of the samples read were lost (or of the
    units are corrupt tars), else None. Lost: read, not kept, not a duplicate and not
    left out by design (FILTERED)."""
    read = sum(r["read"] for r in records)
    valid = sum(r["samples"] for r in records)
    filtered = sum(n for k, n in skipped.items() if k in FILTERED)
    considered = read - filtered
    lost = considered - valid
    # a corrupt tar loses an unknown number of samples: it counts as a share of the units
    corrupt = skipped.get("corrupt_tar", 0) / max(1, len(records))
    if (considered <= 0 or lost / considered <= max_rate) and corrupt <= max_rate:
        return None
    examples: Dict[str, List[str]] = {}
    for rec in sorted(records, key=lambda r: r["index"]):
        for reason, paths in rec.get("examples", {}).items():
            ex = examples.setdefault(reason, [])
            ex += paths[:S.EXAMPLES - len(ex)]
    share = lost / max(1, considered)
    head = (f"{lost} of {considered} samples read ({100 * share:.1f}%) were lost"
            if share > max_rate else
            f"{skipped['corrupt_tar']} of {len(records)} source units ({100 * corrupt:.1f}%) "
            f"are corrupt tars")
    lines = [f"{head}, more than --max-skip-rate {max_rate:g}; nothing written. By reason:"]
    for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]):
        tag = " (left out by design, not counted)" if reason in FILTERED else \
            " (not counted)" if reason == "duplicate" else ""
        lines.append(f"  {reason}: {n}{tag}")
        lines += [f"    {p}" for p in examples.get(reason, [])]
    lines.append("fix the input (units that lost files are redone on the next run), or "
                 "raise --max-skip-rate")
    return "\n".join(lines)


def plan_shards(records: List[Dict[str, Any]], cfg: PrepConfig,
                load=None) -> Tuple[List[ShardPlan], Dict[str, int]]:
    """Dedup + cut into shards. Per-sample state is numpy arrays (ENTRY, 32 B, plus the
    sort's 24 B); `load(index)` gives a unit's entries (default: from its staging json)."""
    load = load or (lambda i: _entries(cfg.dst, i))
    records = sorted(records, key=lambda r: r["index"])
    skipped: Dict[str, int] = {}
    for rec in records:
        for reason, n in rec["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    counts = np.array([r["samples"] for r in records], np.int64)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    total = int(bounds[-1])
    if not total:
        raise PrepError(f"no valid samples in --src (skipped: {skipped or 'nothing read'})")
    ent = np.empty(total, ENTRY)
    for rec, a, b in zip(records, bounds[:-1], bounds[1:]):
        if b > a:
            ent[a:b] = load(rec["index"])
    # first occurrence of each digest: a stable sort keeps equal digests in source order
    order = np.lexsort((ent["l"], ent["h"]))
    h, lo = ent["h"][order], ent["l"][order]
    dup = (h[1:] == h[:-1]) & (lo[1:] == lo[:-1])
    del h, lo
    keep = np.ones(total, bool)
    keep[order[1:][dup]] = False
    del order, dup
    kidx = np.flatnonzero(keep)
    del keep
    if total - len(kidx):
        skipped["duplicate"] = skipped.get("duplicate", 0) + int(total - len(kidx))
    units = np.array([r["index"] for r in records], np.int64)
    k = len(kidx)
    if cfg.shard_bytes:
        sizes = (ent["e"][kidx] - ent["s"][kidx]).astype(np.int64)
        nbytes = int(sizes.sum())
        n = max(1, math.ceil(nbytes / cfg.shard_bytes))
        cum = np.cumsum(sizes) - sizes  # contiguous cut at equal byte fractions
        del sizes
        assign = np.minimum(n - 1, cum * n // nbytes)
        del cum
    else:
        n = math.ceil(k / cfg.shard_samples)
        assign = np.arange(k, dtype=np.int64) * n // k  # sizes differ by <= 1
    unit_of = np.searchsorted(bounds, kidx, side="right") - 1
    starts, ends = ent["s"][kidx], ent["e"][kidx]
    brk = np.ones(k, bool)
    brk[1:] = (assign[1:] != assign[:-1]) | (unit_of[1:] != unit_of[:-1]) | \
        (starts[1:] != ends[:-1])
    first = np.flatnonzero(brk)
    last = np.append(first[1:], k) - 1
    width = max(6, len(str(n - 1)))
    plans = [ShardPlan(f"{cfg.prefix}-{j:0{width}d}.tar", [], 0, "") for j in range(n)]
    for a, b in zip(first.tolist(), last.tolist()):
        plans[int(assign[a])].ranges.append((int(units[unit_of[a]]), int(starts[a]),
                                             int(ends[b])))
    cuts = np.searchsorted(assign, np.arange(n + 1))
    dig = np.empty((0, 2), ">u8")
    for j, p in enumerate(plans):
        a, b = int(cuts[j]), int(cuts[j + 1])
        p.samples = b - a
        sel = kidx[a:b]
        dig = np.stack([ent["h"][sel], ent["l"][sel]], axis=1).astype(">u8")
        p.content = hashlib.sha256(dig.tobytes()).hexdigest()
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


def _differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """What changed between two run identities, as short phrases."""
    out = []
    o, n = old.get("settings", {}), new["settings"]
    for k in sorted(set(o) | set(n)):
        if o.get(k) != n.get(k):
            out.append(f"{k} {json.dumps(o.get(k))} -> {json.dumps(n.get(k))}")
    o, n = old.get("sources", {}), new["sources"]
    for f in sorted(set(o) | set(n)):
        if f not in o:
            out.append(f"source added: {f}")
        elif f not in n:
            out.append(f"source removed: {f}")
        elif o[f] != n[f]:
            what = ", ".join(f"{k} {o[f].get(k)} -> {n[f].get(k)}" for k in sorted(n[f])
                             if o[f].get(k) != n[f].get(k))
            out.append(f"source changed: {f} ({what})")
    return out


def _move_aside(dst: str, old: Optional[Manifest]) -> str:
    """--restart: the old manifest, its shards and the staging go to _replaced-<time>/."""
    aside = storage.join(dst, time.strftime("_replaced-%Y%m%dT%H%M%S", time.gmtime()))
    names = [STAGING, MANIFEST_NAME] + ([s.name for s in old.shards] if old else [])
    for name in names:
        src = storage.join(dst, name)
        if not storage.exists(src):
            continue
        if storage.is_s3(src):
            fs = storage.s3_filesystem()
            storage.with_retry(lambda: fs.mv(storage.s3_key(src), storage.s3_key(
                storage.join(aside, name)), recursive=True), src)
        else:
            os.makedirs(storage.local_path(aside), exist_ok=True)
            os.replace(storage.local_path(src), storage.local_path(storage.join(aside, name)))
    return aside


def _tar_index(cfg: PrepConfig, tars: List[str]) -> Dict[str, Tuple[str, int, int]]:
    """The member index of a root's image tars, built once (kept in the staging)."""
    key = hashlib.sha256(json.dumps([(t, S.stat(t)) for t in tars]).encode()).hexdigest()[:16]
    url = _staging(cfg.dst, f"tarindex-{key}.json")
    if storage.exists(url):
        return {k: tuple(v) for k, v in json.loads(storage.read_bytes(url)).items()}
    log.info("indexing %d image tars (once)", len(tars))
    index = S.index_tars(tars, progress=lambda t: log.info("  %s", t))
    storage.write_bytes(url, json.dumps(index).encode())
    return index


def run(cfg: PrepConfig) -> Manifest:
    """Build (or finish) the shards of cfg.srcs in cfg.dst; returns the final manifest."""
    t0 = time.time()
    if cfg.kind not in ("t2i", "edit"):
        raise PrepError(f"kind must be t2i or edit, got {cfg.kind!r}")
    if cfg.shard_samples < 1 and cfg.shard_bytes < 1:
        raise PrepError("--shard-size must be positive")
    if not 0 <= cfg.max_skip_rate <= 1:
        raise PrepError("--max-skip-rate must be between 0 and 1")
    _check_paths(cfg)
    workers = cfg.workers or os.cpu_count() or 1

    # 0. find: the run's identity = settings + sources with sizes / mtimes
    sources = S.find_sources(cfg.srcs, cfg.kind, image_root=cfg.image_root)
    ident = {"settings": cfg.params(), "sources": S.source_files(sources)}
    manifest_url = storage.join(cfg.dst, MANIFEST_NAME)
    run_url = _staging(cfg.dst, RUN_FILE)
    old = read_manifest(manifest_url) if storage.exists(manifest_url) else None
    before = old.params if old is not None else None
    if storage.exists(run_url):
        before = json.loads(storage.read_bytes(run_url))
    if before is not None and before != ident:
        diff = (_differences(before, ident) if "settings" in before else
                ["made by an older data_prep, without a record of its sources"])
        if not cfg.restart:
            more = f"; and {len(diff) - 3} more" if len(diff) > 3 else ""
            raise PrepError(f"--dst {cfg.dst} holds a run with other settings or sources "
                            f"({'; '.join(diff[:3])}{more}); rerun with the same ones, or "
                            f"add --restart to move it aside and start anew")
        aside = _move_aside(cfg.dst, old)
        log.warning("--restart: the old set (%s) moved to %s", "; ".join(diff[:3]), aside)
        old = None
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
    storage.write_bytes(run_url, json.dumps(ident).encode())

    # 1. validate
    def spill(k: int, data: bytes) -> str:
        url = _staging(cfg.dst, f"records-{k:05d}.jsonl")
        storage.write_bytes(url, data)
        return url

    units = S.plan_units(sources, cfg.kind, image_root=cfg.image_root, fields=cfg.fields,
                         tar_index=lambda tars: _tar_index(cfg, tars), spill=spill)
    records, todo = [], []
    for u in units:
        json_url = _unit_urls(cfg.dst, u.index)[1]
        rec = json.loads(storage.read_bytes(json_url)) if storage.exists(json_url) else None
        if rec is not None and rec.get("id") == u.identity() and not rec.get("retry"):
            rec.pop("entries")
            records.append(rec)
        else:
            todo.append((u, cfg.dst, cfg.options()))
    del units
    if records:
        log.info("resuming: %d of %d source units already validated", len(records),
                 len(records) + len(todo))
    records += list(_pool_map(process_unit, todo, workers, "validate", cfg.progress))
    del todo

    # 2. plan
    plans, skipped = plan_shards(records, cfg)
    report = skip_report(records, skipped, cfg.max_skip_rate)
    if report:
        raise SkipRateError(report)

    # 3. write
    manifest = Manifest(kind=cfg.kind, skipped=skipped, params=ident)
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
    json_ = ("  json     a list of records or JSON Lines (.json / .jsonl){}\n"
             "           image paths relative to --image-root, default the json's folder (the\n"
             "           task folder for <task>/metadata/*.json); when that folder holds .tar\n"
             "           files the images are read from them by member name (no extracting);\n"
             "           the fields tried:\n")
    t2i = ("t2i --src layouts (files, brace or glob patterns, directories, s3:// prefixes):\n"
           f"  tars     webdataset tars of <key>.jpg + <key>.txt (BLIP3o-Pretrain, BLIP3o-60k)\n"
           f"  folders  <stem>.jpg + <stem>.txt pairs at any depth ({'/'.join(IMAGE_EXTS)})\n"
           + json_.format("\n           e.g. ShareGPT-4o-Image text_to_image.json") + field("image", "image") +
           field("text", "caption") +
           "  output   <key>.jpg, <key>.txt, <key>.json (provenance)")
    edit = ("edit --src layouts (files, brace or glob patterns, directories, s3:// prefixes):\n"
            "  tars, folders  <key>.input.jpg + <key>.output.jpg + <key>.txt\n"
            + json_.format("\n           e.g. GPT-Image-Edit-1.5M <src>/<task>/metadata/*.json, "
                           "ShareGPT-4o-Image\n           text_and_image_to_image.json") +
            field("input", "input image") + field("output", "output image") +
            field("text", "instruction") +
            "           LLaVA-style records: image: [input, output], conversations[0].value\n"
            "  list     a .txt of img_dir,json[,flag] lines (the reference's list of LLaVA-style\n"
            "           GPT-Image-Edit jsons; paths relative to the list file's folder)\n"
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
    p.add_argument("--max-skip-rate", type=float, default=0.05,
                   help="stop (exit 3, nothing written) when more than this fraction of the "
                        "samples read is lost (duplicates and records left out by design "
                        "not counted); prints the counts by reason and the first paths")
    p.add_argument("--restart", action="store_true",
                   help="when --dst holds a run with other settings or sources, move it "
                        "aside to <dst>/_replaced-<time>/ and start anew")
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
        max_skip_rate=args.max_skip_rate, restart=args.restart,
        fields={r: getattr(args, f"{r}_field") for r in ("input", "output", "image", "text")
                if getattr(args, f"{r}_field", None)})
    try:
        manifest = run(cfg)
    except SkipRateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (PrepError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"dst": cfg.dst, "shards": len(manifest.shards),
                      "samples": manifest.samples, "bytes": manifest.bytes,
                      "skipped": manifest.skipped}))
    return 0

