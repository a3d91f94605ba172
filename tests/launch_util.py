"""Run the real entry points (launch/*.py) in subprocesses, the way users do."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def env(extra: Optional[dict] = None) -> dict:
    e = dict(os.environ)
    e.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    e.setdefault("DS_ACCELERATOR", "cpu")
    e.setdefault("HF_HUB_OFFLINE", "1")
    e["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.update(extra or {})
    return e


def tiny_recon_args(out: Path, shards: str, steps: int = 4, ds: str = "ds_configs/zero2.json",
                    extra: Optional[List[str]] = None) -> List[str]:
    """recon_stage1 on the tiny flavor, small enough for a CPU step."""
    return with_overrides(["--config", "recon_stage1", "--ds_config", ds,
            "model.flavor=tiny", "model.perceptual_pretrained=false",
            f"run.output_dir={out}", f"data.train.urls=[{shards}]", "data.num_workers=1",
            "data.shuffle_buffer=8", "data.resolution=224",
            f"train.max_steps={steps}", "train.micro_batch_size=2", "train.log_every=1",
            "optim.warmup_steps=2", "checkpoint.every_steps=2", "wandb.mode=disabled"], extra or [])


def with_overrides(args: List[str], extra: List[str]) -> List[str]:
    """`args` with `extra` key=value overrides replacing those of the same key (a key given
    twice on the command line is an error)."""
    keys = {e.split("=", 1)[0] for e in extra if "=" in e}
    return [a for a in args if a.split("=", 1)[0] not in keys] + list(extra)


def run(script: str, args: List[str], nproc: int = 1, launcher: str = "python",
        timeout: int = 600, extra_env: Optional[dict] = None) -> subprocess.CompletedProcess:
    if launcher == "python":
        cmd = [sys.executable, script]
    elif launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port",
               str(_port()), script]
    elif launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(_port()), script]
    else:
        raise ValueError(launcher)
    t0 = time.time()
    proc = subprocess.run(cmd + args, cwd=REPO, env=env(extra_env), capture_output=True, text=True,
                          timeout=timeout)
    print(f"[{launcher} x{nproc}] {script} took {time.time() - t0:.1f}s, rc={proc.returncode}")
    return proc


def _port() -> int:
    from unilip_ds.engine.dist import free_port
    return free_port()


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise AssertionError(f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def tiny_gen_args(out: Path, stage: str, assets, t2i: str, edit: Optional[str] = None, steps: int = 4,
                  ds: str = "ds_configs/zero3.json", init_from: Optional[Path] = None,
                  extra: Optional[List[str]] = None) -> List[str]:
    """A gen stage on the tiny flavor: gen_stage1 from the tiny InternVL / recon export /
    SANA / DC-AE directories, later stages from `init_from` (a gen export) on T2I + edit."""
    args = ["--config", stage, "--ds_config", ds, f"run.output_dir={out}", "data.num_workers=1",
            "data.shuffle_buffer=8", f"train.max_steps={steps}", "train.micro_batch_size=2",
            "train.log_every=1", "optim.warmup_steps=2", "checkpoint.every_steps=2", "wandb.mode=disabled",
            "train.precision=fp32"]
    if stage == "gen_stage1":
        args += assets.overrides("dcae") + [f"data.train.urls=[{t2i}]"]
    else:
        args += ["model.flavor=tiny", "data.resolution=224", f"model.init_from={init_from}", "data.train.mix=weight",
                 "data.train.sources=[{name: t2i, task: t2i, weight: 0.5, urls: [%s]}, "
                 "{name: edit, task: edit, weight: 0.5, urls: [%s]}]" % (t2i, edit)]
    return with_overrides(args, list(extra or []))


def one_line_error(main, args, capsys) -> str:
    """A command's `main` in this process (the same code as the command, without the seconds
    of a fresh interpreter's imports); returns the single stderr line it printed, after
    checking exit code 2, no traceback and nothing else on stderr."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, (rc, err)
    assert "Traceback" not in err
    return lines[0]


def start_error(args, capsys) -> str:
    """one_line_error of launch/train.py, which starts its line with "error: "."""
    from launch.train import main
    line = one_line_error(main, args, capsys)
    assert line.startswith("error: "), line
    return line
