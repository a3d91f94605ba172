"""Training-step speed of the generator (gen_stage2 layout: DiT trains) on one device, per
attention backend: step time, samples/s, peak memory, FLOPs per step (counted by
torch.utils.flop_counter on one step: matmuls and attention, forward and backward) and MFU.

    .venv/bin/python benchmarks/gen_step.py --flavor 1b --attn flash,sdpa --batch 32 --steps 6
    .venv/bin/python benchmarks/gen_step.py --flavor tiny --device cpu --dtype fp32 --batch 2 --steps 2

FLOPs are the executed ones (activation checkpointing's recompute included, so MFU here is
hardware FLOP utilisation), counted by benchmarks/gen_flops.py's corrected counter.
Random weights (the dimensions are the flavor's), random pixels, prompt token ids of
`--prompt-tokens` length (T2I) or the edit layout (text + 256 image tokens); the model code is
the training code's GenModel, stepped with AdamW on the trainable parameters, without
DeepSpeed (one device). MFU is against `--peak-tflops` (989 = H100/H200 dense bf16).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unilip_ds.flops import fake_prompts  # noqa: E402


def run(args, impl: str, flops: Optional[int] = None) -> dict:
    """Times `impl`; counts the step's FLOPs unless given (flash-attention's kernels are not
    seen by torch's FLOP counter, so the SDPA run's count serves every backend)."""
    import torch

    from benchmarks.gen_flops import flop_counter

    from unilip_ds.config import load_config
    from unilip_ds.models.gen_loading import build_gen_model
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    res = 448 if args.flavor != "tiny" else 224
    cfg = load_config("gen_stage2", [f"model.flavor={args.flavor}", f"model.attn_impl={impl}",
                                     f"data.resolution={res}", "data.train.sources=[]", "data.train.urls=[/none]",
                                     f"model.grad_checkpointing={str(args.grad_checkpointing).lower()}"])
    torch.manual_seed(0)
    with torch.device(device):
        model = build_gen_model(cfg, 10.6).to(dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=device.type == "cuda" or None)
    n_img = (res // 28) ** 2
    prompts = fake_prompts(args.task, args.batch, args.prompt_tokens, n_img, model.llm.config.vocab_size,
                           model.mllm.config.image_token_id).to(device)
    images = torch.rand(args.batch, 3, res, res, device=device)
    ref = torch.rand(args.batch, 3, res, res, device=device) if args.task == "edit" else None

    def step():
        loss = model(prompts, image=images, ref_image=ref)["loss"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (allocations, kernels)
    if flops is None:
        counter = flop_counter()  # with the depthwise-conv backward formula corrected
        with counter:
            step()
        flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    out = {"attn": impl, "task": args.task, "flavor": args.flavor, "batch": args.batch, "dtype": args.dtype,
           "grad_checkpointing": args.grad_checkpointing, "step_s": round(t, 4),
           "samples_per_s": round(args.batch / t, 2), "gflops_per_step": round(flops / 1e9, 1),
           "mfu": round(flops / t / (args.peak_tflops * 1e12), 4), "flops": flops}
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", default="1b")
    ap.add_argument("--attn", default="flash,sdpa", help="comma-separated: flash, sdpa, eager")
    ap.add_argument("--task", choices=("t2i", "edit"), default="t2i")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=120)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_false")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()
    impls = args.attn.split(",")
    flops = run(args, "sdpa")["flops"] if "flash" in impls else None
    for impl in impls:
        print(json.dumps(run(args, impl, flops)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
