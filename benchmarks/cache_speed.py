"""Training speed of the generator with each frozen-output cache level: samples/s of
gen_stage2 training steps with `none`, `latents` and `prefix`, T2I and edit, in one run, next to
the speed-up the FLOP count of the same model and batch predicts (benchmarks/gen_flops.py).

    .venv/bin/python benchmarks/cache_speed.py                      # 1b proportions, widths / 8, CPU
    .venv/bin/python benchmarks/cache_speed.py --div 1 --device cuda --dtype bf16 --batch 32

The model is the real 1b flavor with every width divided by `--div` (attention heads, layer
counts, image size 448, 256 image tokens, 256 queries, 6 connector layers, prompt lengths kept:
"1B proportions"), random weights. Each step is the training code's: GenTask.loss (CFG
dropout, cached records -> GenModel.forward's cached inputs, exactly as in training), backward,
AdamW over the trainable parameters. Cached records come from data.cache.compute_records (what
data_prep/cache_features.py writes), held in memory in the cache's dtype (bf16), so the
figures are the model step's; reading the records is the data loader's job (its workers,
ahead of the step) and is not timed here. Levels are timed round-robin, one step each in
turn, so that a machine whose load drifts slows every level alike; on a shared machine the
figures still vary: compare them only within one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LEVEL_NAMES = ("none", "latents", "prefix")
WORDS = ("a photo of red cat sitting on wooden table near the window in warm evening light with "
         "soft shadows and small blue vase full of yellow flowers beside old book").split()


def scaled_flavor(base: str, div: int) -> str:
    """Registers (and names) the flavor `base` with every width divided by `div`: heads, layers
    and token counts unchanged, so the share of each component in the step is the real one's."""
    from unilip_ds.models.flavors import FLAVORS
    if div == 1:
        return base
    f = FLAVORS[base]
    name = f"{base}-w{div}"

    def w(x: int) -> int:
        if x % div:
            raise SystemExit(f"error: --div {div} does not divide the width {x} of flavor {base}")
        return x // div
    vision = dict(f.vision, hidden_size=w(f.vision["hidden_size"]),
                  intermediate_size=w(f.vision["intermediate_size"]))
    text = dict(f.text, hidden_size=w(f.text["hidden_size"]), intermediate_size=w(f.text["intermediate_size"]))
    sana = dict(f.sana, attention_head_dim=w(f.sana["attention_head_dim"]),
                cross_attention_head_dim=w(f.sana["cross_attention_head_dim"]),
                cross_attention_dim=w(f.sana["cross_attention_dim"]),
                caption_channels=w(f.sana["caption_channels"]))
    dcae = dict(f.dcae, attention_head_dim=w(f.dcae["attention_head_dim"]),
                encoder_block_out_channels=[w(c) for c in f.dcae["encoder_block_out_channels"]],
                decoder_block_out_channels=[w(c) for c in f.dcae["decoder_block_out_channels"]])
    FLAVORS[name] = dataclasses.replace(f, name=name, vision=vision, text=text, sana=sana, dcae=dcae)
    return name


def caption(n_words: int, i: int) -> str:
    return " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(n_words))


def setup(args):
    import torch

    from unilip_ds.config import load_config
    from unilip_ds.models.flavors import get_flavor
    from unilip_ds.models.gen_loading import build_gen_model
    from unilip_ds.models.prompts import PromptBuilder
    from unilip_ds.models.tiny_assets import tiny_tokenizer
    from unilip_ds.tasks.gen import GenTask
    flavor = scaled_flavor(args.flavor, args.div)
    fl = get_flavor(flavor)
    over = [f"model.flavor={flavor}", f"model.attn_impl={args.attn}", f"data.resolution={fl.gen_resolution}",
            "data.train.sources=[]", "data.train.urls=[/none]",
            f"model.grad_checkpointing={str(args.grad_checkpointing).lower()}"]
    cfg = load_config("gen_stage2", over)
    task = GenTask(cfg)
    # a real Qwen2 BPE tokenizer with InternVL3's special tokens and chat template (the
    # released one is not available offline; only prompt lengths matter here)
    task._prompts = PromptBuilder(tiny_tokenizer([" ".join(WORDS)]), task.num_image_tokens(),
                                  fl.num_queries, cfg.gen.max_length)
    torch.manual_seed(0)
    device = torch.device(args.device)
    with torch.device(device):
        model = build_gen_model(cfg, task.latent_scale())
    model.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32).train()
    return cfg, task, model, flavor


def make_batches(args, task, model, name: str) -> Dict[str, dict]:
    """The same batch at each level: no cache, latent records, prefix records."""
    import torch

    from unilip_ds.data.cache import compute_records
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(1)
    b, res = args.batch, model.resolution
    texts = [caption(args.words, i) for i in range(b)]
    batch = {"__key__": [f"{i:06d}" for i in range(b)], "__task__": name,
             "caption" if name == "t2i" else "instruction": texts,
             "image": torch.rand(b, 3, res, res, generator=g).to(device)}
    if name == "edit":
        batch["input_image"] = torch.rand(b, 3, res, res, generator=g).to(device)
    out = {"none": batch}
    for level in LEVEL_NAMES[1:]:
        records = compute_records(model, task.prompts(), name, batch["image"].to(model.dtype), texts, level,
                                  torch.bfloat16, ref_images=batch.get("input_image"))
        out[level] = {**batch, "__cache__": [{k: v.cpu() for k, v in r.items()} for r in records]}
    return out


def predicted(args, flavor: str, task, name: str, batch: dict) -> Dict[str, float]:
    """gen_flops' per-component count of the same model and prompts (meta device)."""
    import gen_flops
    import torch
    model, _ = gen_flops.build(flavor, "meta", args.attn, args.grad_checkpointing)
    prompts = task.prompts()(name, batch["caption" if name == "t2i" else "instruction"])
    image_mask = prompts.image_mask
    prompts = prompts.to("meta")
    if name == "t2i":
        prompts.image_mask = image_mask  # see gen_flops.make_batch
    res = model.resolution
    images = torch.rand(args.batch, 3, res, res, device="meta")
    ref = torch.rand(args.batch, 3, res, res, device="meta") if name == "edit" else None
    comp = gen_flops.component_flops(model, prompts, images, ref)
    per_step = {c: v["fwd"] + v["bwd"] for c, v in comp.items()}
    return {"prefix_len": int(prompts.input_ids.shape[1]), "gflops_per_sample":
            {c: v / args.batch / 1e9 for c, v in per_step.items()}, "speedup": gen_flops.predict(per_step)}


def time_levels(args, task, model, batches: Dict[str, dict]) -> Dict[str, list]:
    import torch

    from unilip_ds.tasks.base import MAIN
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    engines = {MAIN: model}
    cuda = next(model.parameters()).is_cuda

    def step(batch):
        loss, logs = task.loss(MAIN, batch, 0, engines)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return logs

    times: Dict[str, list] = {lvl: [] for lvl in batches}
    for rep in range(args.warmup + args.steps):
        for lvl, batch in batches.items():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            logs = step(batch)
            if cuda:
                torch.cuda.synchronize()
            if rep >= args.warmup:
                times[lvl].append(time.perf_counter() - t0)
            # the step really took the cached path it is timed for
            want = {"none": (0, 0), "latents": (1, 0), "prefix": (1, 1)}[lvl]
            got = (int(logs["data/cached_latents"]), int(logs["data/cached_prefix"]))
            assert got == want, f"level {lvl} ran as cached (latents, prefix) = {got}"
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", default="1b", help="the real flavor whose proportions are kept")
    ap.add_argument("--div", type=int, default=8, help="every width divided by this (1: the real model)")
    ap.add_argument("--tasks", default="t2i,edit")
    ap.add_argument("--batch", type=int, default=2, help="per-device batch")
    ap.add_argument("--words", type=int, default=100,
                    help="caption / instruction words (100 give a 119-token T2I prompt prefix here)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per level (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_false",
                    help="default: on, as the gen presets")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import torch
    cfg, task, model, flavor = setup(args)
    print(f"flavor {flavor} ({args.flavor} proportions), batch {args.batch}, {args.device} {args.dtype}, "
          f"grad checkpointing {args.grad_checkpointing}, torch threads {torch.get_num_threads()}, "
          f"{args.steps} timed steps per level (median)", flush=True)
    result = {"flavor": flavor, "batch": args.batch, "device": args.device, "dtype": args.dtype,
              "grad_checkpointing": args.grad_checkpointing, "tasks": {}}
    for name in args.tasks.split(","):
        batches = make_batches(args, task, model, name)
        pred = predicted(args, flavor, task, name, batches["none"])
        times = time_levels(args, task, model, batches)
        med = {lvl: statistics.median(t) for lvl, t in times.items()}
        entry = {"prefix_len": pred["prefix_len"], "step_s": med, "times": times,
                 "samples_per_s": {lvl: args.batch / t for lvl, t in med.items()},
                 "measured_speedup": {lvl: med["none"] / t for lvl, t in med.items()},
                 "predicted_speedup": pred["speedup"], "gflops_per_sample": pred["gflops_per_sample"]}
        result["tasks"][name] = entry
        print(f"\n{name}: prompt prefix {pred['prefix_len']} tokens, "
              f"{sum(pred['gflops_per_sample'].values()):.1f} GFLOPs/sample counted")
        print(f"{'level':<9}{'step s':>9}{'samples/s':>11}{'speed-up':>10}{'FLOP pred.':>12}{'meas/pred':>11}")
        for lvl in LEVEL_NAMES:
            m, p = entry["measured_speedup"][lvl], entry["predicted_speedup"][lvl]
            print(f"{lvl:<9}{med[lvl]:>9.3f}{entry['samples_per_s'][lvl]:>11.2f}{m:>9.2f}x{p:>11.2f}x{m / p:>11.2f}",
                  flush=True)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
