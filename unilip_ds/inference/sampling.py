"""Sampling from a GenModel: DPM-Solver multistep with flow sigmas and batched CFG.

Used by UniLIPPipeline and by the sample grids written during training, so both produce
the same images for the same weights, prompts and seeds.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Generators = Optional[Union[torch.Generator, List[torch.Generator]]]


def make_scheduler(flow_shift: float):
    """SANA's sampling scheduler (its scheduler/scheduler_config.json), with the flow shift
    an explicit setting (gen.flow_shift_sample; the reference's is 3.0)."""
    from diffusers import DPMSolverMultistepScheduler
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift,
        final_sigmas_type="zero", lower_order_final=True, timestep_spacing="linspace")


def _pad_to(x: torch.Tensor, length: int, value=0) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, length - x.shape[1]) if x.ndim == 3 else (0, length - x.shape[1]), value=value)


@torch.no_grad()
def sample(model, builder, task: str, texts: Sequence[Optional[str]], ref_images: Optional[torch.Tensor] = None,
           steps: int = 20, guidance: float = 4.5, flow_shift: float = 3.0, generator: Generators = None,
           num_images_per_prompt: int = 1, scheduler=None) -> torch.Tensor:
    """Images in [0, 1] (B x num_images_per_prompt, 3, R, R), prompt-major order. Unconditional
    rows use the null prompt (edit: it keeps the image); [uncond, cond] run in one forward."""
    return model.decode(sample_latents(model, builder, task, texts, ref_images, steps, guidance, flow_shift,
                                       generator, num_images_per_prompt, scheduler))


@torch.no_grad()
def sample_latents(model, builder, task: str, texts: Sequence[Optional[str]],
                   ref_images: Optional[torch.Tensor] = None, steps: int = 20, guidance: float = 4.5,
                   flow_shift: float = 3.0, generator: Generators = None, num_images_per_prompt: int = 1,
                   scheduler=None, ref_features: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`sample` before decoding: the scaled latents. `ref_features` replaces the reference
    images' features (e.g. zeros, to see what the model makes without the image)."""
    device = model.connector.projector.weight.device
    b = len(texts)
    feats = ref_features if ref_features is not None else (
        model.image_features(ref_images.to(device)) if ref_images is not None else None)
    enc, mask = model.condition(model.prefix(builder(task, list(texts)).to(device), feats))
    if guidance != 1.0:
        enc_u, mask_u = model.condition(model.prefix(builder(task, [None] * b).to(device), feats))
        t = max(enc.shape[1], enc_u.shape[1])
        enc = torch.cat([_pad_to(enc_u, t), _pad_to(enc, t)])
        mask = torch.cat([_pad_to(mask_u, t, False), _pad_to(mask, t, False)])
    n = num_images_per_prompt
    enc, mask = enc.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    side = model.resolution // (32 if model.target == "dcae" else 28)
    shape = (b * n, model.transformer.config.in_channels, side, side)
    return denoise(model.velocity, enc, mask, shape, steps=steps, guidance=guidance,
                   scheduler=scheduler or make_scheduler(flow_shift), generator=generator)


@torch.no_grad()
def denoise(velocity, enc: torch.Tensor, mask: torch.Tensor, shape, steps: int, guidance: float, scheduler,
            generator: Generators = None) -> torch.Tensor:
    """The sampling loop on a given condition: `enc` / `mask` hold [uncond; cond] rows when
    guidance != 1 (else cond only); fp32 latents of `shape` from `generator`, then `steps`
    scheduler steps of `velocity(x, t, enc, mask)` with CFG v_u + g (v_c - v_u)."""
    from diffusers.utils.torch_utils import randn_tensor
    latents = randn_tensor(tuple(shape), generator=generator, device=enc.device, dtype=torch.float32)
    scheduler.set_timesteps(steps, device=enc.device)
    for t in scheduler.timesteps:
        x = torch.cat([latents, latents]) if guidance != 1.0 else latents
        v = velocity(x, t.expand(x.shape[0]), enc, mask).float()
        if guidance != 1.0:
            v_u, v_c = v.chunk(2)
            v = v_u + guidance * (v_c - v_u)
        latents = scheduler.step(v, t, latents, generator=generator).prev_sample
    return latents


def to_pil(images: torch.Tensor) -> List[Image.Image]:
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().float().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


LABEL_H = 14  # height in pixels of a text band of `grid` (PIL's default font, ~12 px)
EDIT_COLUMNS = ("input", "edited", "target")  # the one column order of every edit grid


def fit_text(text: str, width: float, font) -> str:
    """`text` on one line, cut with '...' to fit `width` pixels in `font`."""
    text = " ".join(str(text).split())
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text.rstrip() + "..." if text else ""


def grid(rows: List[List[Image.Image]], columns: Optional[Sequence[str]] = None,
         labels: Optional[Sequence[str]] = None) -> Image.Image:
    """Images pasted row by row, each resized to the first one's size. `columns`: a header band
    naming the columns (e.g. EDIT_COLUMNS); `labels`: one text band above each row (e.g. its
    caption or instruction). Text in PIL's default font, cut to fit; bands are LABEL_H high."""
    from PIL import ImageDraw, ImageFont
    w, h = rows[0][0].size
    ncols = max(len(r) for r in rows)
    head, band = (LABEL_H if columns else 0), (LABEL_H if labels else 0)
    out = Image.new("RGB", (w * ncols, head + len(rows) * (band + h)), "white")
    draw, font = ImageDraw.Draw(out), ImageFont.load_default()
    if head:
        draw.rectangle((0, 0, out.width - 1, head - 1), fill=(225, 225, 225))  # the header band
    for j, name in enumerate(columns or []):
        text = fit_text(name, w - 4, font)
        draw.text((j * w + (w - font.getlength(text)) / 2, 1), text, fill="black", font=font)
    for i, row in enumerate(rows):
        y = head + i * (band + h)
        if labels:
            draw.text((2, y + 1), fit_text(labels[i], w * ncols - 4, font), fill="black", font=font)
        for j, im in enumerate(row):
            out.paste(im.resize((w, h)), (j * w, y + band))
    return out


def sample_grids(model, builder, cfg, eval_batches=None) -> Dict[str, Image.Image]:
    """The training-time grids: the fixed prompts (seed i for prompt i; each column headed by
    its prompt), and held-out edit pairs as rows [input | edited | target] (header band; each
    row labelled with its instruction). Same forwards on every rank (ZeRO-3)."""
    from unilip_ds.tasks.base import eval_mode
    g = cfg.gen
    with eval_mode(model):
        out = {}
        if g.sample_prompts:
            gens = [torch.Generator().manual_seed(i) for i in range(len(g.sample_prompts))]
            images = sample(model, builder, "t2i", g.sample_prompts, steps=g.sample_steps,
                            guidance=g.guidance_scale, flow_shift=g.flow_shift_sample, generator=gens)
            out["t2i"] = grid([to_pil(images)], columns=list(g.sample_prompts))
        edits = [b for b in (eval_batches or []) if b["__task__"] == "edit"][:1]
        if edits and g.sample_edits:
            b, k = edits[0], g.sample_edits
            gens = [torch.Generator().manual_seed(i) for i in range(min(k, len(b["__key__"])))]
            edited = sample(model, builder, "edit", b["instruction"][:k], b["input_image"][:k],
                            steps=g.sample_steps, guidance=g.guidance_scale,
                            flow_shift=g.flow_shift_sample, generator=gens)
            cols = [to_pil(b["input_image"][:k].float()), to_pil(edited), to_pil(b["image"][:k].float())]
            out["edit"] = grid([list(r) for r in zip(*cols)], columns=EDIT_COLUMNS,
                               labels=list(b["instruction"][:k]))
    return out
