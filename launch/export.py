"""Write a run's consolidated weights (EMA where the run keeps one) as safetensors,
per component, in the save_pretrained layout; `model.init_from` and the inference
commands read this layout.

    python launch/export.py --run runs/recon_stage1 --out exports/recon_stage1 [--no-ema]

With --as-internvl, a complete InternVL3 `-hf` model directory whose vision path (vision
tower + multi_modal_projector) is an export's UniLIP encoder, everything else (language
model, tokenizer, processor, chat template) the given InternVL3 directory's; it loads with
`InternVLForConditionalGeneration.from_pretrained` as is, e.g. in lmms-eval (README
"Understanding benchmarks"):

    python launch/export.py --as-internvl /ckpt/InternVL3-1B-hf --export exports/recon_stage2_448 \\
        --out exports/unilip-1b-hf [--dtype bfloat16]

(--export: a recon export's vision/ or a gen export's mllm/; --run instead of --export
exports the run first, next to --out.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="the run's run.output_dir")
    ap.add_argument("--out", required=True, help="new (or empty) directory to write")
    ap.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    ap.add_argument("--as-internvl", metavar="INTERNVL_DIR",
                    help="write an InternVL3 -hf model directory: this one's, with the UniLIP vision path")
    ap.add_argument("--export", help="with --as-internvl: the export giving the vision path (recon or gen)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="with --as-internvl: weights dtype (default: the InternVL3 directory's)")
    args = ap.parse_args(argv)
    if args.as_internvl is None and (args.export or args.dtype):
        ap.error("--export and --dtype go with --as-internvl")
    if args.as_internvl is not None and bool(args.run) == bool(args.export):
        ap.error("--as-internvl takes one of --run or --export")
    if args.as_internvl is None and not args.run:
        ap.error("--run is required")

    from unilip_ds.config import ConfigError
    from unilip_ds.engine.checkpoint import CheckpointError
    from unilip_ds.engine.export import ExportError, export
    from unilip_ds.engine.weights import WeightsMismatch
    from unilip_ds.evaluation.internvl_export import InternVLExportError, export_as_internvl
    try:
        if args.as_internvl is None:
            info = export(args.run, args.out, use_ema=not args.no_ema)
        else:
            out = Path(args.out)
            if out.exists() and any(out.iterdir()):
                raise InternVLExportError(f"--out {out} exists and is not empty; nothing was written")
            src, tmp = args.export, None
            if args.run:  # the run's export first, beside --out, removed afterwards
                tmp = out.parent / f".{out.name}.export"
                shutil.rmtree(tmp, ignore_errors=True)
                export(args.run, tmp, use_ema=not args.no_ema)
                src = tmp
            try:
                info = export_as_internvl(args.as_internvl, src, out, args.dtype)
                if tmp is not None:  # name the run, not the temporary export
                    info["export"] = f"run {Path(args.run).resolve()}"
                    (out / "unilip_export.json").write_text(json.dumps(info, indent=1) + "\n")
            finally:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
    except (ExportError, CheckpointError, ConfigError, WeightsMismatch, InternVLExportError,
            FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(Path(args.out).resolve()), **info}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
