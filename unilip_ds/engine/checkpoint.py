"""Checkpoints that continue a run exactly.

Layout under <run.output_dir>/checkpoints/:
    step_00000100/<engine>/...      DeepSpeed engine states (every rank writes its shards)
    step_00000100/rank00000.pt      per rank: RNG states, data-stream state, EMA (partition)
    step_00000100/meta.json         step, world size, W&B run id, the resolved config,
                                    the digests of the frozen weights' sources
    latest                          name of the newest complete checkpoint

The engine states hold only what trains (DeepSpeed's `exclude_frozen_parameters`: the
trainable parameters, their optimizer states, every buffer). The frozen parameters are read
again from their sources at resume and at export, as at the start (`Task.frozen_sources`,
`frozen_state`); meta.json records a digest of each source and a source whose files changed
is refused in one line. A run whose frozen parts have no file (random weights, the tiny
flavor) and a run resumed from a checkpoint written before this (`frozen_saved` absent) keep
writing every parameter (`frozen_saved: true`).

`latest` is replaced atomically (write + fsync + os.replace) only after every rank has
finished writing, so a crash mid-save leaves the previous checkpoint loadable. A checkpoint
is complete once its meta.json exists (written after every rank's files); a directory
without one (a rank killed mid-save) is never loaded, and is removed by the next
successful save, which never removes a complete checkpoint beyond `keep_last`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

from unilip_ds.engine import dist, sources

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


def frozen_state(task, output_dir: str | Path, tag: Optional[str]) -> Dict[str, Any]:
    """Collective, before the model is built. The meta.json entries of this run's checkpoints
    about its frozen weights: `frozen_saved` (whether the checkpoints hold them: the same on
    every rank) and `frozen_sources` (rank 0: the digests of their files, engine/sources.py).
    Resuming `tag`, the recorded digests must be those of the files now: a changed source is
    a CheckpointError (one line naming it, on rank 0) on every rank, before anything loads."""
    meta = read_meta(output_dir, tag) if tag is not None else None
    if meta is not None and "frozen_saved" not in meta:  # written before lean checkpoints: all of it
        return {"frozen_saved": True}
    srcs = task.frozen_sources()
    saved = any(v is None for v in srcs.values()) if meta is None else bool(meta["frozen_saved"])
    ok, msg, digests = 1.0, "", None
    if dist.rank() == 0:
        try:
            digests = sources.digests(srcs, Path(output_dir) / sources.CACHE)
            if meta is not None:
                sources.compare(meta.get("frozen_sources") or {}, digests,
                                f"checkpoint {tag} of {output_dir}")
        except (sources.SourceChanged, OSError) as exc:
            ok, msg = 0.0, str(exc)
    if dist.all_reduce([ok])[0] < dist.world_size():
        raise CheckpointError(msg or f"checkpoint {tag} of {output_dir}: the sources of its frozen "
                              "weights do not match it (see rank 0)")
    return {"frozen_saved": saved, "frozen_sources": digests}


def holds_frozen(meta: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's engine states hold the frozen parameters too."""
    return meta.get("frozen_saved", True) is not False


def save(output_dir: str | Path, step: int, engines: Mapping[str, Any], rank_state: Dict[str, Any],
         meta: Dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank calls it. The engines' frozen parameters are left out unless
    meta says `frozen_saved` (see `frozen_state`)."""
    root = ckpt_root(output_dir)
    tag = f"step_{step:08d}"
    cdir = root / tag
    rank = dist.rank()
    if rank == 0:
        if cdir.exists():  # a previous attempt at this step crashed before `latest` moved on
            shutil.rmtree(cdir)
        cdir.mkdir(parents=True)
    dist.barrier()
    lean = not holds_frozen(meta)
    for name, engine in engines.items():
        with _frozen_left_out(engine) if lean else contextlib.nullcontext():
            engine.save_checkpoint(str(cdir), tag=name, save_latest=False, exclude_frozen_parameters=lean)
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


@contextlib.contextmanager
def _frozen_left_out(engine: Any):
    """DeepSpeed's exclude_frozen_parameters drops a frozen parameter under its first name
    only (named_parameters leaves out the others): a tied alias (an LM head tied to its
    embeddings: 136M parameters at 1b) would still be written. Every name of it is left out."""
    inner = engine.module_state_dict

    def lean(*args, **kwargs):
        sd = inner(*args, **kwargs)
        for name in frozen_names(engine.module):
            sd.pop(name, None)
        return sd
    engine.__dict__["module_state_dict"] = lean
    try:
        yield
    finally:
        engine.__dict__.pop("module_state_dict", None)


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
    # without the frozen parameters (they came from their sources): every other key must be there
    lean = None if holds_frozen(meta) else _load_trainable
    for name, engine in engines.items():
        if root is cdir or name not in zero:
            path, _ = engine.load_checkpoint(str(cdir), tag=name, load_optimizer_states=True,
                                             load_lr_scheduler_states=True, custom_load_fn=lean)
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


def frozen_names(module: torch.nn.Module) -> set:
    """State-dict keys of the frozen parameters (tied aliases included)."""
    return {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _load_trainable(src: Mapping[str, torch.Tensor], dst: torch.nn.Module) -> None:
    """DeepSpeed's module-state load of a checkpoint without the frozen parameters: those
    stay as their sources filled them; any other key missing or unexpected is an error."""
    res = dst.load_state_dict(src, strict=False)
    missing = sorted(set(res.missing_keys) - frozen_names(dst))
    if missing or res.unexpected_keys:
        raise CheckpointError(f"the checkpoint's module state does not fit the model: {len(missing)} "
                              f"missing keys (e.g. {missing[:3]}), {len(res.unexpected_keys)} unexpected "
                              f"(e.g. {sorted(res.unexpected_keys)[:3]})")


def rank_state(output_dir: str | Path, tag: str, rank: int, mmap: bool = False) -> Dict[str, Any]:
    return torch.load(ckpt_root(output_dir) / tag / f"rank{rank:05d}.pt", weights_only=False,
                      mmap=mmap)
