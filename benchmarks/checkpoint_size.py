"""Checkpoint bytes and write time with every parameter (before) and with only what trains
(after: the frozen parts are read from their sources at resume and export), at the real
dimensions of a flavor, through the trainer's own code: the stage's modules, its DeepSpeed
engines (ZeRO-2 by default, bf16, one process), one optimizer step (so the Adam moments
exist; the loss is 0 x the sum of the trainable weights, no forward), then
unilip_ds.engine.checkpoint.save twice: `frozen_saved: true` (all parameters, what every
checkpoint held before) and `false` (DeepSpeed's exclude_frozen_parameters, tied aliases too).

    .venv/bin/python benchmarks/checkpoint_size.py                      # gen_stage1 + recon_stage1, 1b
    .venv/bin/python benchmarks/checkpoint_size.py --stages "" --computed gen_stage2,gen_stage3  # counts only
    .venv/bin/python benchmarks/checkpoint_size.py --flavor tiny --stages gen_stage1,gen_stage2,recon_stage1

The weights are left uninitialised (built on the meta device, then allocated in bf16: sizes
and write times do not depend on values). Memory: about the bf16 model + 16 bytes per
trainable parameter (fp32 master, two moments, bf16 gradient): ~6 GB for gen_stage1 at 1b,
~14 GB for gen_stage2 (the DiT trains). Write time is `checkpoint.save` returning (the OS may
still hold the bytes in its page cache) and, separately, the `sync` that puts them on disk;
the median of `--repeat` saves of each kind, alternating.
The digest row: sha256 of the frozen weights as bf16 safetensors files, what a fresh start
hashes once (cold) and a resume or export finds in the run dir's cache (warm).

On CUDA the "before" checkpoint is larger still: DeepSpeed also writes the frozen parameters
as `frozen_param_fragments` (`param.cpu()`: a second copy); on CPU that is the same storage,
written once, so the figures here are a lower bound of the saving.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))

import torch  # noqa: E402


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def build(stage: str, flavor: str, ds_config: str):
    from unilip_ds.config import load_config
    from unilip_ds.engine.ds_config import check_ds_config
    from unilip_ds.engine.engines import build_engines
    from unilip_ds.tasks.base import build_task
    over = [f"model.flavor={flavor}", "train.micro_batch_size=1", "train.grad_accum=1",
            "train.global_batch_size=0", "train.precision=bf16", "model.perceptual_pretrained=false",
            "data.train.urls=[/nonexistent]", "data.train.sources=[]", "ema.enabled=false"]
    if flavor == "tiny":
        over.append("data.resolution=224" if "gen" in stage else "data.resolution=224")
    cfg = load_config(stage, over, world_size=1)
    ds_raw = check_ds_config(cfg, ds_config, 1)
    task = build_task(cfg)
    with torch.device("meta"):
        modules = task.build_modules()
    for m in modules.values():  # bf16 as the engine holds it; no values (sizes do not depend on them)
        tied = {}
        for name, p in m.named_parameters(remove_duplicate=False):
            tied.setdefault(id(p), []).append(name)
        m.to(torch.bfloat16).to_empty(device="cpu")
        for names in tied.values():  # to_empty gives each name its own tensor: tie them again
            first = m.get_parameter(names[0])
            for name in names[1:]:
                owner, _, attr = name.rpartition(".")
                setattr(m.get_submodule(owner), attr, first)
        for b in m.buffers():
            b.zero_()
    engines = build_engines(task, modules, cfg, ds_raw, 1)
    for e in engines.values():  # one step: the Adam moments exist, as in any real checkpoint
        loss = sum((p.float() * 0).sum() for p in e.module.parameters() if p.requires_grad)
        e.backward(loss)
        e.step()
    return cfg, task, modules, engines


def counts(modules) -> dict:
    from unilip_ds.tasks.base import MAIN
    seen, train, frozen = set(), 0, 0
    for m in modules.values():
        for p in m.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad:
                train += p.numel()
            else:
                frozen += p.numel()
    return {"trainable": train, "frozen": frozen, "main": MAIN}


def timed_save(root: Path, engines, frozen_saved: bool, i: int = 0) -> dict:
    from unilip_ds.engine import checkpoint
    out = root / f"{'all' if frozen_saved else 'lean'}{i}"
    os.sync()  # start from clean page cache
    t0 = time.perf_counter()
    cdir = checkpoint.save(out, 1, engines, {"data": {}}, {"frozen_saved": frozen_saved, "config": {}},
                           keep_last=1)
    t_save = time.perf_counter() - t0
    t0 = time.perf_counter()
    os.sync()
    t_sync = time.perf_counter() - t0
    files = sorted(str(f.relative_to(cdir)) for f in cdir.rglob("*") if f.is_file())
    return {"bytes": _bytes(cdir), "save_s": t_save, "sync_s": t_sync, "files": files, "dir": cdir}


def median_run(runs) -> dict:
    out = dict(runs[-1])
    for k in ("save_s", "sync_s"):
        out[k] = statistics.median(r[k] for r in runs)
        out[k + "_all"] = [round(r[k], 2) for r in runs]
    return out


def digest_times(root: Path, modules) -> dict:
    """sha256 of the frozen weights written as bf16 safetensors (the sources), cold and cached."""
    from safetensors.torch import save_file

    from unilip_ds.engine import sources
    src = root / "sources"
    src.mkdir()
    n = 0

    def write_safetensors(tensors, path):  # no copies (weights.write_safetensors clones)
        save_file(tensors, str(path), metadata={"format": "pt"})
    for name, m in modules.items():
        sd = {k: p.detach() for k, p in m.named_parameters() if not p.requires_grad}  # tied: once
        chunk, size, part = {}, 0, 0
        for k, v in sd.items():  # files of at most ~2 GiB, as published checkpoints shard
            chunk[k] = v
            size += v.numel() * v.element_size()
            if size > 2 << 30:
                write_safetensors(chunk, src / f"{name}-{part:03d}.safetensors")
                chunk, size, part = {}, 0, part + 1
        if chunk:
            write_safetensors(chunk, src / f"{name}-{part:03d}.safetensors")
        n += sum(v.numel() for v in sd.values())
    os.sync()
    cache = root / sources.CACHE
    t0 = time.perf_counter()
    sources.digests({"frozen": [str(src)]}, cache)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    sources.digests({"frozen": [str(src)]}, cache)
    warm = time.perf_counter() - t0
    return {"bytes": _bytes(src), "cold_s": cold, "warm_s": warm}


def computed(stage: str, flavor: str) -> dict:
    """The bytes of a ZeRO-2 bf16 checkpoint from the parameter counts alone (meta device): the
    module in bf16 (2 bytes a parameter: every one before, the trainable ones after) plus the
    fp32 master weights and two Adam moments of the trainable ones (12 bytes), which is what the
    measured rows come to within 0.01% (the rest is pickled metadata)."""
    from unilip_ds.config import load_config
    from unilip_ds.tasks.base import build_task
    over = [f"model.flavor={flavor}", "model.perceptual_pretrained=false", "data.train.urls=[/nonexistent]",
            "data.train.sources=[]"] + (["data.resolution=224"] if flavor == "tiny" else [])
    task = build_task(load_config(stage, over, world_size=1))
    with torch.device("meta"):
        c = counts(task.build_modules())
    t, f = c["trainable"], c["frozen"]
    return {"stage": stage, "flavor": flavor, "trainable_params": t, "frozen_params": f,
            "trainable_frac": t / (t + f), "before_bytes": 2 * (t + f) + 12 * t, "after_bytes": 14 * t,
            "computed": True}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="gen_stage1,recon_stage1", help="comma-separated presets")
    ap.add_argument("--flavor", default="1b")
    ap.add_argument("--ds-config", default="ds_configs/zero2.json")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory, removed)")
    ap.add_argument("--no-digest", action="store_true", help="skip writing and hashing the frozen sources")
    ap.add_argument("--computed", default="", help="comma-separated presets whose bytes are computed from "
                    "the parameter counts (no allocation: e.g. gen_stage2 at 1b needs ~14 GB to measure)")
    ap.add_argument("--repeat", type=int, default=3, help="saves of each kind (median reported)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    from unilip_ds.engine import dist
    dist.ensure_env()
    dist.init(600)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results = []
    for stage in [s for s in args.stages.split(",") if s]:
        root = Path(tempfile.mkdtemp(prefix=f"ckpt_{stage}_", dir=args.dir))
        try:
            t0 = time.perf_counter()
            cfg, task, modules, engines = build(stage, args.flavor, args.ds_config)
            built = time.perf_counter() - t0
            c = counts(modules)
            runs = {True: [], False: []}
            for i in range(args.repeat):  # alternating, each written anew; the median is reported
                for kind in ((True, False) if i % 2 == 0 else (False, True)):
                    runs[kind].append(timed_save(root, engines, kind, i))
                    if i < args.repeat - 1:
                        shutil.rmtree(runs[kind][-1]["dir"])
            before, after = (median_run(runs[k]) for k in (True, False))
            row = {"stage": stage, "flavor": args.flavor, "ds_config": args.ds_config,
                   "trainable_params": c["trainable"], "frozen_params": c["frozen"],
                   "trainable_frac": c["trainable"] / (c["trainable"] + c["frozen"]), "build_s": built}
            for k, v in (("before", before), ("after", after)):
                row.update({f"{k}_bytes": v["bytes"], f"{k}_save_s": v["save_s"], f"{k}_sync_s": v["sync_s"],
                            f"{k}_save_s_each": v["save_s_all"], f"{k}_files": v["files"]})
            if not args.no_digest:
                shutil.rmtree(before["dir"], ignore_errors=True)  # disk for the sources
                d = digest_times(root, modules)
                row.update({"sources_bytes": d["bytes"], "digest_cold_s": d["cold_s"], "digest_warm_s": d["warm_s"]})
            results.append(row)
            print_row(row)
            del engines, modules
        finally:
            shutil.rmtree(root, ignore_errors=True)
    for stage in [s for s in args.computed.split(",") if s]:
        results.append(computed(stage, args.flavor))
        print_row(results[-1])
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def print_row(r: dict) -> None:
    print(json.dumps({k: v for k, v in r.items() if not k.endswith("_files")}), flush=True)


def print_table(rows) -> None:
    if not rows:
        return
    print()
    print("| stage (flavor) | trainable / frozen params | ratio | checkpoint: all params | only what trains | "
          "save + sync: all | only what trains | digest of sources: cold / cached |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("computed"):
            print(f"| {r['stage']} ({r['flavor']}), computed | {r['trainable_params'] / 1e6:.1f}M / "
                  f"{r['frozen_params'] / 1e6:.1f}M | {r['trainable_frac']:.3f} | {_gib(r['before_bytes'])} | "
                  f"{_gib(r['after_bytes'])} ({r['after_bytes'] / r['before_bytes']:.2f}x) | - | - | - |")
            continue
        dig = (f"{_gib(r['sources_bytes'])}: {r['digest_cold_s']:.1f} s / {r['digest_warm_s']:.3f} s"
               if "digest_cold_s" in r else "-")
        print(f"| {r['stage']} ({r['flavor']}) | {r['trainable_params'] / 1e6:.1f}M / {r['frozen_params'] / 1e6:.1f}M "
              f"| {r['trainable_frac']:.3f} | {_gib(r['before_bytes'])} | {_gib(r['after_bytes'])} "
              f"({r['after_bytes'] / r['before_bytes']:.2f}x) | {r['before_save_s']:.1f} + {r['before_sync_s']:.1f} s "
              f"| {r['after_save_s']:.1f} + {r['after_sync_s']:.1f} s | {dig} |")


if __name__ == "__main__":
    sys.exit(main())
