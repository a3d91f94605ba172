"""Metrics: rank-0 console lines, <run.output_dir>/metrics.jsonl (appended across
resumes) and W&B (offline by default; a resumed run continues the same W&B run)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
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


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Tracker:
    """Only rank 0 writes anything."""

    def __init__(self, cfg: Config, rank: int, run_id: Optional[str] = None):
        self.rank = rank
        self.out = Path(cfg.run.output_dir)
        self.wandb = None
        self.run_id = run_id
        if rank != 0:
            return
        self.metrics = open(self.out / "metrics.jsonl", "a")
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
        keys = [k for k in metrics if k.startswith("loss")] + \
            [k for k in ("lr/model", "grad_norm/model", "samples_per_s", "step_time_s",
                         "data_wait_frac") if k in metrics]
        log.info(f"step {step} " + " ".join(f"{k}={_fmt(metrics[k])}" for k in keys))

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
        return paths

    def close(self) -> None:
        if self.rank != 0:
            return
        self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()
