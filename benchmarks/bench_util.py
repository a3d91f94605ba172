"""Helpers shared by the device benchmarks (gen_step.py, recon_step.py, flash_agree.py) that
benchmarks/gpu_check.py runs: the CPU flash-attention stand-in, the peak-FLOPS lookup, batch
lists, out-of-memory handling and the one-figure command lines."""

from __future__ import annotations

import gc
import shlex
import statistics
import sys
from pathlib import Path
from typing import List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]


def install_flash_standin():
    """TEST-ONLY: tests/flash_standin.py (plain-torch `flash_attn`) for `attn=flash` on CPU, so
    the flash command lines run without a GPU. Returns the MonkeyPatch that holds it."""
    import pytest

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests import flash_standin
    mp = pytest.MonkeyPatch()
    flash_standin.install(mp)
    return mp


def int_list(text: str) -> List[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def ckpt_list(text: str) -> List[bool]:
    """'on,off' -> [True, False]."""
    words = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
    out = []
    for x in str(text).split(","):
        x = x.strip().lower()
        if x not in words:
            raise SystemExit(f"error: --grad-ckpt takes on / off (comma-separated), got '{x}'")
        out.append(words[x])
    return out


def peak(device, dtype: str, override: float = 0.0) -> Tuple[Optional[float], str]:
    """(peak TFLOPS, source) from the project's table (unilip_ds.tracking.PEAK_TFLOPS, by the
    CUDA device's name), or the override; (None, why) on CPU without an override."""
    from unilip_ds.tracking import peak_tflops
    return peak_tflops(device, "bf16" if dtype == "bf16" else "fp32", override)


def is_oom(exc: BaseException) -> bool:
    import torch
    text = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text or "alloc_failed" in text


def free_memory(*optimizers) -> None:
    """After an out-of-memory step: drop gradients and cached blocks (call outside `except`,
    whose traceback still holds the step's tensors)."""
    import torch
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def command(script: str, args: List[str]) -> str:
    """The command line that reproduces one figure (run from the repository root)."""
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", script, *args])


def step_row(base: dict, times: List[float], per_sample: float, batch: int, peak: Optional[float],
             peak_src: str, trainable: int) -> dict:
    """One timed configuration's figures: median step time, samples/s, achieved TFLOP/s and
    MFU (the training's FLOP counter per sample x batch, against `peak`)."""
    t = statistics.median(times)
    flops = per_sample * batch
    return {**base, "step_s": round(t, 4), "step_s_min": round(min(times), 4), "step_s_max": round(max(times), 4),
            "samples_per_s": round(batch / t, 2), "gflops_per_step": round(flops / 1e9, 1),
            "tflops_per_s": float(f"{flops / t / 1e12:.4g}"),
            "mfu": round(flops / t / (peak * 1e12), 4) if peak else None, "peak_tflops": peak,
            "peak_source": peak_src, "flops": flops, "trainable_params": trainable, "timed_steps": len(times)}
