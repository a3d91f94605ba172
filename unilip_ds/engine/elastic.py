"""Resuming a run on another number of ranks or data workers (elastic resume).

- Engines: DeepSpeed's ZeRO states are partitioned by world size. The checkpoint is
  converted once (rank 0, the others wait) to DeepSpeed's universal format under
  <checkpoint>/universal/<engine>/ and loaded from there (`load_universal`); later resumes
  from the same checkpoint reuse the conversion. The LR schedule and step counters travel
  in the engine's model-states file, which the conversion copies.
- Frozen parameters: read from their sources, as at every start (checkpoint.frozen_state);
  DeepSpeed's universal load restores neither them nor the module's buffers: the buffers
  (e.g. the discriminator's LeCam EMAs) come from the copied model-states file.
- EMA: rebuilt per parameter from the partitions of all old ranks (ema.EMA.load_from_ranks).
- Data: the stream states of all old readers are redistributed (data/elastic.py); also
  when only data.num_workers or data.shuffle_buffer changed.
- The global batch (ranks x micro batch x accumulation) must stay the same: checked with
  one line before anything starts (check_resume).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping

import numpy as np
import torch

from unilip_ds.config import Config, ConfigError
from unilip_ds.engine import checkpoint, dist

log = logging.getLogger("unilip_ds")


def _global_batch(train: Mapping[str, Any], world: int) -> str:
    return (f"{train['micro_batch_size'] * train['grad_accum'] * world} ({world} ranks x "
            f"train.micro_batch_size {train['micro_batch_size']} x train.grad_accum {train['grad_accum']})")


def check_resume(cfg: Config, world: int) -> None:
    """Refuse, in one line, a resume that would silently change what a step means."""
    if not cfg.checkpoint.resume:
        return
    tag = checkpoint.latest_tag(cfg.run.output_dir)
    if tag is None:
        return
    meta = checkpoint.read_meta(cfg.run.output_dir, tag)
    old, old_world = meta["config"], meta["world_size"]
    new = {"micro_batch_size": cfg.train.micro_batch_size, "grad_accum": cfg.train.grad_accum}
    if old["train"]["micro_batch_size"] * old["train"]["grad_accum"] * old_world != \
            new["micro_batch_size"] * new["grad_accum"] * world:
        total = old["train"]["micro_batch_size"] * old["train"]["grad_accum"] * old_world
        hint = ""
        if total % (world * cfg.train.micro_batch_size) == 0:
            hint = f", e.g. train.grad_accum={total // (world * cfg.train.micro_batch_size)}"
        raise ConfigError(f"checkpoint {tag} of {cfg.run.output_dir} was trained with a global batch of "
                          f"{_global_batch(old['train'], old_world)}, this run has "
                          f"{_global_batch(new, world)}: keep the global batch{hint}")
    from unilip_ds.config import from_dict
    from unilip_ds.data.config import split_sources
    names = sorted(s.name for s in split_sources(cfg.data.train, "train"))
    old_names = sorted(s.name for s in split_sources(from_dict(old).data.train, "train"))
    if old_names != names:
        raise ConfigError(f"checkpoint {tag} of {cfg.run.output_dir} reads the sources {old_names}, "
                          f"this config {names}: resume with the same data.train sources")


def to_universal(cdir: Path, names: List[str]) -> Path:
    """Collective: <cdir>/universal with every engine converted (rank 0 converts what is
    missing; a conversion is complete once renamed into place)."""
    root = cdir / "universal"
    ok = 1.0
    if dist.rank() == 0:
        try:
            for name in names:
                if not (root / name).is_dir():
                    _convert(cdir / name, root, name)
        except Exception as exc:  # the other ranks are waiting: tell them, then fail
            log.error(f"converting {cdir} to the universal format failed: {exc!r}")
            ok = 0.0
    if dist.all_reduce([ok])[0] < dist.world_size():
        raise checkpoint.CheckpointError(f"{cdir}: conversion to DeepSpeed's universal checkpoint "
                                         f"format failed (see the log of rank 0)")
    return root


def _convert(src: Path, root: Path, name: str) -> None:
    from deepspeed.checkpoint import ds_to_universal
    tmp = root / f".{name}.tmp"
    if tmp.exists():  # an earlier attempt died mid-way
        shutil.rmtree(tmp)
    root.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    workers = max(1, min(8, (os.cpu_count() or 1) // 2))
    # inject_missing_state: ZeRO-1/2 checkpoints hold no universal_checkpoint_info (a
    # Megatron model sets one for its tensor-parallel layout); ours have none to describe
    args = argparse.Namespace(input_folder=str(src), output_folder=str(tmp), num_extract_workers=workers,
                              num_merge_workers=max(1, workers // 2), keep_temp_folder=False,
                              strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(None):  # its progress prints
        ds_to_universal.main(args)
    os.replace(tmp, root / name)
    size = sum(f.stat().st_size for f in (root / name).rglob("*") if f.is_file())
    log.info(f"converted {src} to DeepSpeed's universal format in {time.perf_counter() - t0:.1f}s "
             f"({size / 2**20:.1f} MiB)")


def load_universal(engine: Any, root: Path, name: str) -> Any:
    """engine.load_checkpoint from a universal checkpoint (DeepSpeed reads `load_universal`
    from its config at load time only)."""
    engine._config.load_universal_checkpoint = True
    try:
        path, _ = engine.load_checkpoint(str(root), tag=name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    finally:
        engine._config.load_universal_checkpoint = False
    if path is not None:
        _restore_buffers(engine, root / name)
        # DeepSpeed's ZeRO-3 universal load gives every param group the hyperparameters of
        # the first (weight decay, LR multiplier): put back each group's own
        saved = torch.load(root / name / "zero" / "optimizer_state.pt", map_location="cpu",
                           weights_only=False)["param_groups"]
        groups = engine.optimizer.param_groups
        if len(saved) == len(groups):
            for group, old in zip(groups, saved):
                group.update({k: v for k, v in old.items() if k != "params"})
    return path


def _restore_buffers(engine: Any, edir: Path) -> None:
    """The module's persistent buffers from a (copied) model-states file: the same on every
    old rank (ZeRO-3 partitions parameters, not buffers)."""
    files = sorted(edir.glob("*model_states.pt"))
    if not files:
        return
    state = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    module = state.get("module") or {}
    buffers = {n: module[n] for n in state.get("buffer_names") or [] if n in module}
    if buffers:
        res = engine.module.load_state_dict(buffers, strict=False)
        if res.unexpected_keys:
            raise checkpoint.CheckpointError(f"{edir}: buffers {res.unexpected_keys[:3]} are not in the model")


def reseed(seed: int, step: int, rank: int) -> None:
    """RNG streams of a resumed run on a new layout: fresh, but not those of step 0."""
    s = np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]
    random.seed(int(s))
    np.random.seed(int(s))
    torch.manual_seed(int(s))


def restore_data(out: Path, tag: str, state: Dict[str, Any], loader, cfg: Config) -> None:
    """The data stream, on the layout that saved it or another one."""
    meta = state["meta"]
    old_world, world = meta["world_size"], dist.world_size()
    old_workers = meta["config"]["data"]["num_workers"]
    # an exact resume re-reads the current block: only with the block size that wrote it
    if (old_world, old_workers, meta["config"]["data"]["shuffle_buffer"]) == \
            (world, cfg.data.num_workers, cfg.data.shuffle_buffer):
        loader.load_state_dict(state["data"])
        return
    from unilip_ds.data.loader import load_elastic
    load_elastic(loader, [checkpoint.rank_state(out, tag, r, mmap=True)["data"] for r in range(old_world)],
                 cfg, dist.rank(), world)
    log.info(f"data: the epochs in flight of {old_world} ranks x {old_workers} workers continue "
             f"on {world} x {cfg.data.num_workers}")


def restore_ema(out: Path, tag: str, state: Dict[str, Any], ema) -> None:
    meta = state["meta"]
    if not meta.get("ema_partitioned") and not ema.partitioned:  # the same full EMA everywhere
        ema.load_state_dict(state["ema"] if "ema" in state else checkpoint.rank_state(out, tag, 0)["ema"])
    elif meta["world_size"] == dist.world_size() and meta.get("ema_partitioned") and ema.partitioned:
        ema.load_state_dict(state["ema"])
    else:  # other partitions: rebuilt from every old rank's (memory-mapped)
        old = [checkpoint.rank_state(out, tag, r, mmap=True) for r in range(meta["world_size"])]
        ema.load_from_ranks([s["ema"] for s in old if "ema" in s])
