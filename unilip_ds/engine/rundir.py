"""One run per `run.output_dir`: a new run never mixes into, clobbers or deletes another.

Checked before anything is written: a directory that holds a run is resumed
(`checkpoint.resume=true`, same task / flavor / resolution / engines), moved aside whole
(`run.overwrite=true`), or refused with one line saying what it holds and what to do.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import List

from omegaconf import OmegaConf

from unilip_ds.config import Config, ConfigError, to_dict
from unilip_ds.engine import checkpoint
from unilip_ds.writable import unwritable

# changing these under an existing run dir would make its checkpoints meaningless
INCOMPATIBLE_KEYS = ("run.task", "model.flavor", "data.resolution")


def holds_run(out: Path) -> bool:
    return any((out / name).exists() for name in ("config.yaml", "checkpoints", "metrics.jsonl"))


def describe(out: Path) -> str:
    """'a recon run (run.name=..., last checkpoint step 3)' from what the directory holds."""
    what = "a run"
    if (out / "config.yaml").is_file():
        old = OmegaConf.load(out / "config.yaml")
        what = f"a {old.run.task} run (run.name={old.run.name}"
        try:
            tag = checkpoint.latest_tag(out)
        except checkpoint.CheckpointError:
            tag = None
        what += f", last checkpoint step {int(tag[5:])})" if tag else ", no checkpoint)"
    return what


def restarted() -> bool:
    """A launcher restarted this job in place (torchrun --max-restarts, Slurm requeue): the
    run in output_dir is this job's own and is resumed, whatever run.overwrite says."""
    return any(int(os.environ.get(k, "0") or 0) > 0
               for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def move_aside(out: Path) -> Path:
    dst = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while dst.exists():
        n += 1
        dst = dst.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    os.rename(out, dst)
    return dst


def check_output_dir(cfg: Config, rank: int) -> None:
    """Before any process group: writable, then resume, move aside (rank 0) or refuse."""
    out = Path(cfg.run.output_dir)
    why = unwritable(out)
    if why:
        raise ConfigError(f"config key 'run.output_dir': {out}: {why}; choose a directory you can write "
                          "(run.output_dir=<dir>)")
    if not holds_run(out):
        return
    if cfg.run.overwrite and not restarted():
        if rank == 0:
            what = describe(out)
            print(f"run.overwrite=true: moved {what} from {out} to {move_aside(out)}", flush=True)
        return
    if not cfg.checkpoint.resume:
        raise ConfigError(f"run.output_dir {out} holds {describe(out)}: resume it (drop "
                          "checkpoint.resume=false), choose another run.output_dir, or set "
                          "run.overwrite=true to move it aside (nothing is deleted)")
    saved = out / "config.yaml"
    if not saved.is_file():
        return
    old = OmegaConf.load(saved)
    new = OmegaConf.create(to_dict(cfg))
    for key in INCOMPATIBLE_KEYS:
        a, b = OmegaConf.select(old, key), OmegaConf.select(new, key)
        if a != b:
            raise ConfigError(f"run.output_dir {out} belongs to a run with {key}={a!r} (this "
                              f"config: {b!r}); choose another run.output_dir")


def check_engines(out: Path, tag: str, engines: List[str]) -> None:
    """The checkpoint to resume trains the same engines (e.g. not a recon_stage1 run given
    to recon_stage2, which adds the discriminator)."""
    saved = checkpoint.read_meta(out, tag)["engines"]
    if list(saved) != list(engines):
        raise checkpoint.CheckpointError(
            f"run.output_dir {out} holds {describe(out)} that trains engines {list(saved)}; this "
            f"config trains {list(engines)}. Choose another run.output_dir; to start from that "
            f"run's weights, export it (launch/export.py --run {out} --out DIR) and set "
            "model.init_from=DIR")
