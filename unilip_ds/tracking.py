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
CONSOLE_KEYS = ("lr/model", "grad_norm/model", "samples_per_s", "tokens_per_s", "mfu", "step_time_s",
                "data_wait_frac", "mem/peak_allocated_gb", "mem/peak_reserved_gb", "mem/peak_rss_gb")


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

    def log_summary(self, step: int, summary: Dict[str, Any]) -> None:
        """The run summary (HardwareMeter.summary): console lines, one record per session
        {"step", "time", **summary} appended to <run.output_dir>/run_summary.jsonl (not
        metrics.jsonl, which holds one record per logged step), the W&B run summary and
        TensorBoard scalars `summary/<key>` at the last step."""
        if self.rank != 0:
            return
        for line in summary_lines(summary):
            log.info(line)
        with open(self.out / "run_summary.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **summary}) + "\n")
        if self.wandb is not None:
            self.wandb.summary.update({f"summary/{k}": v for k, v in summary.items()})
        if self.tensorboard is not None:
            for k, v in summary.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tensorboard.add_scalar(f"summary/{k}", v, step)
            self.tensorboard.flush()

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


# -- hardware use: MFU, throughput, memory, the run summary --------------------------------
# dense (no sparsity) peak TFLOPS per device: (bf16, tf32), by a fragment of
# torch.cuda.get_device_name(), the first match wins (so the specific names come first)
PEAK_TFLOPS = (
    ("GH200", 989.0, 494.5), ("H200", 989.0, 494.5), ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 417.5), ("H100", 989.0, 494.5), ("H800", 989.0, 494.5), ("H20", 148.0, 74.0),
    ("B200", 2250.0, 1100.0), ("A100", 312.0, 156.0), ("A800", 312.0, 156.0), ("L40S", 362.0, 183.0),
    ("L40", 181.0, 90.5), ("L4", 121.0, 60.0), ("A10G", 70.0, 35.0), ("A10", 125.0, 62.5),
    ("MI300X", 1307.0, 653.7), ("MI250", 362.0, 181.0),
)


def peak_tflops(device, precision: str, override: float = 0.0):
    """(peak TFLOPS per device, where the figure comes from), or (None, why not): the config's
    train.peak_tflops when set, else the table above for a CUDA device (bf16 runs: the bf16
    figure, fp32 runs: TF32); on CPU only when given."""
    if override and override > 0:
        return float(override), "train.peak_tflops"
    if getattr(device, "type", str(device)) != "cuda":
        return None, "CPU: set train.peak_tflops for an MFU"
    import torch
    name = torch.cuda.get_device_name(device)
    for fragment, bf16, tf32 in PEAK_TFLOPS:
        if fragment.lower() in name.lower():
            which = "bf16" if precision == "bf16" else "tf32"
            return (bf16 if which == "bf16" else tf32), f"{name}, dense {which}"
    return None, f"'{name}' is not in tracking.PEAK_TFLOPS: set train.peak_tflops for an MFU"


def summary_lines(s: Dict[str, Any]) -> list:
    def pct(v):
        return f"{100 * v:.1f}%" if isinstance(v, (int, float)) else "n/a"

    def dur(v):
        return f"{v:.1f}s" if v < 60 else _duration(v)
    return [f"run summary: {s['steps']} steps in {_duration(s['wall_s'])} wall "
            f"(training {dur(s['train_s'])}, evaluation {dur(s['eval_s'])}, sampling "
            f"{dur(s['sample_s'])}, checkpoints {dur(s['checkpoint_s'])}, other {dur(s['other_s'])})",
            f"run summary: {_fmt(s['samples_per_s'])} samples/s, {_fmt(s['tokens_per_s'])} tokens/s, "
            f"MFU {pct(s.get('mfu'))}, data wait {pct(s['data_wait_frac'])} of step time, "
            f"{s['checkpoints']} checkpoint(s) written, peak memory {_fmt(s['peak_memory_gb'])} GB "
            f"({s['memory_kind']})"]


class HardwareMeter:
    """How well a run uses the hardware. At start: the stage's FLOPs per sample (flops.py, on
    the meta device; rank 0; counted only when there is a peak to divide by: a known GPU or
    train.peak_tflops). Per logged window (`window_metrics`): samples/s and tokens/s (global),
    `tflops_per_device` and `mfu` (rank 0's micro-batches, by their task, over the step time,
    against the device's peak), peak device memory in the window (`mem/peak_allocated_gb`,
    `mem/peak_reserved_gb`; CPU: `mem/rss_gb` now, `mem/peak_rss_gb` of the process). At exit
    (`summary`): steps, wall time, mean samples/s / tokens/s / MFU, the data-wait share, the
    time in evaluation, sampling and checkpoints, checkpoints written."""

    def __init__(self, cfg: Config, rank: int, world: int, device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.t0 = time.time()
        self.peak, why = peak_tflops(device, cfg.train.precision, cfg.train.peak_tflops)
        self.flops = None
        self.tokens = _nominal_tokens(cfg)
        self.tasks: Dict[str, int] = {}
        self.totals = {"train_s": 0.0, "wait_s": 0.0, "samples": 0, "flop": 0.0, "tokens": 0.0,
                       "eval_s": 0.0, "sample_s": 0.0, "checkpoint_s": 0.0, "checkpoints": 0, "steps": 0}
        self.peak_memory = 0.0
        if rank != 0:
            return
        if self.peak is None:
            log.info(f"MFU: not reported ({why})")
            return
        t = time.time()
        try:
            from unilip_ds.flops import stage_flops
            self.flops = stage_flops(cfg)
        except Exception as exc:  # a counter that cannot follow a model must not stop a run
            log.warning(f"MFU: FLOPs per sample not counted ({type(exc).__name__}: {str(exc)[:200]})")
            return
        self.tokens = self.flops.tokens
        for line in self.flops.lines():
            log.info(line)
        log.info(f"MFU against {self.peak:g} TFLOPS per device ({why}); FLOPs counted in {time.time() - t:.1f}s")

    def batch(self, task) -> None:
        """One micro-batch of this process ran (its data task: t2i, edit, recon)."""
        task = task if isinstance(task, str) else "recon" if self.cfg.run.task == "recon" else "t2i"
        self.tasks[task] = self.tasks.get(task, 0) + 1

    def add(self, what: str, seconds: float) -> None:
        """Time outside the training steps: eval | sample | checkpoint."""
        self.totals[f"{what}_s"] += seconds
        if what == "checkpoint":
            self.totals["checkpoints"] += 1

    def _memory(self) -> Dict[str, float]:
        import torch
        gb = 2 ** 30
        if getattr(self.device, "type", "cpu") == "cuda":
            out = {"mem/peak_allocated_gb": torch.cuda.max_memory_allocated(self.device) / gb,
                   "mem/peak_reserved_gb": torch.cuda.max_memory_reserved(self.device) / gb}
            torch.cuda.reset_peak_memory_stats(self.device)
            self.peak_memory = max(self.peak_memory, out["mem/peak_reserved_gb"])
            return out
        import resource
        out = {}
        try:
            with open("/proc/self/statm") as f:
                out["mem/rss_gb"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / gb
        except (OSError, ValueError):
            pass
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gb  # Linux: KiB
        out["mem/peak_rss_gb"] = peak = max(peak, out.get("mem/rss_gb", 0.0))
        self.peak_memory = max(self.peak_memory, peak)
        return out

    def window_metrics(self, metrics: Dict[str, Any], window: Dict[str, float], global_batch: int) -> Dict[str, Any]:
        """The hardware metrics of one logging window (`window`: the trainer's step time, data
        wait and steps; `metrics`: what the window logged, for the cache shares)."""
        steps, seconds = window["steps"], window["time"]
        samples = steps * global_batch
        tasks, self.tasks = self.tasks, {}
        cached = {k: float(v) for k, v in metrics.items() if k.startswith("data/cached_")}
        if self.flops is not None:
            flop, tokens = self.flops.for_window(tasks, cached)
        else:
            n = sum(tasks.values()) or 1
            flop, tokens = None, sum(k * self.tokens.get(t, 0) for t, k in tasks.items()) / n
        t = self.totals
        t["train_s"] += seconds
        t["wait_s"] += window["wait"]
        t["samples"] += samples
        t["steps"] += steps
        t["tokens"] += samples * tokens
        out = {"tokens_per_s": samples * tokens / seconds if seconds > 0 else 0.0}
        if flop is not None and seconds > 0:
            achieved = samples * flop / seconds / self.world / 1e12  # per device
            t["flop"] += samples * flop
            out["tflops_per_device"] = achieved
            out["mfu"] = achieved / self.peak
        out.update(self._memory())
        return out

    def summary(self, steps: int) -> Dict[str, Any]:
        t = self.totals
        wall = time.time() - self.t0
        mfu = t["flop"] / t["train_s"] / self.world / 1e12 / self.peak if self.flops and t["train_s"] else None
        cuda = getattr(self.device, "type", "cpu") == "cuda"
        out = {"steps": steps, "wall_s": wall, "train_s": t["train_s"], "eval_s": t["eval_s"],
               "sample_s": t["sample_s"], "checkpoint_s": t["checkpoint_s"],
               "other_s": max(0.0, wall - t["train_s"] - t["eval_s"] - t["sample_s"] - t["checkpoint_s"]),
               "samples_per_s": t["samples"] / t["train_s"] if t["train_s"] else 0.0,
               "tokens_per_s": t["tokens"] / t["train_s"] if t["train_s"] else 0.0,
               "mfu": mfu, "peak_tflops": self.peak,
               "gflops_per_sample": ({k: v / 1e9 for k, v in self.flops.per_sample.items()} if self.flops else None),
               "data_wait_frac": t["wait_s"] / t["train_s"] if t["train_s"] else 0.0,
               "checkpoints": t["checkpoints"], "peak_memory_gb": self.peak_memory,
               "memory_kind": "peak reserved, device" if cuda else "peak RSS, rank 0 process"}
        return out


def _nominal_tokens(cfg: Config) -> Dict[str, int]:
    """Tokens per sample without counting FLOPs: gen, the nominal prompt + the queries (edit:
    + the reference image's tokens + 2); recon, the ViT's patches."""
    try:
        from unilip_ds.flops import NOMINAL_PROMPT_TOKENS
        from unilip_ds.models.flavors import get_flavor
        fl = get_flavor(cfg.model.flavor)
        patch, res = fl.vision["patch_size"], cfg.data.resolution
        if cfg.run.task == "recon":
            return {"recon": (res // patch) ** 2}
        image = int((res // patch) * fl.downsample_ratio) ** 2
        return {"t2i": NOMINAL_PROMPT_TOKENS + fl.num_queries,
                "edit": NOMINAL_PROMPT_TOKENS + image + 2 + fl.num_queries}
    except Exception:  # noqa: BLE001 (a flavor without these fields: no tokens/s)
        return {}
