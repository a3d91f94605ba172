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

from unilip_ds.config import (Config, ConfigError, config_warnings, to_dict, to_yaml, warn,
                              warnings_after_checks)
from unilip_ds.engine import checkpoint, dist, nonfinite, rundir
from unilip_ds.engine import elastic
from unilip_ds.engine.ds_config import check_ds_config, zero_stage
from unilip_ds.engine.ema import EMA
from unilip_ds.engine.engines import build_engines, model_init_context
from unilip_ds.tasks.base import MAIN, build_task
from unilip_ds.tracking import HardwareMeter, Tracker, setup_logging

log = logging.getLogger("unilip_ds")

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


def prepare(cfg: Config, ds_config_path: str) -> Dict[str, Any]:
    """Everything that can fail on user input, before any process group or model; warnings
    are printed only when every check passed."""
    with warnings_after_checks():
        return _prepare(cfg, ds_config_path)


def _prepare(cfg: Config, ds_config_path: str) -> Dict[str, Any]:
    world = dist.world_size()
    ds_raw = check_ds_config(cfg, ds_config_path, world)
    if zero_stage(ds_raw) == 0:
        raise ConfigError("ds_config 'zero_optimization.stage': 0 cannot skip a step with a non-finite "
                          "loss or gradient norm (train.on_nonfinite); use ZeRO stage 1, 2 or 3")
    rundir.check_output_dir(cfg, dist.rank())
    elastic.check_resume(cfg, world)  # e.g. another global batch: one line, now
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
    from unilip_ds.data.loader import mix_sources
    mix_sources(cfg.data, cfg.data.train, "train")  # mix=samples without counts: one line, now
    return ds_raw


class Trainer:
    def __init__(self, cfg: Config, ds_raw: Dict[str, Any]):
        self.cfg = cfg
        dist.init(cfg.dist.timeout_s)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.device = dist.device()
        setup_logging(self.rank)
        log.info(f"torch threads per process: {dist.set_torch_threads(cfg.train.torch_threads, cfg.data.num_workers)}")
        self.out = Path(cfg.run.output_dir)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        torch.manual_seed(cfg.run.seed + self.rank)

        self.task = build_task(cfg)
        tag = checkpoint.latest_tag(self.out) if cfg.checkpoint.resume else None
        t0 = time.time()
        with model_init_context(ds_raw, cfg, self.world):
            self.modules = self.task.build_modules()
        if tag is not None:
            rundir.check_engines(self.out, tag, list(self.modules))
        # the digests of the frozen weights' files; resuming, a changed one is refused now
        self.frozen = checkpoint.frozen_state(self.task, self.out, tag)
        if self.rank == 0:  # only now: this config is known to fit the run dir
            (self.out / "config.yaml").write_text(to_yaml(cfg))
        # resumed too: checkpoints hold what trains, the frozen parts come from their sources
        if cfg.model.init_from:
            self.task.init_from(self.modules, cfg.model.init_from)
        else:
            self.task.load_pretrained(self.modules)
        self.engines = build_engines(self.task, self.modules, cfg, ds_raw, self.world)
        log.info(f"built {', '.join(self.engines)} in {time.time() - t0:.1f}s "
                 f"(world {self.world}, ZeRO stage {ds_raw.get('zero_optimization', {}).get('stage', 0)})")
        self.ema = EMA(self.engines[MAIN].module, cfg.ema.max_decay) if cfg.ema.enabled else None
        self.settings = nonfinite.capture_settings(self.engines)  # this config's, before loading
        self.lr_scale = 1.0  # x rollback_lr_scale per rollback (train.on_nonfinite)
        self.nonfinite = nonfinite.NonFiniteTracker(cfg)

        from unilip_ds.data import SkipTracker, build_eval_batches, build_train_loader
        self.loader = build_train_loader(cfg, self.rank, self.world)
        if self.rank == 0:
            from unilip_ds.data.loader import describe_mix
            for line in describe_mix(self.loader.dataset.sources, cfg.data.train.mix):
                log.info(f"data mix ({cfg.data.train.mix}): {line}")
        self.skips = SkipTracker.from_config(cfg)  # worker counters resume with the stream
        has_eval = bool(cfg.data.eval.urls or cfg.data.eval.sources)
        self.eval_batches = build_eval_batches if has_eval else None

        self.step = 0
        run_id = None
        if tag is not None:
            state = self._restore(tag, "resume")
            run_id = state["meta"].get("wandb_run_id")
            elastic.restore_data(self.out, tag, state, self.loader, cfg)  # other layouts too
            log.info(f"resumed from {self.out / 'checkpoints' / tag} at step {self.step}")
        self.task.after_load(self.modules)
        self.tracker = Tracker(cfg, self.rank, run_id, start_step=self.step)
        self.meter = HardwareMeter(cfg, self.rank, self.world, self.device)  # FLOPs per sample, once
        self._signal: Optional[str] = None
        self._sigint_at = 0.0
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
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
            it = iter(self.loader)  # its workers ignore Ctrl-C / scancel (loader._ignore_stop_signals)
        sums: Dict[str, Any] = defaultdict(float)  # device tensors: no host sync per step
        counts: Dict[str, int] = defaultdict(int)
        window = {"time": 0.0, "wait": 0.0, "steps": 0}
        first = self.step
        self.watchdog = dist.Watchdog(cfg.dist.timeout_s)
        try:
            self._loop(it, sums, counts, window, first)
        except RuntimeError as exc:
            if not dist.is_collective_failure(exc):
                raise
            raise dist.CollectiveError(
                f"rank {self.rank}: step {self.step + 1}: a collective failed "
                f"({str(exc).strip().splitlines()[0][:300]}); a rank died or stalled for "
                f"dist.timeout_s={cfg.dist.timeout_s}") from None
        finally:
            from unilip_ds.data.loader import close_workers
            close_workers(self.loader)
        self.tracker.log_summary(self.step, self.meter.summary(self.step - first))
        self.close()

    def _loop(self, it, sums, counts, window, first) -> None:
        cfg = self.cfg
        drawn = 0  # micro-batches drawn by this process (train.test_nan_batches / test_inf_grad_batches)
        self.watchdog.beat(f"step {self.step + 1} (evaluation)")
        if cfg.train.eval_every and self.step == 0:
            self.evaluate()  # the baseline the run improves on
        while self.step < cfg.train.max_steps:
            t_step = time.perf_counter()
            self.task.set_train_mode(self.modules)
            phases = self.task.phases(self.step)
            lrs = {name: max(e.get_lr()) for name, e in self.engines.items()}  # used this step
            skipped_before = {n: nonfinite.skipped_steps(e) for n, e in self.engines.items()}
            for _ in range(cfg.train.grad_accum):
                self.watchdog.beat(f"step {self.step + 1}")
                t_wait = time.perf_counter()
                batch = next(it)
                window["wait"] += time.perf_counter() - t_wait
                self.skips.update(batch)
                self.meter.batch(batch.get("__task__"))
                batch = to_device(batch, self.device)
                drawn += 1
                if drawn in cfg.train.test_nan_batches and self.rank == self.world - 1:
                    for v in batch.values():  # fault injection (tests): a NaN batch
                        if isinstance(v, torch.Tensor) and v.is_floating_point():
                            v.fill_(float("nan"))
                if self.keys_file is not None:
                    self.keys_file.write(json.dumps({"step": self.step + 1, "keys": batch["__key__"]}) + "\n")
                for phase in phases:
                    loss, terms = self.task.loss(phase, batch, self.step, self.engines)
                    loss, finite = nonfinite.guard_loss(loss)
                    if drawn in cfg.train.test_inf_grad_batches and self.rank == self.world - 1:
                        loss = nonfinite.infinite_grads(loss)  # fault injection (tests)
                    if not finite:  # this rank's keys: the one place they are known
                        log.warning(f"step {self.step + 1}: non-finite loss ({phase}) on rank "
                                    f"{self.rank}, batch keys {batch['__key__']}")
                    self.engines[phase].backward(loss)
                    self.engines[phase].step()
                    for k, v in terms.items():
                        sums[k] += v.detach()
                        counts[k] += 1
            self.step += 1
            # DeepSpeed skipped the step on every rank (its overflow check is all-reduced)
            skipped = [n for n, e in self.engines.items()
                       if nonfinite.skipped_steps(e) > skipped_before[n]]
            action = self.nonfinite.record(bool(skipped))
            if skipped and self.rank == 0:
                log.warning(f"step {self.step}: non-finite loss or gradient norm: optimizer step of "
                            f"{', '.join(skipped)} skipped on every rank ({self.nonfinite.in_a_row} "
                            f"in a row, {self.nonfinite.total} in total)")
            if action in ("rollback", "stop"):
                self._on_nonfinite_limit(action)
                sums.clear(), counts.clear()  # the rolled-back steps are not logged
                window.update(time=0.0, wait=0.0, steps=0)
                continue
            if self.ema is not None and self.step % cfg.ema.every_steps == 0 and not skipped:
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
                self.watchdog.beat(f"step {self.step} (checkpoint)")
                self.save()
            if stop:
                log.info(f"stopping on signal {self._signal}" if signalled else
                         f"stopping after {self.step - first} steps (train.stop_after)")
                break

    def _on_nonfinite_limit(self, action: str) -> None:
        """train.max_nonfinite_in_a_row reached: stop, or roll back to the last checkpoint
        with a lower LR; the data stream is not rewound (the bad batches are not replayed)."""
        n, limit = self.nonfinite.in_a_row, "train.max_nonfinite_in_a_row"
        tag = checkpoint.latest_tag(self.out) if action == "rollback" else None
        if tag is None:
            why = "train.on_nonfinite=stop" if action == "stop" else "no checkpoint to roll back to"
            raise nonfinite.NonFiniteError(
                f"step {self.step}: {n} steps in a row with a non-finite loss or gradient norm "
                f"({limit}={n}; {why}); the batch keys are in the warnings above. The last "
                "checkpoint is intact: lower optim.lr, or set train.on_nonfinite=rollback|skip, and "
                "start the same command again")
        self.lr_scale *= self.cfg.train.rollback_lr_scale
        self._restore(tag, "rollback")
        self.nonfinite.in_a_row = 0
        if self.rank == 0:
            log.warning(f"rolled back to {tag} after {n} non-finite steps in a row: LR x{self.lr_scale:g} "
                        f"from step {self.step + 1}; the data stream continues with new batches")

    def _restore(self, tag: str, why: str) -> Dict[str, Any]:
        """Engines, RNG and EMA from checkpoint `tag`; then this config's optimizer settings
        (what differs from the run that saved it is logged) x the rollback LR scale."""
        state = checkpoint.load(self.out, tag, self.engines)
        meta = state["meta"]
        self.step = meta["step"]
        if self.ema is not None:  # below ZeRO-3 the EMA is the same on every rank
            elastic.restore_ema(self.out, tag, state, self.ema)
        if why == "resume":
            self.lr_scale = meta.get("lr_scale", 1.0)
            self.nonfinite.total = meta.get("skipped_nonfinite", 0)
            for change in nonfinite.changed_settings(meta.get("config", {}), to_dict(self.cfg)):
                if self.rank == 0:
                    log.warning(f"resume: {change} (applied from step {self.step + 1})")
        nonfinite.apply_settings(self.engines, self.settings, self.lr_scale)
        return state

    def _on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._signal == "SIGINT" and now - self._sigint_at > 2.0:  # a second Ctrl-C
                os.write(2, b"\nsecond Ctrl-C: exiting now, without a checkpoint\n")
                os._exit(130)
            if self._signal is None:  # the same Ctrl-C may arrive twice (tty + launcher)
                self._sigint_at = now
                os.write(2, b"\nCtrl-C: checkpoint at the next step boundary, then exit "
                            b"(Ctrl-C again to exit at once)\n")
        self._signal = self._signal or signal.Signals(signum).name

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
        metrics["train/skipped_nonfinite"] = self.nonfinite.total
        metrics.update(self.meter.window_metrics(metrics, window, gbs))  # tokens/s, MFU, memory
        self.tracker.log(self.step, metrics)
        self.skips.check(totals)  # the same global figures on every rank: all stop together

    def evaluate(self) -> Dict[str, float]:
        # every rank evaluates the same held-out batches: under ZeRO-3 each forward is a
        # collective, so ranks must run the same forwards (the eval set is small)
        t0 = time.perf_counter()
        batches = self._held_out()
        ctx = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
        with ctx, torch.no_grad():
            metrics = self.task.evaluate(self.engines, batches)
        self.meter.add("eval", time.perf_counter() - t0)
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
        self.meter.add("sample", time.perf_counter() - t0)
        if self.rank == 0 and grids:
            paths = self.tracker.log_images(self.step, grids)
            log.info(f"samples: {', '.join(str(p) for p in paths)} ({time.perf_counter() - t0:.1f}s)")

    def save(self) -> None:
        t0 = time.perf_counter()
        rank_state = {"data": self.loader.state_dict()}
        if self.ema is not None and (self.ema.partitioned or self.rank == 0):
            rank_state["ema"] = self.ema.state_dict()
        meta = {"wandb_run_id": self.tracker.run_id, "config": to_dict(self.cfg),
                "lr_scale": self.lr_scale, "skipped_nonfinite": self.nonfinite.total,
                "ema": self.ema is not None,
                "ema_partitioned": bool(self.ema and self.ema.partitioned), **self.frozen}
        if self.keys_file is not None:
            self.keys_file.flush()
        cdir = checkpoint.save(self.out, self.step, self.engines, rank_state, meta,
                               self.cfg.checkpoint.keep_last)
        self.meter.add("checkpoint", time.perf_counter() - t0)
        log.info(f"saved {cdir} in {time.perf_counter() - t0:.1f}s")

    def close(self) -> None:
        if getattr(self, "watchdog", None) is not None:
            self.watchdog.close()
        self.tracker.close()
        if self.keys_file is not None:
            self.keys_file.close()

