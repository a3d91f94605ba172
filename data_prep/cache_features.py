#!/usr/bin/env python
"""Run the generator's frozen parts once over a shard set and write a cache of their outputs
(target latents, edit reference features and, at level `prefix`, the frozen LLM's prompt
prefix: hidden states + per-layer K/V), one cache shard per source shard, keyed by sample.

    python data_prep/cache_features.py --config gen_stage2 --task t2i --src /data/blip3o/ \\
        --dst /data/cache/blip3o --what latents model.init_from=exports/gen_stage1
    torchrun --nproc_per_node 8 data_prep/cache_features.py --config gen_stage2 --task edit \\
        --src 's3://bucket/edit/shard-{000000..000999}.tar' --dst s3://bucket/cache/edit --what prefix ...

The model comes from the same config a training run uses (presets + key=value overrides:
model.init_from or the weight paths); each rank takes its own shards. Before writing it prints
the storage estimate of every level for the whole source set. Finished shards are verified
(size + sha256) and skipped on a re-run; a shard is written under a temporary name and
renamed when complete, so a killed builder leaves no partial shard behind. The manifest
records counts, bytes, hashes and the fingerprint of everything the values depend on.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unilip_ds.data.cache import INDEX_SUFFIX  # noqa: E402

PARTS = "_parts"  # per-shard entries written by the ranks, merged into the manifest


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the gen stage preset the cache is for (e.g. gen_stage2)")
    ap.add_argument("--task", choices=("t2i", "edit"), required=True, help="what the source shards hold")
    ap.add_argument("--src", action="append", required=True,
                    help="source shards (brace pattern, glob, directory, s3:// prefix, manifest); repeatable")
    ap.add_argument("--dst", required=True, help="cache directory or s3:// prefix")
    ap.add_argument("--what", default="latents",
                    help="latents (target latents, edit reference features) | prefix (+ the frozen LLM's "
                         "prompt prefix; = latents,prefix)")
    ap.add_argument("--batch-size", type=int, default=16, help="samples per forward pass (default 16)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="stored dtype (default bf16)")
    ap.add_argument("--device", default=None, help="default: this rank's CUDA device, else cpu")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return ap.parse_intermixed_args(argv)


def level_of(what: str) -> str:
    parts = {p.strip() for p in what.split(",") if p.strip()}
    if not parts or not parts <= {"latents", "prefix"}:
        raise ValueError(f"--what: latents and/or prefix, got '{what}'")
    return "prefix" if "prefix" in parts else "latents"


def build_model(cfg, device, dtype):
    """The run's GenModel with its frozen weights, exactly as training loads them."""
    from unilip_ds.tasks.base import MAIN, build_task
    task = build_task(cfg)
    task.check_inputs()
    modules = task.build_modules()
    if cfg.model.init_from:
        task.init_from(modules, cfg.model.init_from)
    else:
        task.load_pretrained(modules)
    model = modules[MAIN].to(device=device, dtype=dtype).eval()
    return task, model


def estimate(model, builder, task: str, shards: List[str], data_cfg, dtype, texts: List[str]) -> dict:
    """Bytes per sample and for the whole source set, per level."""
    from unilip_ds.data.cache import LEVELS, bytes_per_sample
    from unilip_ds.data.shards import read_manifest
    from unilip_ds.data.storage import join, parent
    samples = None
    try:
        m = read_manifest(join(parent(shards[0]), "manifest.json"), data_cfg)
        names = {Path(s).name for s in shards}
        samples = sum(s.samples for s in m.shards if s.name in names)
    except Exception:  # no data_prep manifest: extrapolate from the first shard
        pass
    if not samples:
        samples = len(texts) * len(shards)
    tokens = sum(len(builder.prefix_ids(task, t)[0]) for t in texts) / max(1, len(texts))
    per = {lv: bytes_per_sample(model, builder, task, lv, dtype, tokens) for lv in LEVELS}
    return {"samples": samples, "mean_prefix_tokens": round(tokens, 1),
            "bytes_per_sample": per, "total_bytes": {lv: b * samples for lv, b in per.items()}}


def first_texts(url: str, data_cfg, task: str, n: int = 64) -> List[str]:
    from unilip_ds.data.decode import TEXT_EXTS
    from unilip_ds.data.stream import iter_shard
    out = []
    for raw in iter_shard(url, data_cfg, None):
        for ext in TEXT_EXTS:
            if raw.get(ext):
                out.append(raw[ext].decode("utf-8", "replace").strip())
        if len(out) >= n:
            break
    return out


def build_shard(model, builder, task: str, url: str, dst_url: str, data_cfg, level: str, dtype,
                batch_size: int, progress) -> dict:
    """One cache shard: decode the source shard's samples as training does, compute, write."""
    import torch

    from unilip_ds.data import storage
    from unilip_ds.data.cache import compute_records, encode_record, record_digest
    from unilip_ds.data.decode import Decoder, SampleError
    from unilip_ds.data.stream import iter_shard
    decoder = Decoder(task, data_cfg.resolution, train=False)
    device = next(model.parameters()).device
    skipped: dict = {}

    def skip(reason: str, _detail: str = "") -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    h, samples, index = hashlib.sha256(), 0, {}
    with storage.open_output(dst_url, hasher=h) as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            pending: list = []

            def flush() -> None:
                nonlocal samples
                if not pending:
                    return
                images = torch.stack([p["image"] for p in pending]).to(device).float().div_(255)
                refs = torch.stack([p["input_image"] for p in pending]).to(device).float().div_(255) \
                    if task == "edit" else None
                texts = [p["caption" if task == "t2i" else "instruction"] for p in pending]
                for p, rec in zip(pending, compute_records(model, builder, task, images, texts, level, dtype,
                                                           refs)):
                    data = encode_record(rec)
                    info = tarfile.TarInfo(f"{p['__key__']}.cache")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    # one 512-byte USTAR header, then the data: readers fetch a record by range
                    index[p["__key__"]] = [tar.offset + tarfile.BLOCKSIZE, len(data), record_digest(data)]
                    tar.addfile(info, io.BytesIO(data))
                samples += len(pending)
                progress(len(pending))
                pending.clear()

            for raw in iter_shard(url, data_cfg, skip):
                try:
                    fields = decoder(raw)
                except SampleError as exc:
                    skip(exc.reason)
                    continue
                fields["__key__"] = raw["__key__"]
                pending.append(fields)
                if len(pending) >= batch_size:
                    flush()
            flush()
        nbytes = f.nbytes
    # key -> [byte offset, length] of its record: random access without scanning the shard
    storage.write_bytes(dst_url + INDEX_SUFFIX, json.dumps(index).encode(), data_cfg)
    return {"samples": samples, "bytes": nbytes, "sha256": h.hexdigest(), "skipped": skipped}


def remove_leftovers(dst_url: str) -> None:
    """A builder killed while writing this shard left its temporary file (local storage;
    an S3 upload that never completed is not visible): remove it before rebuilding. Only
    this shard's own temporary names are touched, and only this rank builds this shard."""
    from unilip_ds.data import storage
    if storage.is_s3(dst_url):
        return
    path = Path(storage.local_path(dst_url))
    for tmp in path.parent.glob(f"{path.name}.tmp-*"):
        tmp.unlink(missing_ok=True)


def main(argv=None) -> int:
    args = parse(argv)
    try:
        level = level_of(args.what)
        if args.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from unilip_ds.config import ConfigError, load_config
    from unilip_ds.data import DataError
    from unilip_ds.data.cache import CacheError
    from unilip_ds.data.storage import StorageError
    from unilip_ds.engine.weights import WeightsMismatch
    srcs = ",".join(json.dumps(s) for s in args.src)
    overrides = list(args.overrides) + [f"data.train.urls=[{srcs}]", f"data.train.task={args.task}"]
    try:
        cfg = load_config(args.config, overrides, world_size=1)
        return run(args, cfg, level)
    except (ConfigError, DataError, CacheError, StorageError, WeightsMismatch, FileNotFoundError) as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args, cfg, level: str) -> int:
    import torch

    from unilip_ds.data import storage
    from unilip_ds.data.cache import MANIFEST, CacheError, CacheManifest, CacheShard, fingerprint
    from unilip_ds.data.shards import list_shards
    from unilip_ds.engine import dist
    from data_prep.sharding import verify_shard
    from unilip_ds.data.shards import ShardInfo
    shards = list_shards(list(args.src), cfg.data)
    world = dist.world_size()
    if world > 1:
        dist.init()
    rank = dist.rank()
    device = torch.device(args.device) if args.device else dist.device()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    task, model = build_model(cfg, device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    builder = task.prompts()
    fp = fingerprint(model, builder, level, dtype, cfg.model.flavor)
    manifest_url = storage.join(args.dst, MANIFEST)
    if storage.exists(manifest_url, cfg.data):
        old = CacheManifest.from_json(storage.read_bytes(manifest_url, cfg.data).decode())
        if old.fingerprint != fp or old.task != args.task:
            from unilip_ds.data.cache import mismatch
            why = mismatch(old.fingerprint, fp) or f"task {old.task} != {args.task}"
            raise CacheError(f"--dst {args.dst} holds a cache built differently ({why}); "
                             "choose another --dst")
    if rank == 0:
        est = estimate(model, builder, args.task, shards, cfg.data, dtype,
                       first_texts(shards[0], cfg.data, args.task))
        print(json.dumps({"storage_estimate": est, "level": level, "shards": len(shards), "ranks": world}),
              flush=True)
    mine = shards[rank::world]
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=None, unit="sample", desc=f"cache {level}")
    done = 0
    for url in mine:
        name = Path(storage.local_path(url) if not storage.is_s3(url) else url).name
        dst_url = storage.join(args.dst, name)
        part_url = storage.join(storage.join(args.dst, PARTS), f"{name}.json")
        if storage.exists(part_url, cfg.data) and storage.exists(dst_url + INDEX_SUFFIX, cfg.data):
            part = json.loads(storage.read_bytes(part_url, cfg.data))
            if part.get("fingerprint") == fp and verify_shard(
                    dst_url, ShardInfo(name, part["samples"], part["bytes"], part["sha256"])):
                done += 1
                continue  # finished by an earlier run
        remove_leftovers(dst_url)
        t0 = time.time()
        info = build_shard(model, builder, args.task, url, dst_url, cfg.data, level, dtype, args.batch_size,
                           bar.update if bar is not None else (lambda n: None))
        storage.write_bytes(part_url, json.dumps({**info, "source": url, "fingerprint": fp, "rank": rank,
                                                  "seconds": round(time.time() - t0, 2)}).encode(), cfg.data)
    if bar is not None:
        bar.close()
    if world > 1:
        dist.barrier()
    if rank == 0:
        entries = []
        for url in shards:
            name = Path(storage.local_path(url) if not storage.is_s3(url) else url).name
            part = json.loads(storage.read_bytes(storage.join(storage.join(args.dst, PARTS), f"{name}.json"),
                                                 cfg.data))
            entries.append(CacheShard(name, part["source"], part["samples"], part["bytes"], part["sha256"],
                                      part["skipped"]))
        manifest = CacheManifest(args.task, level, fp, entries)
        storage.write_bytes(manifest_url, manifest.to_json().encode(), cfg.data)
        print(json.dumps({"dst": args.dst, "level": level, "shards": len(entries), "reused": done,
                          "samples": sum(e.samples for e in entries),
                          "bytes": sum(e.bytes for e in entries)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
