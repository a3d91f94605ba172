"""Flash-attention against SDPA on the generator's condition path at a flavor's real shapes:
the same random-weight GenModel (gen_stage2 config, activation checkpointing as the
preset) run with `model.attn_impl=flash` (transformers' flash-attention 2 integration: unpad by
the 2-D mask, flash_attn_varlen_func) and with SDPA on a padded batch of mixed prompt lengths,
T2I and edit (edit: the vision tower runs on the backend too).

    .venv/bin/python benchmarks/flash_agree.py --flavor 1b --device cuda --batch 4
    .venv/bin/python benchmarks/flash_agree.py --flavor tiny --device cpu --dtype fp32 --flash-standin

Compared at real (unpadded) positions only: the frozen LLM's prefix pass (hidden states and
every layer's K/V), the reference image features (edit), the query pass's output and the
connector's output (hidden states); and the gradients of a fixed random projection of the
connector output w.r.t. the query pass's output, the learnable queries and every connector
weight (through the checkpointed recompute). Figures: max |flash - sdpa| and the relative L2
difference ||flash - sdpa|| / ||sdpa||, per group (hidden, grad) with the worst tensor named.

bf16 kernels differ from each other by rounding, so the verdict compares each backend with an
fp32 SDPA run of the same weights (a copy of the model): flash passes when, on every tensor, its
relative distance to fp32 is at most 3x SDPA's own + a floor (5e-3 bf16, 1e-4 fp32). A broken
mask or causal alignment moves the affected rows by O(1) (relative distances of 0.1 to 1),
far outside that. One JSON line per task,
exit status 1 when a task fails.
`--flash-standin` (CPU tests only): tests/flash_standin.py stands in for flash_attn.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_util  # noqa: E402

FLASH = "flash_attention_2"


def mixed_lengths(batch: int, text: int) -> List[int]:
    """Prompt text lengths spread from `text` down to ~text/4 (all different)."""
    lo = max(12, text // 4)
    return [text - (text - lo) * i // max(1, batch - 1) for i in range(batch)]


def prompts_for(task: str, lengths: List[int], n_img: int, vocab: int, image_token_id: int):
    """A right-padded PromptBatch of these text lengths (edit: + the image tokens + 2 at
    position 10, as unilip_ds.flops.fake_prompts lays them out)."""
    import torch

    from unilip_ds.models.prompts import PromptBatch
    g = torch.Generator().manual_seed(0)
    full = [n + (n_img + 2 if task == "edit" else 0) for n in lengths]
    width = max(full)
    ids = torch.randint(0, min(vocab, 150000), (len(full), width), generator=g)
    mask = torch.arange(width)[None] < torch.tensor(full)[:, None]
    image_mask = torch.zeros_like(mask)
    if task == "edit":
        image_mask[:, 10:10 + n_img] = True
        ids[image_mask] = min(image_token_id, vocab - 1)
    return PromptBatch(ids, mask, image_mask, full)


def set_impl(m, impl: str) -> None:
    m.mllm.config._attn_implementation = impl  # the LLM's and the vision tower's sub-configs
    m.connector.set_attn_implementation(impl)
    assert m.attn_impl == impl and m.mllm.config.vision_config._attn_implementation == impl


def condition_path(m, prompts, refs, weights) -> Dict[str, "torch.Tensor"]:
    """Everything the condition path computes at real positions + the gradients (fp32 copies)."""
    import torch
    out = {}
    m.zero_grad(set_to_none=True)
    with torch.no_grad():
        feats = m.image_features(refs) if refs is not None else None
        state = m.prefix(prompts, feats)
    mask = state.mask
    out["prefix.hidden"] = state.hidden[mask]
    for i, (k, v) in enumerate(state.kv):
        out[f"prefix.k{i}"], out[f"prefix.v{i}"] = k.transpose(1, 2)[mask], v.transpose(1, 2)[mask]
    if feats is not None:
        out["ref_features"] = feats
    hidden, full, pos = m.llm_hidden(state)
    hidden.retain_grad()
    enc = m.connector(hidden, full, pos)
    out["query.hidden"], out["connector.out"] = hidden[full], enc[full]
    (enc.float() * weights)[full].sum().backward()
    out["grad.query_hidden"] = hidden.grad[full]
    for n, p in m.named_parameters():
        if p.grad is not None:
            out[f"grad.{n}"] = p.grad
    out = {k: v.detach().float() for k, v in out.items()}
    m.zero_grad(set_to_none=True)
    return out


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare(flash, sdpa, ref32, floor: float) -> dict:
    groups = {"hidden": {}, "grad": {}}
    failures = []
    for key in flash:
        g = groups["grad" if key.startswith("grad.") else "hidden"]
        a, b, r = flash[key], sdpa[key], ref32[key]
        e_flash, e_sdpa = rel(a, r), rel(b, r)
        g[key] = {"max_abs": float((a - b).abs().max()), "rel_l2": rel(a, b), "flash_vs_fp32": e_flash,
                  "sdpa_vs_fp32": e_sdpa}
        if not e_flash <= 3 * e_sdpa + floor:
            failures.append(f"{key}: flash {e_flash:.3g} vs sdpa {e_sdpa:.3g} from fp32")
    out = {}
    for name, g in groups.items():
        worst = max(g, key=lambda k: g[k]["rel_l2"])
        out[name] = {"tensors": len(g), "max_abs": max(v["max_abs"] for v in g.values()),
                     "max_rel_l2": g[worst]["rel_l2"], "worst": worst,
                     "max_flash_vs_fp32": max(v["flash_vs_fp32"] for v in g.values()),
                     "max_sdpa_vs_fp32": max(v["sdpa_vs_fp32"] for v in g.values())}
    out["failures"] = failures[:10]
    out["n_failures"] = len(failures)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", default="1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=120, help="the longest T2I prompt; the others shorter")
    ap.add_argument("--tasks", default="t2i,edit")
    ap.add_argument("--flash-standin", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.flash_standin:
        bench_util.install_flash_standin()
    import torch

    from unilip_ds.config import load_config
    from unilip_ds.models.flavors import get_flavor
    from unilip_ds.models.gen_loading import build_gen_model
    fl = get_flavor(args.flavor)
    cfg = load_config("gen_stage2", [f"model.flavor={args.flavor}", "model.attn_impl=flash",
                                     f"data.resolution={fl.gen_resolution}", "data.train.sources=[]",
                                     "data.train.urls=[/none]", "model.grad_checkpointing=true"])
    device = torch.device(args.device)
    torch.manual_seed(0)
    with torch.device(device):
        m32 = build_gen_model(cfg, fl.unilip_latent_scale)
    m32.train()
    assert m32.attn_impl == FLASH, m32.attn_impl
    m = copy.deepcopy(m32).to(torch.bfloat16 if args.dtype == "bf16" else torch.float32).train()
    set_impl(m32, "sdpa")  # the fp32 reference
    res = m.resolution
    side = res // m.mllm.config.vision_config.patch_size[0] * m.mllm.config.downsample_ratio
    n_img = int(side) ** 2
    floor = 5e-3 if args.dtype == "bf16" else 1e-4
    lengths = mixed_lengths(args.batch, args.prompt_tokens)
    cmd = bench_util.command("benchmarks/flash_agree.py", sys.argv[1:])
    ok = True
    for task in args.tasks.split(","):
        prompts = prompts_for(task, lengths, n_img, m.llm.config.vocab_size,
                              m.mllm.config.image_token_id).to(device)
        g = torch.Generator().manual_seed(1)
        refs = torch.rand(args.batch, 3, res, res, generator=g).to(device) if task == "edit" else None
        width = prompts.input_ids.shape[1] + m.connector.config.num_queries
        weights = torch.randn(args.batch, width, m.connector.config.caption_channels, generator=g).to(device)
        set_impl(m, FLASH)
        flash = condition_path(m, prompts, refs, weights)
        set_impl(m, "sdpa")
        sdpa = condition_path(m, prompts, refs, weights)
        ref32 = condition_path(m32, prompts, refs, weights)
        res_task = compare(flash, sdpa, ref32, floor)
        passed = res_task["n_failures"] == 0
        ok &= passed
        print(json.dumps({"task": task, "flavor": args.flavor, "dtype": args.dtype, "device": args.device,
                          "batch": args.batch, "prompt_lengths": list(prompts.lengths),
                          "padded_width": int(prompts.input_ids.shape[1]), "pass": passed,
                          "tolerance": f"flash_vs_fp32 <= 3 x sdpa_vs_fp32 + {floor:g} per tensor",
                          **res_task, "command": cmd}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
