"""Checkpoints that continue a run exactly.

Layout under <run.output_dir>/checkpoints/:
    step_00000100/<engine>/...      DeepSpeed engine states (every rank writes its shards)
    step_00000100/rank00000.pt      per rank: RNG states, data-stream state, EMA (partition)
    step_00000100/meta.json         step, world size, W&B run id, the resolved config
    latest                          name of the newest complete checkpoint

`latest` is replaced atomically (write + fsync + os.replace) only after every rank has
finished writing, so a crash mid-save leaves the previous checkpoint loadable. A checkpoint
is complete once its meta.json exists (written after every rank's files); a directory
without one (a rank killed mid-save) is never loaded, and is removed by the next
successful save, which never removes a complete checkpoint beyond `keep_last`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

from unilip_ds.engine import dist

STEP_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    pass


def ckpt_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_tag(output_dir: str | Path) -> Optional[str]:
    f = ckpt_root(output_dir) / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    if not STEP_RE.match(tag) or not (ckpt_root(output_dir) / tag / "meta.json").is_file():
        raise CheckpointError(f"{f} names '{tag}', which is not a complete checkpoint")
    return tag


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def save(output_dir: str | Path, step: int, engines: Mapping[str, Any], rank_state: Dict[str, Any],
         meta: Dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank calls it."""
    root = ckpt_root(output_dir)
    tag = f"step_{step:08d}"
    cdir = root / tag
    rank = dist.rank()
    if rank == 0:
        if cdir.exists():  # a previous attempt at this step crashed before `latest` moved on
            shutil.rmtree(cdir)
        cdir.mkdir(parents=True)
    dist.barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(str(cdir), tag=name, save_latest=False)
    torch.save({**rank_state, "rng": rng_state()}, cdir / f"rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        _write_atomic(cdir / "meta.json", json.dumps(
            {**meta, "step": step, "world_size": dist.world_size(), "engines": list(engines)},
            indent=1))
        _write_atomic(root / "latest", tag + "\n")
        _prune(root, keep_last, keep=tag)
    dist.barrier()
    return cdir


def is_complete(cdir: Path) -> bool:
    return (cdir / "meta.json").is_file()


def _prune(root: Path, keep_last: int, keep: str) -> None:
    """After `keep` is complete and named by `latest`: drop the complete checkpoints beyond
    the newest `keep_last`, and every incomplete directory (a save that was killed)."""
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name))
    complete = [p for p in dirs if is_complete(p)]
    for p in dirs:
        if p.name != keep and (not is_complete(p) or p in complete[:-keep_last]):
            shutil.rmtree(p, ignore_errors=True)


def read_meta(output_dir: str | Path, tag: str) -> Dict[str, Any]:
    return json.loads((ckpt_root(output_dir) / tag / "meta.json").read_text())


def load(output_dir: str | Path, tag: str, engines: Mapping[str, Any]) -> Dict[str, Any]:
    """Collective. Restores engine states and RNG; returns (meta, this rank's state)."""
    from unilip_ds.engine import elastic
    cdir = ckpt_root(output_dir) / tag
    meta = read_meta(output_dir, tag)
    if list(meta["engines"]) != list(engines):
        raise CheckpointError(f"{cdir} holds engines {meta['engines']}, this run has {list(engines)}")
    # ZeRO partitions depend on the world size: another one loads DeepSpeed's universal format
    same = meta["world_size"] == dist.world_size()
    zero = [n for n, e in engines.items() if e.zero_optimization_stage() > 0]
    root = cdir if same or not zero else elastic.to_universal(cdir, zero)
    for name, engine in engines.items():
        if root is cdir or name not in zero:
            path, _ = engine.load_checkpoint(str(cdir), tag=name, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
        else:
            path = elastic.load_universal(engine, root, name)
        if path is None:
            raise CheckpointError(f"{cdir}/{name}: DeepSpeed could not load this engine state")
    if not same:  # this rank's RNG state is not in the checkpoint: draw fresh streams
        elastic.reseed(meta["config"]["run"]["seed"], meta["step"], dist.rank())
        return {"meta": meta}
    state = rank_state(output_dir, tag, dist.rank())
    set_rng_state(state.pop("rng"))
    return {"meta": meta, **state}


def rank_state(output_dir: str | Path, tag: str, rank: int, mmap: bool = False) -> Dict[str, Any]:
    return torch.load(ckpt_root(output_dir) / tag / f"rank{rank:05d}.pt", weights_only=False,
                      mmap=mmap)
