"""Training-step speed of the generator (gen_stage2 layout: DiT trains) on one device, per
attention backend, activation-checkpointing setting and batch size: step time, samples/s, peak
memory, FLOPs per step and MFU. One JSON object per line, each with the command that
reproduces that figure alone.

    .venv/bin/python benchmarks/gen_step.py --flavor 1b --attn flash,sdpa --batch 32 --steps 6
    .venv/bin/python benchmarks/gen_step.py --flavor 1b --attn flash --grad-ckpt on,off --batch 32,64,128 --stop-at-oom
    .venv/bin/python benchmarks/gen_step.py --flavor tiny --attn sdpa --device cpu --dtype fp32 --batch 2 --steps 2

FLOPs are the project's count (unilip_ds.flops.gen_stage_flops: FlopCounterMode on the meta
device over the run's own model and config, what a training run logs its MFU with; matmuls,
convolutions and attention, forward and backward, activation checkpointing's recompute
included, so MFU here is hardware FLOP utilisation) for the `--prompt-tokens` prompt, times the
batch (the padded batch has the same shapes per sample). Flash-attention does the same FLOPs.
MFU is against the device's dense peak from unilip_ds.tracking.PEAK_TFLOPS (H100 / H200 SXM
bf16: 989), or `--peak-tflops`; on CPU only when that is given.

Random weights (the dimensions are the flavor's), random pixels, prompt token ids of
`--prompt-tokens` length (T2I; sample i is i % 7 tokens shorter, a padded batch) or the edit
layout (text + 256 image tokens); the model code is the training code's GenModel, stepped with
torch AdamW (fused on CUDA) on the trainable parameters in the model dtype, without DeepSpeed
(one device): a DeepSpeed bf16 run adds fp32 master weights and moments, 12 bytes per trainable
parameter (`trainable_params` in the output), to the peak memory measured here.
`--stop-at-oom`: batch sizes are tried in the order given; after an out-of-memory step the
larger ones of that (backend, checkpointing) pair are skipped and the row says `"oom": true`.
`--flash-standin` (CPU tests only): tests/flash_standin.py stands in for flash_attn.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_util  # noqa: E402

from unilip_ds.flops import fake_prompts  # noqa: E402


def build(args, impl: str, ckpt: bool):
    import torch

    from unilip_ds.config import load_config
    from unilip_ds.models.flavors import get_flavor
    from unilip_ds.models.gen_loading import build_gen_model
    fl = get_flavor(args.flavor)
    cfg = load_config("gen_stage2", [f"model.flavor={args.flavor}", f"model.attn_impl={impl}",
                                     f"data.resolution={fl.gen_resolution}", "data.train.sources=[]",
                                     "data.train.urls=[/none]", f"data.train.task={args.task}",
                                     f"model.grad_checkpointing={str(ckpt).lower()}"])
    torch.manual_seed(0)
    with torch.device(args.device):
        model = build_gen_model(cfg, fl.unilip_latent_scale)
    model.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32).train()
    return cfg, model


def one_command(args, impl: str, ckpt: bool, batch: int) -> str:
    a = ["--flavor", args.flavor, "--device", args.device, "--dtype", args.dtype, "--task", args.task,
         "--attn", impl, "--grad-ckpt", "on" if ckpt else "off", "--batch", str(batch),
         "--prompt-tokens", str(args.prompt_tokens), "--steps", str(args.steps)]
    if args.peak_tflops:
        a += ["--peak-tflops", f"{args.peak_tflops:g}"]
    if args.flash_standin and impl == "flash":
        a.append("--flash-standin")
    return bench_util.command("benchmarks/gen_step.py", a)


def run(args, impl: str, ckpt: bool, batches):
    """Rows for one (backend, checkpointing) pair, one model, the batch sizes in order."""
    import torch

    from unilip_ds.flops import gen_stage_flops
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg, model = build(args, impl, ckpt)
    per_sample = gen_stage_flops(cfg, args.prompt_tokens).per_sample[args.task]  # meta device
    peak, peak_src = bench_util.peak(device, args.dtype, args.peak_tflops)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True if cuda else None)
    res = model.resolution
    side = res // model.mllm.config.vision_config.patch_size[0] * model.mllm.config.downsample_ratio
    n_img = int(side) ** 2

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for batch in batches:
        base = {"attn": impl, "task": args.task, "flavor": args.flavor, "batch": batch, "dtype": args.dtype,
                "device": args.device, "grad_checkpointing": ckpt,
                "command": one_command(args, impl, ckpt, batch)}
        g = torch.Generator().manual_seed(batch)
        prompts = fake_prompts(args.task, batch, args.prompt_tokens, n_img, model.llm.config.vocab_size,
                               model.mllm.config.image_token_id).to(device)
        images = torch.rand(batch, 3, res, res, generator=g).to(device)
        ref = torch.rand(batch, 3, res, res, generator=g).to(device) if args.task == "edit" else None

        def step():
            loss = model(prompts, image=images, ref_image=ref)["loss"].mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, oom = [], None
        try:
            for i in range(args.warmup + args.steps):
                sync()
                t0 = time.perf_counter()
                step()
                sync()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
        except RuntimeError as exc:
            if not (cuda and bench_util.is_oom(exc)):
                raise
            oom = str(exc).splitlines()[0][:200]
        if oom is not None:
            bench_util.free_memory(opt)
            print(json.dumps({**base, "oom": True, "error": oom}), flush=True)
            if args.stop_at_oom:
                break
            continue
        row = bench_util.step_row(base, times, per_sample, batch, peak, peak_src, sum(p.numel() for p in params))
        if cuda:
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
            row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2 ** 30, 2)
        print(json.dumps(row), flush=True)
    del model, opt, params
    bench_util.free_memory()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", default="1b")
    ap.add_argument("--attn", default="flash,sdpa", help="comma-separated: flash, sdpa, eager")
    ap.add_argument("--task", choices=("t2i", "edit"), default="t2i")
    ap.add_argument("--batch", default="32", help="per-device batch; comma-separated sizes are run in order")
    ap.add_argument("--prompt-tokens", type=int, default=120)
    ap.add_argument("--steps", type=int, default=6, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--grad-ckpt", default=None, help="on, off or on,off (default: the gen_stage2 preset's, on)")
    ap.add_argument("--no-grad-checkpointing", dest="grad_ckpt", action="store_const", const="off")
    ap.add_argument("--stop-at-oom", action="store_true", help="skip larger batches after an out-of-memory step")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="0: tracking.PEAK_TFLOPS by the device name")
    ap.add_argument("--flash-standin", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.flash_standin:
        bench_util.install_flash_standin()
    for impl in args.attn.split(","):
        for ckpt in bench_util.ckpt_list(args.grad_ckpt or "on"):
            run(args, impl, ckpt, bench_util.int_list(args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
