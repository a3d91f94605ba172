"""Text-to-image from a gen export (a UniLIPPipeline directory):

    python -m unilip_ds.inference.generate --ckpt exports/gen_stage2 --prompt "a red car" \\
        [--prompt ...] [--prompts-file prompts.txt] [--steps 20] [--guidance 4.5] [--seed 0] \\
        [--num-images 1] [--flow-shift 3.0] [--batch-size 8] [--device cuda] [--dtype bf16] --out samples/

Writes one PNG per image (`<prompt#>_<image#>.png`) and `run.json` (every setting, the device
and dtype used, the file of each image). Image k of prompt i uses the seed `seed + i * n + k`,
so an image does not depend on what else is in its batch. CUDA + bf16 where available,
CPU + fp32 otherwise. Editing: unilip_ds.inference.edit (same options).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional


def parser(doc: str, edit: bool) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="gen export directory (launch/export.py of a gen run)")
    if edit:
        ap.add_argument("--image", action="append", required=True, help="input image (repeatable)")
        ap.add_argument("--instruction", action="append", required=True,
                        help="edit instruction: one for all images, or one per --image")
    else:
        ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
        ap.add_argument("--prompts-file", help="text file, one prompt per line")
    ap.add_argument("--steps", type=int, default=20, help="DPM-Solver steps (default 20)")
    ap.add_argument("--guidance", type=float, default=4.5, help="CFG scale (default 4.5; 1 = no CFG)")
    ap.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    ap.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    ap.add_argument("--flow-shift", type=float, default=None,
                    help="sampling flow shift (default: the export's scheduler, 3.0 as the reference)")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per forward (default 8)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                    help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--out", required=True, help="new (or empty) output directory")
    return ap


def _check(args, edit: bool) -> List[str]:
    """The prompts / instructions; a bad argument raises ValueError (one line)."""
    from unilip_ds.writable import unwritable
    out = Path(args.out)
    why = unwritable(out)
    if why:
        raise ValueError(f"--out {out}: {why}; choose a directory you can write")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not empty; nothing was written")
    if not (Path(args.ckpt) / "model_index.json").is_file():
        raise ValueError(f"--ckpt {args.ckpt} is not a gen export (no model_index.json)")
    for name in ("steps", "num_images", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.flow_shift is not None and args.flow_shift <= 0:
        raise ValueError("--flow-shift must be > 0")
    if edit:
        for p in args.image:
            if not Path(p).is_file():
                raise ValueError(f"--image {p}: no such file")
        if len(args.instruction) not in (1, len(args.image)):
            raise ValueError(f"{len(args.instruction)} --instruction for {len(args.image)} --image: "
                             "give one, or one per image")
        return args.instruction * len(args.image) if len(args.instruction) == 1 else list(args.instruction)
    prompts = list(args.prompt)
    if args.prompts_file:
        if not Path(args.prompts_file).is_file():
            raise ValueError(f"--prompts-file {args.prompts_file}: no such file")
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give --prompt and/or --prompts-file")
    return prompts


def main(argv: Optional[List[str]] = None, edit: bool = False, doc: str = __doc__) -> int:
    args = parser(doc, edit).parse_args(argv)
    try:
        texts = _check(args, edit)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch
    from diffusers import DPMSolverMultistepScheduler
    from PIL import Image

    from unilip_ds.inference.pipeline import UniLIPPipeline
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    t0 = time.time()
    pipe = UniLIPPipeline.from_pretrained(args.ckpt).to(device, torch.bfloat16 if dtype == "bf16" else torch.float32)
    if args.flow_shift is not None:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=args.flow_shift)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = [Image.open(p).convert("RGB") for p in args.image] if edit else None
    n, records = args.num_images, []
    for start in range(0, len(texts), args.batch_size):
        idx = range(start, min(len(texts), start + args.batch_size))
        gens = [torch.Generator().manual_seed(args.seed + i * n + k) for i in idx for k in range(n)]
        result = pipe(prompt=[texts[i] for i in idx], image=[images[i] for i in idx] if edit else None,
                      num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gens,
                      num_images_per_prompt=n).images
        for j, im in enumerate(result):
            i, k = idx[j // n], j % n
            name = f"{i:03d}_{k}.png"
            im.save(out / name)
            rec = {"file": name, "seed": args.seed + i * n + k, ("instruction" if edit else "prompt"): texts[i]}
            if edit:
                rec["input"] = args.image[i]
                side = Image.new("RGB", (im.width * 2, im.height))
                side.paste(images[i].resize(im.size), (0, 0))
                side.paste(im, (im.width, 0))
                side.save(out / f"{i:03d}_{k}_side_by_side.png")
            records.append(rec)
    run = {"ckpt": str(Path(args.ckpt).resolve()), "task": "edit" if edit else "t2i", "device": device,
           "dtype": dtype, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
           "num_images": n, "flow_shift": pipe.scheduler.config.flow_shift, "batch_size": args.batch_size,
           "seconds": round(time.time() - t0, 2), "images": records}
    (out / "run.json").write_text(json.dumps(run, indent=1))
    print(json.dumps({"out": str(out.resolve()), "images": len(records), "device": device, "dtype": dtype}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
