"""Train a stage:

    python launch/train.py --config recon_stage1 [key=value ...]
    torchrun --nproc_per_node 8 launch/train.py --config recon_stage1 ...
    deepspeed --num_gpus 8 launch/train.py --config gen_stage2 --ds_config ds_configs/zero3.json
    python launch/train.py --config recon_stage2 --dry-run [--json] [--world-size 64]
    python launch/train.py --config recon_stage1 --print-config

DeepSpeed builds its CPU communication op the first time it runs on CPU (about 3 minutes on
2 cores; one line says so before it starts) into TORCH_EXTENSIONS_DIR, by default
<repo>/.cache/torch_extensions under every launcher; later runs load it from there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# DeepSpeed's JIT-built ops go to the project's cache under every launcher (torchrun, the
# deepspeed launcher, plain python), as slurm/launch.sh and launch/demo.py set it
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

from unilip_ds.config import check_repeated, load_config, to_yaml  # noqa: E402


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="stage preset name or yaml path")
    ap.add_argument("--ds_config", "--ds-config", default=None,
                    help="DeepSpeed JSON (sets deepspeed.config)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("--dry-run", action="store_true",
                    help="build on the meta device; print parameter counts and memory")
    ap.add_argument("--json", action="store_true", help="with --dry-run: one JSON object")
    ap.add_argument("--world-size", type=int, default=None, help="with --dry-run: GPUs to size for")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None,
                    help=argparse.SUPPRESS)  # passed by the deepspeed launcher; env has it too
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return ap.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    overrides = list(args.overrides)
    if args.ds_config:
        overrides.append(f"deepspeed.config={args.ds_config}")
    world = args.world_size if args.dry_run and args.world_size else int(os.environ.get("WORLD_SIZE", "1"))
    try:
        # everything that can fail on user input fails here, before any process group or model
        check_repeated(overrides)
        cfg = load_config(args.config, overrides, world_size=world)
        if args.print_config:
            print(to_yaml(cfg), end="")
            print_mix(cfg)
            return 0
        from unilip_ds.engine.ds_config import check_ds_config
        if args.dry_run:
            from unilip_ds.dryrun import dry_run, format_report
            rep = dry_run(cfg, check_ds_config(cfg, cfg.deepspeed.config, world), world)
            print(json.dumps(rep) if args.json else format_report(rep))
            return 0
        from unilip_ds.trainer import Trainer, prepare
        ds_raw = prepare(cfg, cfg.deepspeed.config)
        announce_op_build()
        Trainer(cfg, ds_raw).train()
    except user_errors() as exc:  # bad config / data / checkpoint / weights: one line
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except run_failures() as exc:  # a dead or stalled rank, non-finite steps: one line, exit 3
        if int(os.environ.get("RANK", "0")) == 0 or "rank" in str(exc).split(":")[0]:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        os._exit(3)  # a broken process group may hang a normal interpreter exit
    return 0


def announce_op_build() -> None:
    """One line (local rank 0) before DeepSpeed JIT-builds its CPU communication op, which it
    does the first time it runs on CPU and takes minutes; the build is cached in
    TORCH_EXTENSIONS_DIR and later runs load it."""
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    accel = os.environ.get("DS_ACCELERATOR")
    if accel is None:
        import torch
        accel = "cuda" if torch.cuda.is_available() else "cpu"
    if accel != "cpu":
        return
    cache = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    if any(cache.glob("**/deepspeed_shm_comm*.so")):
        return
    print(f"note: DeepSpeed builds its CPU communication op once (about 3 minutes on 2 cores) into {cache}; "
          "later runs load it from there", flush=True)


def print_mix(cfg) -> None:
    """The effective share of each training source, as YAML comments (when computable here)."""
    from unilip_ds.data import DataError
    from unilip_ds.data.loader import describe_mix, mix_sources
    from unilip_ds.data.storage import StorageError
    split = cfg.data.train
    if not (split.urls or split.sources):
        return
    try:
        lines = describe_mix(mix_sources(cfg.data, split, "train"), split.mix)
    except (DataError, StorageError) as exc:
        lines = [f"not computable here ({str(exc).splitlines()[0]})"]
    print(f"# data.train mix ({split.mix}):")
    for line in lines:
        print(f"#   {line}")


def run_failures() -> tuple:
    from unilip_ds.engine.dist import CollectiveError
    from unilip_ds.engine.nonfinite import NonFiniteError
    return (CollectiveError, NonFiniteError)


def user_errors() -> tuple:
    from unilip_ds.config import ConfigError
    from unilip_ds.data import DataError
    from unilip_ds.data.storage import StorageError
    from unilip_ds.engine.checkpoint import CheckpointError
    from unilip_ds.engine.weights import WeightsMismatch
    return (ConfigError, DataError, StorageError, CheckpointError, WeightsMismatch,
            FileNotFoundError)


if __name__ == "__main__":
    sys.exit(main())
