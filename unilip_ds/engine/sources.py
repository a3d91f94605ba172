"""Digests of the files the frozen weights come from.

A checkpoint holds only what trains (engine/checkpoint.py): at resume and at export the frozen
parts are read again from their sources, the files the config names (`Task.frozen_sources`).
Each checkpoint records a digest per source; a source whose files changed since is refused
with one line naming it, never silently mixed with the trained weights.

The digest of a source is sha256 over its files' names and their own sha256 (a directory
counts its `*.safetensors` and `*.json` files, not recursively: what the loaders read), so a
copy of the same files elsewhere has the same digest. Hashing reads every byte, once per run
(files in parallel threads: gen_stage1's 3.5 GB of frozen weights at 1b in 2.8 s on 2 cores
from the page cache; from a network filesystem at its read speed). The hashes are cached in
the run dir, keyed by each file's (size, mtime_ns, ctime_ns, inode, device): every write to a
file's data changes its ctime, which no user call can set back (utime sets mtime and atime
only), and a file replaced by another has a new inode; so a file whose key is unchanged holds
the bytes that were hashed, and a resume or an export rehashes nothing. A header + size +
mtime digest would not do: an in-place edit that keeps the size, with the mtime put back,
passes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

CACHE = "source_digests.json"  # in the run dir
DIR_FILES = (".safetensors", ".json")
CHUNK = 16 << 20


class SourceChanged(RuntimeError):
    pass


def files_of(path: str | Path) -> List[Path]:
    """The files a source path stands for: a file itself; a directory's weights and configs."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"no such file or directory {p}")
    return sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(DIR_FILES)
                  and not f.name.startswith("."))


def _stat_key(st: os.stat_result) -> List[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])  # hashlib releases the GIL: files hash in parallel threads
    return h.hexdigest()


def _read_cache(cache: Optional[Path]) -> Dict[str, dict]:
    if cache is None or not cache.is_file():
        return {}
    try:
        data = json.loads(cache.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(cache: Optional[Path], entries: Dict[str, dict]) -> None:
    if cache is None:
        return
    try:  # best effort: a read-only run dir only costs a rehash next time
        tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(tmp, cache)
    except OSError:
        pass


def file_digests(files: Iterable[Path], cache: Optional[Path] = None) -> Dict[Path, str]:
    """sha256 of each file, from the cache where its stat key is unchanged."""
    files = list(dict.fromkeys(Path(f) for f in files))
    entries = _read_cache(cache)
    out: Dict[Path, str] = {}
    todo = []
    keys = {}
    for f in files:
        real = str(f.resolve())
        keys[f] = (real, _stat_key(os.stat(real)))
        hit = entries.get(real)
        if hit and hit.get("stat") == keys[f][1] and isinstance(hit.get("sha256"), str):
            out[f] = hit["sha256"]
        else:
            todo.append(f)
    if todo:
        workers = max(1, min(len(todo), 8, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            for f, digest in zip(todo, pool.map(_sha256, todo)):
                out[f] = digest
        for f in todo:
            real, key = keys[f]
            if _stat_key(os.stat(real)) == key:  # not written to while it was hashed
                entries[real] = {"stat": key, "sha256": out[f]}
        _write_cache(cache, entries)
    return out


def digests(sources: Mapping[str, Optional[Sequence[str]]], cache: Optional[Path] = None) -> Dict[str, dict]:
    """{label: {"paths", "sha256", "files", "bytes"}} for every source with files (a source of
    None, random weights, has nothing to digest and is left out)."""
    listed = {label: [(Path(p), files_of(p)) for p in paths] for label, paths in sources.items() if paths}
    hashes = file_digests([f for groups in listed.values() for _, fs in groups for f in fs], cache)
    out = {}
    for label, groups in listed.items():
        h = hashlib.sha256()
        n = size = 0
        for root, fs in groups:
            for f in fs:
                # names relative to the source: a copy of it elsewhere has the same digest
                name = f.name if len(groups) == 1 or root.is_file() else f"{root.name}/{f.name}"
                h.update(f"{name}\t{hashes[f]}\n".encode())
                n += 1
                size += f.stat().st_size
        out[label] = {"paths": [str(p) for p, _ in groups], "sha256": h.hexdigest(), "files": n, "bytes": size}
    return out


def compare(recorded: Mapping[str, dict], current: Mapping[str, dict], what: str) -> None:
    """Raise SourceChanged (one line naming the source) when `current` differs from `recorded`."""
    for label in sorted(set(recorded) | set(current)):
        old, new = recorded.get(label), current.get(label)
        if old is None or new is None:
            had = ", ".join(sorted(recorded)) or "none"
            now = ", ".join(sorted(current)) or "none"
            raise SourceChanged(f"{what} took its frozen weights from {had}; this config reads them from "
                                f"{now}: resume with the sources the run started from")
        if old["sha256"] != new["sha256"]:
            where = ", ".join(new["paths"])
            raise SourceChanged(
                f"{what}: the frozen weights' source {label} ({where}) changed since the run "
                f"started (sha256 {old['sha256'][:12]} -> {new['sha256'][:12]}, {old['files']} -> "
                f"{new['files']} files); checkpoints hold only what trains: put back the files the run "
                "started from, or start a new run")
