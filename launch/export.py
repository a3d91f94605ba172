"""Write a run's consolidated weights (EMA where the run keeps one) as safetensors,
per component, in the save_pretrained layout; `model.init_from` and the inference
commands read this layout.

    python launch/export.py --run runs/recon_stage1 --out exports/recon_stage1 [--no-ema]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the run's run.output_dir")
    ap.add_argument("--out", required=True, help="new (or empty) directory to write")
    ap.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    args = ap.parse_args(argv)

    from unilip_ds.config import ConfigError
    from unilip_ds.engine.checkpoint import CheckpointError
    from unilip_ds.engine.export import ExportError, export
    from unilip_ds.engine.weights import WeightsMismatch
    try:
        info = export(args.run, args.out, use_ema=not args.no_ema)
    except (ExportError, CheckpointError, ConfigError, WeightsMismatch, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(Path(args.out).resolve()), **info}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
