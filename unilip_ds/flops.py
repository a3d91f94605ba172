"""FLOPs of one training step per sample, counted once at the start of a run (MFU in every
logged step, tracking.HardwareMeter) and by benchmarks/gen_flops.py. From the command line,
a stage's count and the time its steps would take at an assumed MFU (an estimate):

    python -m unilip_ds.flops --config gen_stage2 [--gpus 16] [--mfu 0.4] [--peak-tflops 989] [--edit-share 0.33]

How: torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention; forward and
backward) around the model's own methods, on the META device: the model is built from the
run's config with no memory and no weights (the counts depend on shapes only), so the real
1B shapes cost seconds. What is counted is what executes: trained parts forward + backward,
frozen parts forward only (no_grad / no graph; a frozen part that the gradient flows THROUGH,
e.g. the LLM's query pass, gets its input-gradient backward), and activation checkpointing's
recompute (it runs in the backward). Not counted (memory-bound): element-wise ops, norms,
RoPE, softmax, the losses' element-wise maths, the optimizer (AdamW: ~16 FLOPs / parameter /
step, shown apart) and the gradient all-reduce.

Two corrections to torch's counter: the weight-gradient FLOPs of a grouped / depthwise conv
are divided by `groups` (torch 2.13 ignores groups there: SANA's 3x3 depthwise convs over
5760 channels would add ~4.3 TFLOPs/sample of phantom work at 1B), and attention is counted
on meta, where SDPA takes the math path whose matmuls are counted (on CPU the fused kernel
has no FLOP formula and attention would be missed entirely).

gen: per task (t2i, edit) of the run's data, for a nominal prompt (NOMINAL_PROMPT_TOKENS
incl. the chat template; edit adds the reference image's tokens); components as in
benchmarks/gen_flops.py (target_enc, ref_enc, llm_prefix, llm_query, connector, dit).
recon: one generator-side step (UniLIP encode / decode + the frozen loss networks), plus the
discriminator's step when recon.gan_start_step >= 0 (counted as if the GAN were active).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

log = logging.getLogger("unilip_ds")

GEN_COMPONENTS = ("target_enc", "ref_enc", "llm_prefix", "llm_query", "connector", "dit")
# the metrics the gen task logs (share of samples whose frozen outputs came from a cache) ->
# the components such samples did not compute
CACHE_COMPONENTS = {"data/cached_latents": ("target_enc", "ref_enc"), "data/cached_prefix": ("llm_prefix",)}
NOMINAL_PROMPT_TOKENS = 120  # T2I prompt prefix incl. the template (a typical long caption)
ADAMW_FLOPS_PER_PARAM = 16  # m, v updates, bias corrections, sqrt, divide, weight decay, step


def conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                       _output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """torch's aten.convolution_backward formula with the weight-gradient term divided by
    `groups` (torch's own, 2.13, ignores groups there: a depthwise conv's weight gradient is
    overcounted by the channel count)."""
    from torch.utils.flop_counter import conv_flop_count, get_shape

    def t(shape):
        return [shape[1], shape[0]] + list(shape[2:])
    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, get_shape(out_shape[0]), not transposed)
    if output_mask[1]:
        gw = get_shape(out_shape[1])
        if transposed:
            flops += conv_flop_count(t(grad_out_shape), t(x_shape), t(gw), transposed=False) // groups
        else:
            flops += conv_flop_count(t(x_shape), t(grad_out_shape), t(gw), transposed=False) // groups
    return flops


def flop_counter():
    """FlopCounterMode with the grouped-conv backward correction."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop})


@dataclass
class StageFlops:
    """FLOPs per sample of one training step, per data task ("t2i", "edit", "recon")."""
    per_sample: Dict[str, float]
    tokens: Dict[str, int]  # tokens per sample (see tracking.HardwareMeter)
    components: Dict[str, Dict[str, float]] = field(default_factory=dict)  # per task, per sample
    trainable_params: int = 0
    note: str = ""

    def for_window(self, task_counts: Dict[str, int], cached: Optional[Dict[str, float]] = None) -> Tuple[float, float]:
        """(FLOPs, tokens) per sample averaged over the micro-batches of a logging window
        ({task: micro-batches}); samples whose frozen outputs came from a cache (`cached`:
        the task's data/cached_* shares) do not count the components they skipped."""
        if not task_counts:
            task_counts = {t: 1 for t in self.per_sample}
        n = sum(task_counts.values())
        mean = sum(self.per_sample.values()) / len(self.per_sample)
        flops = tokens = 0.0
        for task, k in task_counts.items():
            f = self.per_sample.get(task, mean)
            comp = self.components.get(task, {})
            for key, parts in CACHE_COMPONENTS.items():
                f -= (cached or {}).get(key, 0.0) * sum(comp.get(p, 0.0) for p in parts)
            flops += k * f
            tokens += k * self.tokens.get(task, 0)
        return flops / n, tokens / n

    def lines(self) -> list:
        out = []
        for task, f in self.per_sample.items():
            comp = self.components.get(task)
            detail = (" (" + ", ".join(f"{c} {v / 1e9:.4g}" for c, v in comp.items() if v) + ")") if comp else ""
            out.append(f"FLOPs per sample, {task}: {f / 1e9:.4g} GFLOPs{detail}, {self.tokens.get(task, 0)} tokens")
        if self.note:
            out.append(self.note)
        return out


# -- gen ------------------------------------------------------------------------------------
def fake_prompts(task: str, batch: int, text: int, image_tokens: int, vocab: int, image_token_id: int,
                 vary: bool = True):
    """PromptBatch of `text` tokens (T2I; edit: + the image tokens + 2), right-padded; with
    `vary`, sample i is i % 7 tokens shorter (a padded batch)."""
    import torch

    from unilip_ds.models.prompts import PromptBatch
    g = torch.Generator().manual_seed(0)
    lengths = [text + (image_tokens + 2 if task == "edit" else 0) - ((i % 7) if vary else 0) for i in range(batch)]
    width = max(lengths)
    ids = torch.randint(0, min(vocab, 150000), (batch, width), generator=g)
    mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    image_mask = torch.zeros_like(mask)
    if task == "edit":
        image_mask[:, 10:10 + image_tokens] = True
        ids[image_mask] = min(image_token_id, vocab - 1)
    return PromptBatch(ids, mask, image_mask, lengths)


def build_gen_meta(cfg, device: str = "meta"):
    """The run's GenModel from its config, on `device` (meta: no memory, no weights), SDPA
    attention (the counter sees its math path; flash-attention does the same FLOPs)."""
    import torch

    from unilip_ds.models.gen_loading import build_gen_model
    cfg = copy.deepcopy(cfg)
    cfg.model.attn_impl = "sdpa"
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = build_gen_model(cfg, 1.0)
    return model.train()


def gen_batch(model, task: str, batch: int, prompt_tokens: int, device: str, vary: bool = True):
    """(prompts, images, reference images or None) shaped as a training micro-batch."""
    import torch
    res = model.resolution
    side = res // model.mllm.config.vision_config.patch_size[0] * model.mllm.config.downsample_ratio
    n_img = int(side) ** 2  # UniLIP tokens of the reference image (256 at 448 px)
    prompts = fake_prompts(task, batch, prompt_tokens, n_img, model.llm.config.vocab_size,
                           model.mllm.config.image_token_id, vary)
    image_mask = prompts.image_mask
    prompts = prompts.to(device)
    if device == "meta" and task == "t2i":
        # GenModel.prefix checks bool(image_mask.any()) for T2I (no reference features); a meta
        # tensor has no value, so the (all-False) image mask stays on the CPU
        prompts.image_mask = image_mask
    images = torch.rand(batch, 3, res, res, device=device)
    ref = torch.rand(batch, 3, res, res, device=device) if task == "edit" else None
    return prompts, images, ref


def gen_component_flops(model, prompts, images, ref) -> Dict[str, Dict[str, int]]:
    """{component: {"fwd": flops, "bwd": flops}} of one training step, the model's own methods
    called in GenModel.forward's order; the backward cut at the component boundaries (detach
    + requires_grad, then each piece's backward with the next one's input gradient: the same
    ops as one backward)."""
    import torch

    from unilip_ds.models.generator import NUM_TRAIN_TIMESTEPS, train_sigmas
    out: Dict[str, Dict[str, int]] = {c: {"fwd": 0, "bwd": 0} for c in GEN_COMPONENTS}

    @contextlib.contextmanager
    def counted(name: str, phase: str):
        counter = flop_counter()
        with counter:
            yield
        out[name][phase] += counter.get_total_flops()

    with counted("target_enc", "fwd"):
        x0 = model.target_latent(images).float()
    feats = None
    if ref is not None:
        with counted("ref_enc", "fwd"):  # GenModel.forward calls it outside no_grad; nothing requires grad
            feats = model.image_features(ref)
    with counted("llm_prefix", "fwd"):
        state = model.prefix(prompts, feats)
    with counted("llm_query", "fwd"):
        hidden, mask, pos = model.llm_hidden(state)
    hidden_in = hidden.detach().requires_grad_(True)
    with counted("connector", "fwd"):
        enc = model.connector(hidden_in, mask, pos)
    enc_in = enc.detach().requires_grad_(True)
    b = x0.shape[0]
    sigma = train_sigmas(torch.sigmoid(torch.randn(b)), 1.0).to(x0.device)
    noise = torch.randn_like(x0)
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    with counted("dit", "fwd"):
        pred = model.velocity(x_t, sigma * NUM_TRAIN_TIMESTEPS, enc_in, mask)
        loss = (pred.float() - (noise - x0)).pow(2).flatten(1).mean(1).mean()
    with counted("dit", "bwd"):
        loss.backward()
    with counted("connector", "bwd"):
        enc.backward(enc_in.grad)
    with counted("llm_query", "bwd"):
        hidden.backward(hidden_in.grad)
    model.zero_grad(set_to_none=True)
    return out


def gen_tasks(cfg) -> Tuple[str, ...]:
    """The data tasks of the run's training data (t2i and / or edit)."""
    tasks = [s.get("task") if isinstance(s, dict) else getattr(s, "task", None) for s in cfg.data.train.sources or []]
    tasks = [t for t in tasks if t in ("t2i", "edit")] or [cfg.data.train.task]
    return tuple(t for t in ("t2i", "edit") if t in tasks) or ("t2i",)


def gen_stage_flops(cfg, prompt_tokens: int = NOMINAL_PROMPT_TOKENS) -> StageFlops:
    model = build_gen_meta(cfg)
    per_sample, tokens, components = {}, {}, {}
    for task in gen_tasks(cfg):
        prompts, images, ref = gen_batch(model, task, 1, prompt_tokens, "meta", vary=False)
        comp = gen_component_flops(model, prompts, images, ref)
        components[task] = {c: float(v["fwd"] + v["bwd"]) for c, v in comp.items()}
        per_sample[task] = sum(components[task].values())
        tokens[task] = int(prompts.lengths[0]) + model.connector.config.num_queries
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return StageFlops(per_sample, tokens, components, n,
                      note=f"(gen: nominal {prompt_tokens}-token T2I prompt; tokens = prompt + queries; "
                           f"AdamW ~{ADAMW_FLOPS_PER_PARAM * n / 1e9:.3g} GFLOPs per step, not counted)")


# -- recon ----------------------------------------------------------------------------------
def recon_stage_flops(cfg, batch: int = 1) -> StageFlops:
    """One recon training step per sample: the generator-side loss (+ the discriminator's step
    when the run has a GAN phase), forward + backward, on meta."""
    import torch

    from unilip_ds.tasks.base import MAIN, build_task
    task = build_task(cfg)
    res = cfg.data.resolution
    total = 0
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        torch.manual_seed(0)
        task._load_frozen = lambda nets: None  # shapes only: no weight files read
        modules = task.build_modules()
        for m in modules.values():
            m.train()
        step = max(0, cfg.recon.gan_start_step)
        images = torch.rand(batch, 3, res, res)
        for phase in task.phases(step):
            counter = flop_counter()
            with counter:
                loss, _ = task.loss(phase, {"image": images, "__key__": ["x"] * batch}, step, modules)
                loss.backward()
            total += counter.get_total_flops()
    model = modules[MAIN]
    n = sum(p.numel() for m in modules.values() for p in m.parameters() if p.requires_grad)
    v = model.flavor.vision
    tokens = (res // v["patch_size"]) ** 2
    return StageFlops({"recon": total / batch}, {"recon": tokens}, {}, n,
                      note=f"(recon: tokens = ViT patches at {res} px; AdamW "
                           f"~{ADAMW_FLOPS_PER_PARAM * n / 1e9:.3g} GFLOPs per step, not counted)")


def stage_flops(cfg) -> StageFlops:
    """The run's FLOPs per sample (gen or recon), on the meta device; the global RNG streams
    are left as they were (a run's draws do not depend on whether it counted)."""
    import torch
    counters = {"gen": gen_stage_flops, "recon": recon_stage_flops}
    if cfg.run.task not in counters:
        raise ValueError(f"no FLOP counter for task '{cfg.run.task}'")
    with torch.random.fork_rng(devices=[]):
        return counters[cfg.run.task](cfg)


# -- command line: FLOPs per sample and a compute-time estimate for a stage ------------------
TEMPLATE_GPUS = {"recon": 8, "gen": 16}  # the slurm templates' default allocations


def estimate_seconds(flops_per_sample: float, samples: float, gpus: int, peak_tflops: float, mfu: float) -> float:
    """Seconds to compute `samples` training samples on `gpus` devices running at `mfu` of
    `peak_tflops`: an estimate (compute only), not a measurement."""
    return flops_per_sample * samples / (gpus * peak_tflops * 1e12 * mfu)


def main(argv=None) -> int:
    """python -m unilip_ds.flops --config STAGE [--gpus N] [--mfu 0.4] [--peak-tflops 989]
    [--edit-share S] [key=value ...]: the stage's FLOPs per training sample (the counter every
    run uses for its MFU, on the meta device: no weights, no data) and the time its
    train.max_steps x global batch would take at the assumed MFU."""
    import argparse
    import sys

    from unilip_ds.config import ConfigError, check_repeated, load_config
    ap = argparse.ArgumentParser(prog="python -m unilip_ds.flops", description=main.__doc__)
    ap.add_argument("--config", required=True, help="stage preset name or yaml path")
    ap.add_argument("--gpus", type=int, default=None,
                    help="devices (default: the slurm template's, 8 for recon, 16 for gen)")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (0.4)")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="dense peak per device (989: H100 SXM bf16, as tracking.PEAK_TFLOPS)")
    ap.add_argument("--edit-share", type=float, default=None,
                    help="gen with T2I and edit data: the edit share of the samples, for a mixed estimate")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = ap.parse_intermixed_args(argv)
    logging.disable(logging.WARNING)  # transformers / diffusers chatter on the meta build
    try:
        check_repeated(args.overrides)
        probe = load_config(args.config, args.overrides, world_size=1)
        gpus = args.gpus or TEMPLATE_GPUS.get(probe.run.task, 8)
        cfg = load_config(args.config, args.overrides, world_size=gpus)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    f = stage_flops(cfg)
    batch = cfg.train.micro_batch_size * cfg.train.grad_accum * gpus
    samples = cfg.train.max_steps * batch
    print(f"{cfg.run.name} (flavor {cfg.model.flavor}): {cfg.train.max_steps} steps x global batch {batch} "
          f"({gpus} devices x micro-batch {cfg.train.micro_batch_size} x accumulation {cfg.train.grad_accum}) "
          f"= {samples / 1e6:.4g} M samples")
    for line in f.lines():
        print(line)
    what = (f"estimate on {gpus} devices at {args.peak_tflops:g} TFLOPS peak x MFU {args.mfu:g} "
            "(assumed, not measured; compute only)")
    per_task = dict(f.per_sample)
    if args.edit_share is not None and {"t2i", "edit"} <= set(per_task):
        s = args.edit_share
        per_task[f"mix ({100 * s:.0f}% edit)"] = (1 - s) * per_task["t2i"] + s * per_task["edit"]
    for task, fl in per_task.items():
        sec = estimate_seconds(fl, samples, gpus, args.peak_tflops, args.mfu)
        print(f"{what}, {task}: {sec / 3600:.3g} h ({fl * samples:.3g} FLOPs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
