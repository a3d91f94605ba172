"""FLOPs of one generator training step (gen_stage2 layout: the DiT trains), split per
component, and the step-time ratios they predict for the frozen-output cache levels of
`none`, `latents` (target latents + edit reference features cached)
and `prefix` (also the frozen LLM's prompt prefix: hidden states + per-layer K/V; the LLM
then runs only over the 256 query positions).

    .venv/bin/python benchmarks/gen_flops.py                    # 1b, per-GPU batch 32, T2I + edit
    .venv/bin/python benchmarks/gen_flops.py --flavor tiny --batch 4 --json

The counter is the library's (unilip_ds/flops.py: what every training run counts at its
start for its MFU); this script adds the per-component table, the whole-step cross-check,
the cache-level predictions and the optimizer row.

How it counts: torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention;
forward and backward) around each of the model's own methods, called as GenModel.forward
calls them, on the META device by default: the model is built from its config with no
memory and no weights (the counts depend on shapes only), the real 1B shapes at the real
per-GPU batch run in seconds. (On CPU, FlopCounterMode misses attention entirely: the CPU
SDPA kernel `_scaled_dot_product_flash_attention_for_cpu` has no FLOP formula; on meta SDPA
takes the math path, whose matmuls are counted, the same 4*B*H*L*S*D forward / 2x backward
that the CUDA flash/efficient formulas give. `--device cpu` exists for cross-checks.)

Components (per step; the table divides by the batch):
  target_enc  model.target_latent(image): UniLIP encoder at 448 (vision tower + mlp1 + adapter), no_grad
  ref_enc     model.image_features(ref_image) (edit only): vision tower + mlp1, no graph
  llm_prefix  model.prefix(prompts, feats): the frozen LLM over the prompt, no_grad
  llm_query   model.llm_hidden(state): the LLM over the 256 queries attending to the prefix
              K/V; forward + backward (input gradients only: the LLM is frozen, the gradient
              flows through it to the queries) + the checkpointed recompute
  connector   model.connector(hidden, mask, pos): 6 bidirectional layers + norm + projector;
              forward + backward (weights and inputs) + recompute
  dit         model.velocity(...) and the loss: SANA forward + backward + recompute
  optimizer   AdamW over the trainable parameters: element-wise only, FlopCounterMode counts
              0; the table shows an analytic ~16 FLOPs/parameter/step, negligible (but
              memory-bound, see below)
The backward of each trainable component is counted in its own counter by cutting the graph
at the component boundaries (detach + requires_grad, then backward of each piece with the
gradient of the next): the same ops as one backward. The script checks that the component
sum equals a whole-step count, model(prompts, image=..., ref_image=...)["loss"].mean()
.backward(), in one counter.

Prediction: step time proportional to counted FLOPs, so the speed-up of a level over
`none` = FLOPs(none) / FLOPs(level) with the cached components removed. That assumes every
component runs at the same MFU, which is not quite so: element-wise / norm / RoPE / softmax
work is not counted at all (memory-bound; relatively most of it in the DiT's linear attention
and the small-width LLM), the query pass is 256-token GEMMs at width 896 (lower MFU than the
1025-token ViT), and with `prefix` the step also has to bring the cached K/V + hidden states
in (12 KiB + 1.75 KiB per token at 1B, ~1.6 MiB a T2I sample, ~5.5 MiB an edit
sample: host->device copy and data loading, memory/I/O-bound, not FLOPs), and the optimizer
step and gradient all-reduce (memory / network-bound, per step not per sample) do not shrink
with the cache; so the measured ratios should come out somewhat below the FLOP prediction.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unilip_ds.flops import (ADAMW_FLOPS_PER_PARAM, GEN_COMPONENTS, conv_backward_flop,  # noqa: E402,F401
                             flop_counter, gen_batch, gen_component_flops)

COMPONENTS = GEN_COMPONENTS + ("optimizer",)
# cached components per level
LEVELS = {"none": (), "latents": ("target_enc", "ref_enc"), "prefix": ("target_enc", "ref_enc", "llm_prefix")}
TARGETS = {"t2i": 1.4, "edit": 1.8}  # the goal: prefix at least this much faster than none at 1B
NOTES = """notes:
- assumption: step time proportional to the FLOPs FlopCounterMode counts (matmul, conv,
  attention), i.e. every component at the same MFU. Not counted (memory-bound): element-wise,
  norms, RoPE, softmax, the loss, the AdamW step (optimizer row: analytic 16 FLOPs/param,
  per step / batch; it reads/writes ~16+ B/param of fp32 state each step, does not shrink
  with the cache) and the gradient all-reduce.
- memory/IO-bound rather than FLOP-bound: reading the cache (rows above; with `prefix` the
  per-layer K/V of the prompt: host->device copy + data loading), the query pass's attention
  over the prefix K/V (256 queries x 2 KV heads: small GEMMs, the K/V read dominates), the
  DiT's linear attention and depthwise 3x3 convs, the small-width (896) LLM GEMMs.
- gradient checkpointing {ckpt} (the gen presets: on, as the reference). It adds a recompute
  of the trainable parts' forward (torch's early stop skips the ops whose outputs backward
  does not need), which shrinks the frozen share: --no-grad-checkpointing for the other case.
- conv backward FLOPs: torch's formula ignores groups for the weight gradient; counted here
  with it divided by groups (see conv_backward_flop)."""
def build(flavor: str, device: str, attn: str = "sdpa", grad_checkpointing: Optional[bool] = None):
    import torch

    from unilip_ds.config import load_config
    from unilip_ds.models.flavors import get_flavor
    from unilip_ds.models.gen_loading import build_gen_model
    fl = get_flavor(flavor)
    over = [f"model.flavor={flavor}", f"model.attn_impl={attn}", f"data.resolution={fl.gen_resolution}",
            "data.train.sources=[]", "data.train.urls=[/none]"]
    if grad_checkpointing is not None:
        over.append(f"model.grad_checkpointing={str(grad_checkpointing).lower()}")
    cfg = load_config("gen_stage2", over)
    torch.manual_seed(0)
    with torch.device(device):
        model = build_gen_model(cfg, fl.unilip_latent_scale)
    model.train()
    return model, cfg


def make_batch(model, task: str, batch: int, prompt_tokens: int, device: str):
    return gen_batch(model, task, batch, prompt_tokens, device)


def component_flops(model, prompts, images, ref) -> Dict[str, Dict[str, int]]:
    """{component: {"fwd": flops, "bwd": flops}} of one training step (unilip_ds.flops.
    gen_component_flops: the backward cut at the component boundaries) + the optimizer row."""
    out = gen_component_flops(model, prompts, images, ref)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out["optimizer"] = {"fwd": ADAMW_FLOPS_PER_PARAM * n, "bwd": 0}  # analytic; FlopCounterMode counts 0
    return out


def whole_step_flops(model, prompts, images, ref) -> int:
    counter = flop_counter()
    with counter:
        model(prompts, image=images, ref_image=ref)["loss"].mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def optimizer_counted_flops(model) -> int:
    """What FlopCounterMode sees of an AdamW step (0: no matmuls) -- shown to back the claim."""
    import torch
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=False)
    counter = flop_counter()
    with counter:
        opt.step()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def cache_bytes(model, task: str, prompts) -> Dict[str, float]:
    """Bytes per sample (bf16, real tokens only) that a cache level adds to the step's input:
    what has to be read and copied to the device instead of computed."""
    t = model.llm.config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    tokens = sum(prompts.lengths) / len(prompts.lengths)
    grid = model.transformer.config.sample_size ** 2  # latent grid = the UniLIP feature grid (16 x 16)
    latent = model.transformer.config.in_channels * grid * 2
    ref = grid * t.hidden_size * 2 if task == "edit" else 0
    per_token = t.num_hidden_layers * 2 * t.num_key_value_heads * head_dim * 2 + t.hidden_size * 2
    return {"latents": latent + ref, "prefix": latent + ref + tokens * per_token}


def predict(per_comp: Dict[str, float]) -> Dict[str, float]:
    total = sum(per_comp.values())
    return {lvl: total / (total - sum(per_comp[c] for c in cached)) for lvl, cached in LEVELS.items()}


def measure(flavor: str = "1b", batch: int = 32, prompt_tokens: int = 120, tasks=("t2i", "edit"),
            device: str = "meta", grad_checkpointing: Optional[bool] = None, check: bool = True) -> dict:
    """Per task: per-component FLOPs (per sample and per step), the whole-step count, and the
    predicted speed-up of each cache level over `none`."""
    model, cfg = build(flavor, device, grad_checkpointing=grad_checkpointing)
    result = {"flavor": flavor, "batch": batch, "prompt_tokens": prompt_tokens, "device": device,
              "grad_checkpointing": bool(cfg.model.grad_checkpointing),
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "tasks": {}}
    if check:
        result["optimizer_counted_flops"] = optimizer_counted_flops(model)
    for task in tasks:
        prompts, images, ref = make_batch(model, task, batch, prompt_tokens, device)
        comp = component_flops(model, prompts, images, ref)
        per_step = {c: v["fwd"] + v["bwd"] for c, v in comp.items()}
        entry = {"prefix_len": int(prompts.input_ids.shape[1]),
                 "cache_bytes_per_sample": cache_bytes(model, task, prompts),
                 "gflops_per_sample": {c: per_step[c] / batch / 1e9 for c in COMPONENTS},
                 "gflops_per_sample_fwd_bwd": {c: {k: v / batch / 1e9 for k, v in comp[c].items()}
                                               for c in COMPONENTS},
                 "gflops_per_step": sum(per_step.values()) / 1e9,
                 "predicted_speedup": predict(per_step)}
        if check:
            whole = whole_step_flops(model, prompts, images, ref)
            counted = sum(v for c, v in per_step.items() if c != "optimizer")
            entry["whole_step_gflops"] = whole / 1e9
            entry["component_sum_gflops"] = counted / 1e9
            entry["sum_vs_whole"] = counted / whole if whole else float("nan")
        result["tasks"][task] = entry
    return result


def table(res: dict) -> str:
    tasks = list(res["tasks"])
    d = 1 if max(e["gflops_per_step"] for e in res["tasks"].values()) / res["batch"] >= 100 else 4
    lines = [f"flavor {res['flavor']}, per-GPU batch {res['batch']}, T2I prompt {res['prompt_tokens']} tokens "
             f"(edit: + image tokens + 2), grad checkpointing {res['grad_checkpointing']}, "
             f"counted on {res['device']}",
             "GFLOPs per sample per training step (fwd + bwd; fwd/bwd in brackets)",
             f"{'component':<12}" + "".join(f"{t:>28}" for t in tasks)]
    for c in COMPONENTS:
        row = f"{c:<12}"
        for t in tasks:
            e = res["tasks"][t]
            fb = e["gflops_per_sample_fwd_bwd"][c]
            row += f"{e['gflops_per_sample'][c]:>12.{d}f} ({fb['fwd']:>6.{d}f} / {fb['bwd']:>6.{d}f})"
        lines.append(row)
    lines.append(f"{'total':<12}" + "".join(f"{res['tasks'][t]['gflops_per_step'] / res['batch']:>12.{d}f}"
                                            + " " * 16 for t in tasks))
    if "whole_step_gflops" in res["tasks"][tasks[0]]:
        lines.append(f"{'sum/whole':<12}" + "".join(f"{res['tasks'][t]['sum_vs_whole']:>12.4f}" + " " * 16
                                                   for t in tasks) + "  (component sum / one whole-step count)")
        lines.append(f"prefix length: " + ", ".join(f"{t} {res['tasks'][t]['prefix_len']}" for t in tasks))
    lines.append("predicted step-time speed-up over `none` (time proportional to counted FLOPs)")
    for lvl in LEVELS:
        lines.append(f"{lvl:<12}" + "".join(f"{res['tasks'][t]['predicted_speedup'][lvl]:>11.2f}x" + " " * 16
                                           for t in tasks))
    lines.append("cache bytes read per sample instead of computed (bf16, real tokens)")
    for lvl in ("latents", "prefix"):
        lines.append(f"{lvl:<12}" + "".join(f"{res['tasks'][t]['cache_bytes_per_sample'][lvl] / 2 ** 10:>9.0f}KiB"
                                           + " " * 16 for t in tasks))
    targets = [f"{t} {res['tasks'][t]['predicted_speedup']['prefix']:.2f}x vs >= {TARGETS[t]}x"
               for t in tasks if t in TARGETS]
    lines += [f"target (meaningful at 1b proportions), prefix over none: " + "; ".join(targets),
              NOTES.format(ckpt="on" if res["grad_checkpointing"] else "off")]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", default="1b")
    ap.add_argument("--batch", type=int, default=32, help="per-GPU batch")
    ap.add_argument("--prompt-tokens", type=int, default=120,
                    help="T2I prompt prefix length incl. the template (edit adds the image tokens + 2)")
    ap.add_argument("--tasks", default="t2i,edit")
    ap.add_argument("--device", default="meta", help="meta (default) or cpu (misses SDPA attention FLOPs)")
    ap.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_const", const=False,
                    default=None, help="default: the gen_stage2 preset's (on)")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the whole-step count")
    ap.add_argument("--json", action="store_true", help="print the result as JSON after the table")
    args = ap.parse_args()
    res = measure(args.flavor, args.batch, args.prompt_tokens, tuple(args.tasks.split(",")), args.device,
                  args.grad_checkpointing, args.check)
    print(table(res))
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
