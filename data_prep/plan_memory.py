#!/usr/bin/env python
"""Peak memory per sample of data_prep's plan step (dedup + cut into shards), measured
on a synthetic staging folder: `--units` unit records holding `--samples` entries in
all, `--dup` of them repeating an earlier digest.

    python data_prep/plan_memory.py --samples 27000000 --units 2700 --dir /tmp/planmem

writes the synthetic unit records under --dir/_staging (32 B per sample as base64 json,
~1.2 GB at 27M), then plans them in a fresh process, as `run` does after validating:
every unit record read (metadata kept), then `plan_shards`. Prints one json line:
samples, kept, duplicates, shards, peak_mb (peak RSS above the process's RSS after its
imports) and bytes_per_sample. --keep keeps the synthetic files.
"""

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


# sharding.ENTRY and its staging names, here so that writing needs no heavy imports (a
# mismatch fails the measurement, which reads them through sharding)
ENTRY = np.dtype([("h", "<u8"), ("l", "<u8"), ("s", "<u8"), ("e", "<u8")])


def write_staging(root: Path, samples: int, units: int, dup: float, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, samples, units + 1).astype(np.int64)
    n_dup = int(samples * dup)
    first = min(5000, samples // 2)  # duplicates repeat one of the first samples' digests
    dup_pos = np.sort(rng.choice(np.arange(first, samples), n_dup, replace=False))
    orig_h = orig_l = None
    for u in range(units):
        a, b = int(bounds[u]), int(bounds[u + 1])
        e = np.empty(b - a, ENTRY)
        e["h"] = rng.integers(0, 2 ** 63, b - a, dtype=np.uint64)
        e["l"] = rng.integers(0, 2 ** 63, b - a, dtype=np.uint64)
        sizes = rng.integers(20_000, 200_000, b - a, dtype=np.uint64) // 512 * 512
        e["e"] = np.cumsum(sizes)
        e["s"] = e["e"] - sizes
        if orig_h is None:
            orig_h, orig_l = e["h"][:first].copy(), e["l"][:first].copy()
        mine = dup_pos[(dup_pos >= a) & (dup_pos < b)] - a
        src = rng.integers(0, first, len(mine))
        e["h"][mine], e["l"][mine] = orig_h[src], orig_l[src]
        rec = {"index": u, "id": "synthetic", "read": b - a, "samples": b - a,
               "entries": base64.b64encode(e.tobytes()).decode(), "skipped": {},
               "examples": {}, "retry": False}
        path = root / "_staging" / f"unit-{u:06d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))
    return n_dup


def measure(root: Path, units: int, shard_size: int) -> dict:
    from data_prep.sharding import PrepConfig, _unit_urls, plan_shards

    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak from here on
    t0 = time.time()
    records = []
    for u in range(units):  # as run() does for units validated earlier
        rec = json.loads(Path(_unit_urls(str(root), u)[1]).read_bytes())
        rec.pop("entries")
        records.append(rec)
    cfg = PrepConfig(srcs=[], dst=str(root), shard_samples=shard_size)
    plans, skipped = plan_shards(records, cfg)
    peak = _status("VmHWM") - base
    samples = sum(r["samples"] for r in records)
    return {"samples": samples, "kept": sum(p.samples for p in plans),
            "duplicates": skipped.get("duplicate", 0), "shards": len(plans),
            "ranges": sum(len(p.ranges) for p in plans), "seconds": round(time.time() - t0, 1),
            "peak_mb": round(peak / 2 ** 20, 1), "bytes_per_sample": round(peak / samples, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=27_000_000, help="samples in all")
    p.add_argument("--units", type=int, default=2700, help="unit records (source tars)")
    p.add_argument("--dup", type=float, default=0.02, help="fraction of duplicate samples")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--dir", required=True, help="scratch folder for the synthetic staging")
    p.add_argument("--keep", action="store_true", help="keep the synthetic files")
    p.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    root = Path(args.dir) / "planmem"
    if args.measure_only:
        print(json.dumps(measure(root, args.units, args.shard_size)))
        return 0
    if root.exists():
        shutil.rmtree(root)
    try:
        write_staging(root, args.samples, args.units, args.dup)
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:],
                              "--measure-only"], capture_output=True, text=True)
        sys.stderr.write(out.stderr)
        if out.returncode:
            return out.returncode
        print(out.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
