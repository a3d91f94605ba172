"""Metrics: rank-0 console lines (step N/max, elapsed, ETA, losses or eval metrics),
<run.output_dir>/metrics.jsonl (appended across resumes), W&B (offline by default; a resumed
run continues the same W&B run) and, with tensorboard.enabled, TensorBoard event files under
<run.output_dir>/tensorboard. `python -m unilip_ds.plot --run <dir>` plots metrics.jsonl."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

from unilip_ds.config import Config, to_dict

log = logging.getLogger("unilip_ds")


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(stream=sys.stdout, level=level,
                        format=f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S",
                        force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    show_warnings_once()


def show_warnings_once() -> None:
    """Each warning (category + text) is printed once per process. Python's own `once` /
    `default` bookkeeping is reset whenever code enters `warnings.catch_warnings()`, which
    libraries do every step, so e.g. torch's FutureWarning for `all_gather_into_tensor`,
    raised inside DeepSpeed, would otherwise repeat at every step on every rank."""
    show = warnings.showwarning
    if getattr(show, "once_per_process", False):
        return
    seen = set()

    def show_once(message, category, filename, lineno, file=None, line=None):
        if (category, str(message)) not in seen:
            seen.add((category, str(message)))
            show(message, category, filename, lineno, file, line)

    show_once.once_per_process = True  # type: ignore[attr-defined]
    warnings.showwarning = show_once


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Elapsed wall time of this process and the ETA to train.max_steps, at the rate of the
    steps this process ran so far (evaluations and checkpoints included)."""

    def __init__(self, max_steps: int, start_step: int = 0):
        self.max_steps, self.start_step = max_steps, start_step
        self.t0 = time.time()

    def __call__(self, step: int) -> str:
        elapsed = time.time() - self.t0
        done = step - self.start_step
        text = f"step {step}/{self.max_steps} {_duration(elapsed)}"
        if done > 0 and step < self.max_steps:
            text += f" ETA {_duration(elapsed / done * (self.max_steps - step))}"
        return text


# the training keys the console shows after the loss terms (all keys go to the files)
CONSOLE_KEYS = ("lr/model", "grad_norm/model", "samples_per_s", "step_time_s", "data_wait_frac")


def console_line(step: int, metrics: Dict[str, Any], progress: Progress) -> str:
    """`step N/max elapsed ETA` then the loss terms and rates, or for an evaluation
    `eval step N/max ...` then every eval/ metric."""
    evals = [k for k in metrics if k.startswith("eval/")]
    keys = evals or [k for k in metrics if k.startswith("loss")] + [k for k in CONSOLE_KEYS if k in metrics]
    return ("eval " if evals else "") + progress(step) + " " + " ".join(f"{k}={_fmt(metrics[k])}" for k in keys)


class Tracker:
    """Only rank 0 writes anything."""

    def __init__(self, cfg: Config, rank: int, run_id: Optional[str] = None, start_step: int = 0):
        self.rank = rank
        self.out = Path(cfg.run.output_dir)
        self.wandb = None
        self.tensorboard = None
        self.run_id = run_id
        self.progress = Progress(cfg.train.max_steps, start_step)
        if rank != 0:
            return
        self.metrics = open(self.out / "metrics.jsonl", "a")
        if cfg.tensorboard.enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(self.out / "tensorboard"))
        if cfg.wandb.mode != "disabled":
            import wandb
            os.environ.setdefault("WANDB_SILENT", "true")
            self.run_id = run_id or uuid.uuid4().hex[:12]
            self.wandb = wandb.init(
                project=cfg.wandb.project, entity=cfg.wandb.entity,
                name=cfg.wandb.name or cfg.run.name, id=self.run_id, resume="allow",
                mode=cfg.wandb.mode, dir=str(self.out), config=to_dict(cfg))

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        if self.rank != 0:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.tensorboard is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tensorboard.add_scalar(k, v, step)
            self.tensorboard.flush()
        log.info(console_line(step, metrics, self.progress))

    def log_images(self, step: int, images: Dict[str, Any]) -> list:
        """PIL images -> <run.output_dir>/samples/step<step>_<name>.png and W&B."""
        if self.rank != 0:
            return []
        out = self.out / "samples"
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, im in images.items():
            paths.append(out / f"step{step:07d}_{name}.png")
            im.save(paths[-1])
        if self.wandb is not None:
            import wandb
            self.wandb.log({f"samples/{k}": wandb.Image(v) for k, v in images.items()}, step=step)
        if self.tensorboard is not None:
            import numpy as np
            for k, v in images.items():
                self.tensorboard.add_image(f"samples/{k}", np.asarray(v.convert("RGB")), step, dataformats="HWC")
            self.tensorboard.flush()
        return paths

    def close(self) -> None:
        if self.rank != 0:
            return
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
