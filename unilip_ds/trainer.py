"""The one training loop. Stages are presets (config), tasks are small objects
(tasks/base.py); everything distributed goes through engine/."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import OmegaConf

from unilip_ds.config import Config, ConfigError, config_warnings, to_dict, to_yaml, warn
from unilip_ds.engine import checkpoint, dist
from unilip_ds.engine.ds_config import check_ds_config
from unilip_ds.engine.ema import EMA
from unilip_ds.engine.engines import build_engines, model_init_context
from unilip_ds.tasks.base import MAIN, build_task
from unilip_ds.tracking import Tracker, setup_logging

log = logging.getLogger("unilip_ds")

# changing these under an existing run dir would make its checkpoints meaningless
INCOMPATIBLE_KEYS = ("run.task", "model.flavor", "data.resolution")


def to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """Tensors to the device; uint8 images (the data layer ships them so, 4x less to move
    between processes) become float32 in [0, 1] there."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if v.dtype == torch.uint8 and v.ndim == 4:
                v = v.float().div_(255.0)
        out[k] = v
    return out


def check_output_dir(cfg: Config) -> None:
    """Refuse a run dir that belongs to a run with an incompatible config."""
    saved = Path(cfg.run.output_dir) / "config.yaml"
    if not saved.is_file():
        return
    old = OmegaConf.load(saved)
    new = OmegaConf.create(to_dict(cfg))
    for key in INCOMPATIBLE_KEYS:
        a, b = OmegaConf.select(old, key), OmegaConf.select(new, key)
        if a != b:
            raise ConfigError(f"run.output_dir {cfg.run.output_dir} belongs to a run with "
                              f"{key}={a!r} (this config: {b!r}); choose another run.output_dir")


def prepare(cfg: Config, ds_config_path: str) -> Dict[str, Any]:
    """Everything that can fail on user input, before any process group or model."""
    world = dist.world_size()
    ds_raw = check_ds_config(cfg, ds_config_path, world)
    check_output_dir(cfg)
    for msg in config_warnings(cfg):
        warn(msg)
    build_task(cfg).check_inputs()
    from unilip_ds.data.config import split_sources
    from unilip_ds.data.shards import list_shards
    readers = world * max(1, cfg.data.num_workers)  # every rank's workers split the shards
    for which in ("train",) + (("eval",) if cfg.data.eval.urls or cfg.data.eval.sources else ()):
        for source in split_sources(getattr(cfg.data, which), which):
            shards = list_shards(source.urls, cfg.data)  # a missing path or no shards: one line, now
            if which == "train" and len(shards) * source.repeats < readers:
                raise ConfigError(
                    f"config key 'data.num_workers': source '{source.name}' has {len(shards)} shard(s) x "
                    f"{source.repeats} repeat(s) for {readers} readers (world size {world} x "
                    f"data.num_workers {cfg.data.num_workers}); write more, smaller shards or use fewer workers")
    return ds_raw


class Trainer:
    def __init__(self, cfg: Config, ds_raw: Dict[str, Any]):
        self.cfg = cfg
        dist.init()
        self.rank, self.world = dist.rank(), dist.world_size()
        self.device = dist.device()
        setup_logging(self.rank)
        log.info(f"torch threads per process: {dist.set_torch_threads(cfg.train.torch_threads, cfg.data.num_workers)}")
        self.out = Path(cfg.run.output_dir)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(to_yaml(cfg))
        dist.barrier()
        torch.manual_seed(cfg.run.seed + self.rank)

        self.task = build_task(cfg)
        tag = checkpoint.latest_tag(self.out) if cfg.checkpoint.resume else None
        t0 = time.time()
        with model_init_context(ds_raw, cfg, self.world):
            self.modules = self.task.build_modules()
        if tag is None:  # a resumed run gets its weights from the checkpoint
            if cfg.model.init_from:
                self.task.init_from(self.modules, cfg.model.init_from)
            else:
                self.task.load_pretrained(self.modules)
        self.engines = build_engines(self.task, self.modules, cfg, ds_raw, self.world)
        log.info(f"built {', '.join(self.engines)} in {time.time() - t0:.1f}s "
                 f"(world {self.world}, ZeRO stage {ds_raw.get('zero_optimization', {}).get('stage', 0)})")
        self.ema = EMA(self.engines[MAIN].module, cfg.ema.max_decay) if cfg.ema.enabled else None

        from unilip_ds.data import SkipTracker, build_eval_batches, build_train_loader
        self.loader = build_train_loader(cfg, self.rank, self.world)
        self.skips = SkipTracker.from_config(cfg)  # worker counters resume with the stream
        has_eval = bool(cfg.data.eval.urls or cfg.data.eval.sources)
        self.eval_batches = build_eval_batches if has_eval else None

        self.step = 0
        run_id = None
        if tag is not None:
            state = checkpoint.load(self.out, tag, self.engines)
            self.step = state["meta"]["step"]
            run_id = state["meta"].get("wandb_run_id")
            self.loader.load_state_dict(state["data"])
            if self.ema is not None:  # below ZeRO-3 the EMA is the same on every rank
                self.ema.load_state_dict(state["ema"] if "ema" in state else
                                         checkpoint.rank_state(self.out, tag, 0)["ema"])
            log.info(f"resumed from {self.out / 'checkpoints' / tag} at step {self.step}")
        self.task.after_load(self.modules)
        self.tracker = Tracker(cfg, self.rank, run_id, start_step=self.step)
        self._signal: Optional[str] = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        self.keys_file = None
        if cfg.data.log_keys:
            (self.out / "keys").mkdir(parents=True, exist_ok=True)
            self.keys_file = open(self.out / "keys" / f"rank{self.rank}.jsonl", "a")

    # -- the loop -----------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.cfg
        # starting the loader draws its workers' base seed from the global RNG: keep that
        # draw out of the stream a resumed run restores (CFG dropout, sigmas, noise)
        with torch.random.fork_rng(devices=[]):
            it = iter(self.loader)
        sums: Dict[str, Any] = defaultdict(float)  # device tensors: no host sync per step
        counts: Dict[str, int] = defaultdict(int)
        window = {"time": 0.0, "wait": 0.0, "steps": 0}
        first = self.step
        if cfg.train.eval_every and self.step == 0:
            self.evaluate()  # the baseline the run improves on
        while self.step < cfg.train.max_steps:
            t_step = time.perf_counter()
            self.task.set_train_mode(self.modules)
            phases = self.task.phases(self.step)
            lrs = {name: max(e.get_lr()) for name, e in self.engines.items()}  # used this step
            for _ in range(cfg.train.grad_accum):
                t_wait = time.perf_counter()
                batch = next(it)
                window["wait"] += time.perf_counter() - t_wait
                self.skips.update(batch)
                batch = to_device(batch, self.device)
                if self.keys_file is not None:
                    self.keys_file.write(json.dumps({"step": self.step + 1, "keys": batch["__key__"]}) + "\n")
                for phase in phases:
                    loss, terms = self.task.loss(phase, batch, self.step, self.engines)
                    self.engines[phase].backward(loss)
                    self.engines[phase].step()
                    for k, v in terms.items():
                        sums[k] += v.detach()
                        counts[k] += 1
            self.step += 1
            if self.ema is not None and self.step % cfg.ema.every_steps == 0:
                self.ema.update()
            window["time"] += time.perf_counter() - t_step
            window["steps"] += 1
            for name in phases:
                gn = self.engines[name].get_global_grad_norm()
                if gn is not None:
                    sums[f"grad_norm/{name}"] += gn
                    counts[f"grad_norm/{name}"] += 1

            signalled = self._signal_agreed()
            stop = signalled or (cfg.train.stop_after and self.step - first >= cfg.train.stop_after)
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps or stop:
                self._log(sums, counts, window, lrs)
                sums.clear(), counts.clear()
                window = {"time": 0.0, "wait": 0.0, "steps": 0}
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                self.evaluate()
            if cfg.train.sample_every and self.step % cfg.train.sample_every == 0:
                self.write_samples()
            if self.step % cfg.checkpoint.every_steps == 0 or self.step == cfg.train.max_steps \
                    or stop:
                self.save()
            if stop:
                log.info(f"stopping on signal {self._signal}" if signalled else
                         f"stopping after {self.step - first} steps (train.stop_after)")
                break
        self.close()

    def _on_signal(self, signum, _frame) -> None:
        self._signal = signal.Signals(signum).name

    def _signal_agreed(self) -> bool:
        """A scheduler's warning (SIGUSR1) or SIGTERM may reach ranks at different times:
        they agree at a step boundary, then all write the checkpoint and stop."""
        return dist.all_reduce([1.0 if self._signal else 0.0])[0] > 0

    def _log(self, sums, counts, window, lrs) -> None:
        # one collective: rank means of the terms and the data-wait fraction, summed counters
        keys = sorted(sums) + ["data_wait_frac"]
        totals = self.skips.totals()
        names = sorted(totals)
        local = [float(sums[k]) / counts[k] for k in keys[:-1]]
        local.append(window["wait"] / window["time"] if window["time"] else 0.0)
        summed = dist.all_reduce(local + [float(totals[n]) for n in names])
        metrics: Dict[str, Any] = {k: v / self.world for k, v in zip(keys, summed)}
        totals = dict(zip(names, summed[len(keys):]))
        metrics.update(totals)
        metrics.update({f"lr/{name}": lr for name, lr in lrs.items()})
        step_time = window["time"] / max(1, window["steps"])
        gbs = self.cfg.train.micro_batch_size * self.cfg.train.grad_accum * self.world
        metrics["step_time_s"] = step_time
        metrics["samples_per_s"] = gbs / step_time if step_time > 0 else 0.0
        self.tracker.log(self.step, metrics)
        self.skips.check(totals)  # the same global figures on every rank: all stop together

    def evaluate(self) -> Dict[str, float]:
        # every rank evaluates the same held-out batches: under ZeRO-3 each forward is a
        # collective, so ranks must run the same forwards (the eval set is small)
        batches = self._held_out()
        ctx = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
        with ctx, torch.no_grad():
            metrics = self.task.evaluate(self.engines, batches)
        self.tracker.log(self.step, metrics)
        return metrics

    def _held_out(self):
        return [to_device(b, self.device) for b in
                self.eval_batches(self.cfg, 0, 1, max_batches=self.cfg.train.eval_batches)]

    def write_samples(self) -> None:
        """Sample grids (every rank runs the forwards; rank 0 writes PNGs and logs them)."""
        t0 = time.perf_counter()
        held_out = self._held_out() if self.eval_batches is not None else None
        ctx = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
        with ctx, torch.no_grad():  # the weights evaluate() scores
            grids = self.task.samples(self.engines, self.step, held_out)
        if self.rank == 0 and grids:
            paths = self.tracker.log_images(self.step, grids)
            log.info(f"samples: {', '.join(str(p) for p in paths)} ({time.perf_counter() - t0:.1f}s)")

    def save(self) -> None:
        t0 = time.perf_counter()
        rank_state = {"data": self.loader.state_dict()}
        if self.ema is not None and (self.ema.partitioned or self.rank == 0):
            rank_state["ema"] = self.ema.state_dict()
        meta = {"wandb_run_id": self.tracker.run_id, "config": to_dict(self.cfg),
                "ema": self.ema is not None,
                "ema_partitioned": bool(self.ema and self.ema.partitioned)}
        if self.keys_file is not None:
            self.keys_file.flush()
        cdir = checkpoint.save(self.out, self.step, self.engines, rank_state, meta,
                               self.cfg.checkpoint.keep_last)
        log.info(f"saved {cdir} in {time.perf_counter() - t0:.1f}s")

    def close(self) -> None:
        self.tracker.close()
        if self.keys_file is not None:
            self.keys_file.close()

