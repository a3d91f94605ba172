"""Does the generator's edit path learn (issue 21)? Figures, on CPU, for the tiny flavor.

  overfit  (in process) a handful of edit pairs ("flip the image horizontally") trained with
           GenModel's own flow loss until its samples reproduce the training targets. Printed:
           PSNR of the sampled latents against the target latents, of copying the input's
           latent (the copy baseline), and of the same model's samples with the reference
           image zeroed (what the model makes without the image); the decoded images too.
  heldout  (in process) generalisation: edits (or T2I) trained on `--count` synthetic shape
           scenes or photo variants, applied to held-out ones (another seed). Printed: the
           output's PSNR against the true target and against the input, the copy baseline,
           the latent ceiling, each also per instruction; whether the output follows the
           input's layout (the inputs mirrored: output vs the mirrored output and vs the
           unmirrored one); for T2I, the caption's samples against the caption dropped.
           `--edits identity`: "keep the image as it is" (can the layout be copied at all?).
           `--data mosaics`: flat colour cells aligned to the tiny flavor's 8 x 8 token grid
           (sample_images.mosaic_samples), where an image's mean says nothing about any one
           place: the clearest check that the layout is carried. `--mix-mosaic F`: that
           fraction of the training pairs are identity edits of mosaics (`--mosaic-grids`:
           cells per side). On shape scenes the random tiny UniLIP's latent is mostly a
           place-dependent part that does not mirror, so the mirror figures barely separate
           even for a perfect edit (the `_ceiling` figures); mosaics separate.
  export   a gen export (e.g. the demo's gen_stage2): held-out images edited, PSNR of the
           output against the true target and against the input, and the copy baseline
           (input vs target); T2I from held-out captions against the same seeds with the
           caption dropped (null prompt).

Latent PSNR is 10 log10(range^2 / MSE), range = max - min of the target latents (the same
for every figure of a table, so they compare). The latent scale matters: rectified flow
draws x_t = (1 - s) x0 + s eps with unit noise, so latents far below unit std carry almost
no signal (the tiny flavor's default 10.6 is the 1b UniLIP's factor; a random or
minutes-trained tiny UniLIP needs ~100); `--latent-scale auto` sets 1 / std of the target
latents, as the reference derived its factor for its UniLIP.

    .venv/bin/python benchmarks/edit_learns.py overfit [--pairs 4 --steps 600 --lr 2e-3]
    .venv/bin/python benchmarks/edit_learns.py heldout --edits colours --count 2000 --steps 1500 --lr 1e-3
    .venv/bin/python benchmarks/edit_learns.py heldout --data mosaics --edits identity --count 2000 --steps 2000 --lr 1e-3
    .venv/bin/python benchmarks/edit_learns.py export --ckpt demo_out/exports/gen_stage2 \\
        --edits demo_out/images/edit/heldout/edits.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLIP = "flip the image horizontally"


def to_tensor(images, size: int) -> torch.Tensor:
    """PIL images -> (B, 3, size, size) in [0, 1], squashed as the generator's data are."""
    from PIL import Image
    arr = [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
           for im in images]
    return torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).contiguous()


def flip_pairs(n: int, size: int):
    """The first n bundled photos and their mirror images: (inputs, targets)."""
    from PIL import ImageOps
    from unilip_ds.data.sample_images import PHOTOS, load_photo
    photos = [load_photo(name) for name, _ in PHOTOS[:n]]
    return to_tensor(photos, size), to_tensor([ImageOps.mirror(p) for p in photos], size)


def psnr(x: torch.Tensor, y: torch.Tensor, peak: float = 1.0) -> float:
    """Mean over the batch of per-sample PSNR."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(peak ** 2 / mse)).mean())


def latent_scale_for(model, images: torch.Tensor) -> float:
    """1 / std of the unscaled target latents of `images` (3 significant digits)."""
    with torch.no_grad():
        z = model.target_latent(images).float() / model.latent_scale
    s = 1.0 / float(z.std())
    return float(f"{s:.3g}")


def sample_latents(model, builder, task: str, texts: Sequence[Optional[str]], refs: Optional[torch.Tensor],
                   steps: int = 20, guidance: float = 1.0, flow_shift: float = 3.0, seed: int = 0,
                   ref_features: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sampled (scaled) latents, one per text, seed + i for row i; `ref_features` replaces
    the reference images' features (e.g. zeros)."""
    from unilip_ds.inference.sampling import sample_latents as project_sample_latents
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(texts))]
    return project_sample_latents(model, builder, task, texts, refs, steps=steps, guidance=guidance,
                                  flow_shift=flow_shift, generator=gens, ref_features=ref_features)


def fit(model, x0: torch.Tensor, state, steps: int, lr: float, log=None, batch: Optional[int] = None):
    """`steps` AdamW steps of GenModel's own flow loss on cached frozen outputs (target latents
    `x0`, prompt prefix `state`), full batch or random minibatches of `batch`; returns
    (losses, start time)."""
    from unilip_ds.models.generator import PrefixState
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    t0, losses, n = time.time(), [], x0.shape[0]
    for step in range(steps):
        st, x = state, x0
        if batch and batch < n:
            idx = torch.randperm(n)[:batch]
            st, x = PrefixState(state.hidden[idx], [(k[idx], v[idx]) for k, v in state.kv], state.mask[idx]), x0[idx]
        loss = model(None, target=x, prefix=st)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log and (step % 200 == 0 or step == steps - 1):
            log(f"  step {step + 1}/{steps} loss {np.mean(losses[-50:]):.4f} ({time.time() - t0:.0f}s)")
    model.eval()
    return losses, t0


@torch.no_grad()
def pool(model, builder, task: str, texts: Sequence[Optional[str]], targets: torch.Tensor,
         refs: Optional[torch.Tensor] = None, chunk: int = 64):
    """(target latents, prompt prefix) of a training pool, computed once in chunks (as a
    prefix cache would) and padded to one prompt length (left padding, as the builder's)."""
    from unilip_ds.models.generator import PrefixState
    n = targets.shape[0]
    x0 = torch.cat([model.target_latent(targets[i:i + chunk]).float() for i in range(0, n, chunk)])
    states = [model.prefix(builder(task, list(texts[i:i + chunk])),
                           None if refs is None else model.image_features(refs[i:i + chunk]))
              for i in range(0, n, chunk)]
    width = max(s_.mask.shape[1] for s_ in states)

    def cat(get, dim):
        parts = [get(s_) for s_ in states]
        return torch.cat([p if p.shape[dim] == width else
                          torch.cat([p.new_zeros(*p.shape[:dim], width - p.shape[dim], *p.shape[dim + 1:]), p], dim)
                          for p in parts])
    kv = [(cat(lambda s_: s_.kv[l][0], 2), cat(lambda s_: s_.kv[l][1], 2)) for l in range(len(states[0].kv))]
    return x0, PrefixState(cat(lambda s_: s_.hidden, 1), kv, cat(lambda s_: s_.mask, 1))


def overfit(task, model, inputs: torch.Tensor, targets: torch.Tensor, steps: int, lr: float,
            instruction: str = FLIP, seed: int = 0, sample_steps: int = 20, log=None) -> Dict[str, float]:
    """Train `model` (a GenModel whose trainable parts are the connector and the DiT) on the
    pairs with its own flow loss (full batch, AdamW, no CFG dropout), then sample the
    training inputs. The frozen outputs (reference features, target latents, the prompt
    prefix) are computed once, as a prefix cache would; the loss is GenModel.forward's."""
    builder = task.prompts()
    n = inputs.shape[0]
    prompts = builder("edit", [instruction] * n)
    torch.manual_seed(seed)
    with torch.no_grad():
        x0 = model.target_latent(targets).float()
        x_in = model.target_latent(inputs).float()
        state = model.prefix(prompts, model.image_features(inputs))
    losses, t0 = fit(model, x0, state, steps, lr, log)
    texts = [instruction] * n
    z = sample_latents(model, builder, "edit", texts, inputs, steps=sample_steps, seed=seed)
    feats = model.image_features(inputs)
    z0 = sample_latents(model, builder, "edit", texts, None, steps=sample_steps, seed=seed,
                        ref_features=torch.zeros_like(feats))
    peak = float(x0.max() - x0.min())
    dec_t, dec_s, dec_0, dec_i = (model.decode(v) for v in (x0, z, z0, x_in))
    return {"latent_psnr_sample": psnr(z, x0, peak), "latent_psnr_copy": psnr(x_in, x0, peak),
            "latent_psnr_zeroed": psnr(z0, x0, peak), "latent_psnr_sample_vs_input": psnr(z, x_in, peak),
            "image_psnr_sample": psnr(dec_s, dec_t), "image_psnr_copy": psnr(dec_i, dec_t),
            "image_psnr_zeroed": psnr(dec_0, dec_t), "loss_first": float(np.mean(losses[:10])),
            "loss_last": float(np.mean(losses[-10:])), "train_s": time.time() - t0,
            "latent_scale": float(model.latent_scale)}


def overfit_t2i(task, model, captions: Sequence[str], targets: torch.Tensor, steps: int, lr: float,
                seed: int = 0, sample_steps: int = 20, log=None) -> Dict[str, float]:
    """The T2I counterpart: caption i -> image i, trained as `overfit`; its samples against
    the same model's with the caption dropped (the null prompt, same seeds)."""
    builder = task.prompts()
    torch.manual_seed(seed)
    with torch.no_grad():
        x0 = model.target_latent(targets).float()
        state = model.prefix(builder("t2i", list(captions)))
    losses, t0 = fit(model, x0, state, steps, lr, log)
    z = sample_latents(model, builder, "t2i", list(captions), None, steps=sample_steps, seed=seed)
    z0 = sample_latents(model, builder, "t2i", [None] * len(captions), None, steps=sample_steps, seed=seed)
    peak = float(x0.max() - x0.min())
    return {"latent_psnr_caption": psnr(z, x0, peak), "latent_psnr_dropped": psnr(z0, x0, peak),
            "latent_psnr_caption_vs_dropped": psnr(z, z0, peak),
            "loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:])),
            "train_s": time.time() - t0, "latent_scale": float(model.latent_scale)}


def build_tiny(root: Path, latent_scale: Optional[str] = "auto", extra: Sequence[str] = (),
               recon: Optional[str] = None, internvl: Optional[str] = None):
    """(task, GenModel): a fresh tiny gen_stage2 from the tiny stand-in directories (as the
    tests' fixtures build it); `latent_scale` "auto" = latent_scale_for the flip pairs."""
    from unilip_ds.config import load_config
    from unilip_ds.data.sample_images import PHOTOS
    from unilip_ds.models import tiny_assets as T
    from unilip_ds.tasks.base import MAIN, build_task
    if not (root / "recon").exists():
        internvl = T.save_tiny_internvl(root / "internvl", corpus=[c for _, c in PHOTOS])
        T.save_tiny_sana(root / "sana")
        T.save_tiny_dcae(root / "dcae")
        T.save_tiny_recon_export(root / "recon", internvl)
    over = ["model.flavor=tiny", f"model.internvl_path={internvl or root / 'internvl'}",
            f"model.unilip_path={recon or root / 'recon'}",
            f"model.sana_path={root / 'sana'}", "data.resolution=224", "data.train.sources=[]",
            "data.train.urls=[/nonexistent]", "train.precision=fp32", "model.grad_checkpointing=false", *extra]
    if latent_scale not in (None, "auto", "flavor"):
        over.append(f"gen.latent_scale={latent_scale}")
    cfg = load_config("gen_stage2", over)
    task = build_task(cfg)
    modules = task.build_modules()
    task.load_pretrained(modules)
    return task, modules[MAIN]


def edit_pairs(data: str, count: int, seed: int, edits: str = "flips", mix_mosaic: float = 0.0,
               grids: Sequence[int] = (2, 4, 8)):
    """(inputs, instructions, outputs) as PIL lists: `count` training pairs and the held-out
    ones, each pair's edit drawn (seeded) from the edit set `edits` (sample_images.EDIT_SETS:
    flips or colours; identity: "keep the image as it is"), so the instruction decides the
    edit. photos: the bundled photos' variants, the demo's held-out photos left out; shapes:
    synthetic scenes (shape_samples; held out = another seed); mosaics: 8 x 8 colour-block
    mosaics (mosaic_samples). `mix_mosaic`: that fraction of the training pairs (the last
    ones) replaced by identity edits of mosaics (held-out pairs unchanged)."""
    import random
    from unilip_ds.data.sample_images import (EDIT_SETS, IDENTITY_EDIT, PHOTOS, load_photo, mosaic_samples,
                                              samples, shape_samples)
    if data == "photos":
        held = ("chelsea", "coffee", "astronaut")
        parts = [(seed, [s_.image for s_ in samples(count) if s_.key.split("_")[0] not in held]),
                 (seed + 1000, [load_photo(n) for n, _ in PHOTOS if n.split(".")[0] in held])]
    else:
        make = (lambda n, seed: mosaic_samples(n, grids=grids, seed=seed)) if data == "mosaics" else shape_samples
        parts = [(part, [s_.image for s_ in make(n, seed=part)])
                 for part, n in ((seed, count), (seed + 1000, 16))]
    # identity: a diagnostic (the output must be the input: is the reference's layout routed
    # to the output at all, whatever the edit?)
    out, options = [], {**EDIT_SETS, "identity": (IDENTITY_EDIT,)}[edits]
    for part, ims in parts:
        pick = random.Random(f"edit-pairs-{part}")
        chosen = [options[pick.randrange(len(options))] for _ in ims]
        out.append((ims, [e[0] for e in chosen], [e[1](im) for e, im in zip(chosen, ims)]))
    n_mix = int(round(mix_mosaic * len(out[0][0])))
    if n_mix:
        ims, texts, outs = (list(v[:len(v) - n_mix]) for v in out[0])
        mos = [s_.image for s_ in mosaic_samples(n_mix, grids=grids, seed=seed + 2000)]
        out[0] = (ims + mos, texts + [IDENTITY_EDIT[0]] * n_mix, outs + [IDENTITY_EDIT[1](m) for m in mos])
    return out[0], out[1]


def heldout_edit(task, model, data: str, count: int, steps: int, lr: float, batch: int = 8, seed: int = 0,
                 sample_steps: int = 20, guidance: float = 1.0, log=None, edits: str = "flips",
                 mix_mosaic: float = 0.0, grids: Sequence[int] = (2, 4, 8),
                 identity_steps: int = 0) -> Dict[str, float]:
    """Generalisation: edits trained on `count` pairs (random minibatches; edit_pairs), then
    applied to held-out inputs. Image PSNR of the output against the true target and against
    the input, and the copy baseline (input vs target); the same in latent space.
    `identity_steps`: a curriculum, that many steps of identity edits of the same training
    inputs first (the layout routed), then `steps` of the edits."""
    (tr_in, tr_text, tr_out), (te_in, te_text, te_out) = edit_pairs(data, count, seed, edits, mix_mosaic, grids)
    r = model.resolution
    x_in, x_out = to_tensor(tr_in, r), to_tensor(tr_out, r)
    e_in, e_out = to_tensor(te_in, r), to_tensor(te_out, r)
    builder = task.prompts()
    torch.manual_seed(seed)
    t0 = time.time()
    if identity_steps:
        from unilip_ds.data.sample_images import IDENTITY_EDIT
        x0, state = pool(model, builder, "edit", [IDENTITY_EDIT[0]] * len(tr_in), x_in, x_in)
        if log:
            log(f"  identity first: {identity_steps} steps")
        fit(model, x0, state, identity_steps, lr, log, batch=batch)
    x0, state = pool(model, builder, "edit", tr_text, x_out, x_in)
    losses, _ = fit(model, x0, state, steps, lr, log, batch=batch)
    with torch.no_grad():
        z = sample_latents(model, builder, "edit", te_text, e_in, steps=sample_steps, guidance=guidance, seed=seed)
        out = model.decode(z)
        zt, zi = model.target_latent(e_out), model.target_latent(e_in)
        # every edit here commutes with a horizontal mirror: the mirrored input's true target
        zt_m = model.target_latent(e_out.flip(-1))
        rec_t = model.decode(zt)
        # does the output follow the reference's layout? The held-out inputs mirrored: an
        # edit that carries the layout mirrors its output (close to the mirrored output),
        # one that reads only what the reference holds, not where, gives the same output
        # (close to the unmirrored one). The tiny random UniLIP's latent has a large part
        # that depends on the place, not the content (its ViT's sin-cos position table), and
        # does not mirror: on shape scenes even a perfect edit scores about the same against
        # the mirrored and the unmirrored output (the `_ceiling` figures: the true targets).
        # The figures against the true targets of the mirrored inputs (`vs_mirrored_target`
        # against `vs_target`) tell the layout apart there. (Permuting the reference's tokens tells nothing:
        # each token carries its position in its features, cross-attention sees a set.)
        # Another seed's samples: how far the noise alone moves the output.
        z_flip = sample_latents(model, builder, "edit", te_text, e_in.flip(-1), steps=sample_steps,
                                guidance=guidance, seed=seed)
        z_seed = sample_latents(model, builder, "edit", te_text, e_in, steps=sample_steps, guidance=guidance,
                                seed=seed + 100)
        out_flip = model.decode(z_flip)
    peak = float(zt.max() - zt.min())
    # per instruction: which edits are learnt (e.g. black and white keeps the layout's
    # luminance, inversion must move every colour)
    per = {}
    for text in sorted(set(te_text)):
        i = torch.tensor([t == text for t in te_text])
        per[text] = {"n": int(i.sum()), "psnr_vs_target": psnr(out[i], e_out[i]),
                     "psnr_vs_input": psnr(out[i], e_in[i]),
                     "psnr_copy": psnr(e_in[i], e_out[i]), "latent_psnr_vs_target": psnr(z[i], zt[i], peak),
                     "latent_psnr_vs_input": psnr(z[i], zi[i], peak), "latent_psnr_copy": psnr(zi[i], zt[i], peak),
                     "latent_psnr_global_only": psnr(zt[i].mean((2, 3), keepdim=True).expand_as(zt[i]), zt[i], peak)}
    return {"train_pairs": len(tr_in), "heldout_pairs": len(te_in), "per_instruction": per,
            "psnr_vs_target": psnr(out, e_out),
            "psnr_vs_input": psnr(out, e_in), "psnr_copy": psnr(e_in, e_out), "psnr_recon_target": psnr(rec_t, e_out),
            "latent_psnr_vs_target": psnr(z, zt, peak), "latent_psnr_vs_input": psnr(z, zi, peak),
            "latent_psnr_copy": psnr(zi, zt, peak),
            # what knowing only each target's spatial mean (its colours, not its layout) gives
            "latent_psnr_global_only": psnr(zt.mean((2, 3), keepdim=True).expand_as(zt), zt, peak),
            "latent_psnr_mirrored_input_output_vs_output_mirrored": psnr(z_flip, z.flip(-1), peak),
            "latent_psnr_mirrored_input_output_vs_output": psnr(z_flip, z, peak),
            "latent_psnr_target_mirrored_vs_target": psnr(zt.flip(-1), zt, peak),
            "latent_psnr_mirrored_input_output_vs_mirrored_target": psnr(z_flip, zt_m, peak),
            "latent_psnr_mirrored_input_output_vs_target": psnr(z_flip, zt, peak),
            # what a perfect edit scores in the two mirror figures above them
            "latent_psnr_mirrored_target_vs_target_mirrored_ceiling": psnr(zt_m, zt.flip(-1), peak),
            "latent_psnr_mirrored_target_vs_target_ceiling": psnr(zt_m, zt, peak),
            "psnr_mirrored_input_output_vs_mirrored_target": psnr(out_flip, e_out.flip(-1)),
            "psnr_mirrored_input_output_vs_target": psnr(out_flip, e_out),
            "latent_psnr_output_vs_other_seed_output": psnr(z, z_seed, peak),
            "loss_last": float(np.mean(losses[-50:])), "train_s": time.time() - t0,
            "latent_scale": float(model.latent_scale), "_out": out, "_in": e_in, "_target": e_out}


def heldout_t2i(task, model, count: int, steps: int, lr: float, batch: int = 8, seed: int = 0,
                sample_steps: int = 20, guidance: float = 1.0, log=None) -> Dict[str, float]:
    """T2I generalisation: synthetic scenes and their captions (shape_samples), `count` for
    training, 16 held out (another seed). Samples from the held-out captions against the
    scenes they describe, and the same model with the caption dropped (the null prompt, the
    same seeds): the caption must bring the sample closer to what it describes."""
    from unilip_ds.data.sample_images import shape_samples
    r = model.resolution
    train, test = shape_samples(count, seed=seed), shape_samples(16, seed=seed + 1000)
    builder = task.prompts()
    torch.manual_seed(seed)
    x0, state = pool(model, builder, "t2i", [s_.caption for s_ in train], to_tensor([s_.image for s_ in train], r))
    losses, t0 = fit(model, x0, state, steps, lr, log, batch=batch)
    target = to_tensor([s_.image for s_ in test], r)
    with torch.no_grad():
        caps = [s_.caption for s_ in test]
        z = sample_latents(model, builder, "t2i", caps, None, steps=sample_steps, guidance=guidance, seed=seed)
        z0 = sample_latents(model, builder, "t2i", [None] * len(caps), None, steps=sample_steps, seed=seed)
        zt = model.target_latent(target)
        out, out0 = model.decode(z), model.decode(z0)
    peak = float(zt.max() - zt.min())
    return {"train_pairs": count, "heldout_captions": len(test), "psnr_caption_vs_target": psnr(out, target),
            "psnr_dropped_vs_target": psnr(out0, target), "psnr_caption_vs_dropped": psnr(out, out0),
            "latent_psnr_caption_vs_target": psnr(z, zt, peak), "latent_psnr_dropped_vs_target": psnr(z0, zt, peak),
            "loss_last": float(np.mean(losses[-50:])), "train_s": time.time() - t0,
            "latent_scale": float(model.latent_scale), "_in": out0, "_out": out, "_target": target}


# -- export ------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_export(ckpt: str, edits_json: Optional[str], captions: Sequence[str], steps: int = 20,
                    guidance: float = 4.5, seed: int = 0) -> dict:
    """Held-out edits (vs target, vs input, copy baseline) and T2I caption vs dropped."""
    from PIL import Image
    from unilip_ds.inference.pipeline import UniLIPPipeline
    pipe = UniLIPPipeline.from_pretrained(ckpt)
    for name in ("decoder", "dcae"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(torch.float32)
    model, builder = pipe.gen_model(), pipe.prompt_builder()
    r = model.resolution
    out: dict = {"ckpt": str(ckpt), "latent_scale": float(model.latent_scale), "steps": steps,
                 "guidance": guidance}
    if edits_json:
        root = Path(edits_json).parent
        recs = json.loads(Path(edits_json).read_text())
        inp = to_tensor([Image.open(root / x["input"]) for x in recs], r)
        tgt = to_tensor([Image.open(root / x["output"]) for x in recs], r)
        texts = [x["instruction"] for x in recs]
        z = sample_latents(model, builder, "edit", texts, inp, steps=steps, guidance=guidance, seed=seed)
        edited = model.decode(z)
        feats = model.image_features(inp)
        z0 = sample_latents(model, builder, "edit", texts, None, steps=steps, guidance=guidance, seed=seed,
                            ref_features=torch.zeros_like(feats))
        recon_t, recon_i = model.decode(model.target_latent(tgt)), model.decode(model.target_latent(inp))
        out["edit"] = {
            "n": len(recs), "psnr_vs_target": psnr(edited, tgt), "psnr_vs_input": psnr(edited, inp),
            "psnr_copy": psnr(inp, tgt), "psnr_zeroed_ref_vs_target": psnr(model.decode(z0), tgt),
            # the latent space's own ceiling: the target encoded and decoded
            "psnr_recon_target": psnr(recon_t, tgt), "psnr_recon_input_vs_target": psnr(recon_i, tgt),
            "per_image": [{"input": x["input"], "instruction": x["instruction"],
                           "vs_target": psnr(edited[i:i + 1], tgt[i:i + 1]),
                           "vs_input": psnr(edited[i:i + 1], inp[i:i + 1]),
                           "copy": psnr(inp[i:i + 1], tgt[i:i + 1])} for i, x in enumerate(recs)]}
    if captions:
        z_c = sample_latents(model, builder, "t2i", captions, None, steps=steps, guidance=guidance, seed=seed)
        z_n = sample_latents(model, builder, "t2i", [None] * len(captions), None, steps=steps, guidance=1.0,
                             seed=seed)
        im_c, im_n = model.decode(z_c), model.decode(z_n)
        # different captions with the same seed: does the caption decide the image?
        im_other = model.decode(sample_latents(model, builder, "t2i", list(captions[1:]) + list(captions[:1]),
                                               None, steps=steps, guidance=guidance, seed=seed))
        out["t2i"] = {"n": len(captions), "psnr_caption_vs_dropped": psnr(im_c, im_n),
                      "latent_rms_caption_minus_dropped": float((z_c - z_n).pow(2).mean().sqrt()),
                      "latent_rms_sample": float(z_c.pow(2).mean().sqrt()),
                      "psnr_caption_vs_other_caption_same_seed": psnr(im_c, im_other)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("overfit")
    o.add_argument("--pairs", type=int, default=4)
    o.add_argument("--task", choices=("edit", "t2i"), default="edit", help="t2i: caption -> photo pairs")
    o.add_argument("--steps", type=int, default=600)
    o.add_argument("--lr", type=float, default=2e-3)
    o.add_argument("--latent-scale", default="auto", help="auto (1/std of the targets), flavor, or a number")
    o.add_argument("--assets", default=None, help="tiny stand-in directories (default: a temporary folder)")
    h = sub.add_parser("heldout")
    h.add_argument("--recon", default=None, help="a recon export (e.g. the demo's recon_stage2); default: random")
    h.add_argument("--internvl", default=None, help="the InternVL3 directory the recon encoder came from")
    h.add_argument("--data", choices=("shapes", "photos", "mosaics"), default="shapes")
    h.add_argument("--edits", choices=("flips", "colours", "identity"), default="flips",
                   help="the edit set (sample_images.EDIT_SETS): flips move the layout, colours keep it")
    h.add_argument("--mix-mosaic", type=float, default=0.0,
                   help="this fraction of the training pairs are identity edits of colour mosaics (held-out "
                   "pairs unchanged)")
    h.add_argument("--mosaic-grids", type=int, nargs="+", default=[2, 4, 8],
                   help="each mosaic's grid (cells per side) is drawn from these")
    h.add_argument("--identity-steps", type=int, default=0,
                   help="a curriculum: this many steps of identity edits of the training inputs first")
    h.add_argument("--task", choices=("edit", "t2i"), default="edit", help="t2i: shapes' captions -> scenes")
    h.add_argument("--count", type=int, default=200)
    h.add_argument("--steps", type=int, default=1500)
    h.add_argument("--batch", type=int, default=8)
    h.add_argument("--lr", type=float, default=1e-3)
    h.add_argument("--guidance", type=float, default=1.0)
    h.add_argument("--assets", default=None)
    h.add_argument("--grid", default=None, help="write input | output | target rows here (PNG; t2i: caption "
                   "dropped | caption | described scene)")
    h.add_argument("--extra", nargs="*", default=[], help="config overrides (e.g. model widths are the flavor's)")
    e = sub.add_parser("export")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--edits", default=None, help="edits.json of held-out pairs (write_edit_pairs_folder layout)")
    e.add_argument("--captions", nargs="*", default=None, help="held-out captions (default: the demo's)")
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--guidance", type=float, default=4.5)
    e.add_argument("--out", default=None, help="write the figures as JSON here too")
    for p_ in (o, h, e):
        p_.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, which follows OMP_NUM_THREADS)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cmd == "overfit":
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(args.assets or tmp)
            task, model = build_tiny(root, args.latent_scale)
            inputs, targets = flip_pairs(args.pairs, model.resolution)
            if args.latent_scale == "auto":
                model.latent_scale = latent_scale_for(model, targets)
            print(f"overfit: {args.pairs} {args.task} pairs, latent scale {model.latent_scale:g}, {args.steps} steps, "
                  f"lr {args.lr:g}", flush=True)
            say = lambda s: print(s, flush=True)  # noqa: E731
            if args.task == "edit":
                res = overfit(task, model, inputs, targets, args.steps, args.lr, log=say)
            else:
                from unilip_ds.data.sample_images import PHOTOS
                caps = [c for _, c in PHOTOS[:args.pairs]]
                res = overfit_t2i(task, model, caps, inputs, args.steps, args.lr, log=say)
    elif args.cmd == "heldout":
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(args.assets or tmp)
            task, model = build_tiny(root, "auto", args.extra, recon=args.recon, internvl=args.internvl)
            model.latent_scale = latent_scale_for(model, to_tensor(edit_pairs(args.data, 64, 0, args.edits)[0][2], model.resolution))
            print(f"heldout: latent scale {model.latent_scale:g}", flush=True)
            say = lambda s: print(s, flush=True)  # noqa: E731
            if args.task == "edit":
                res = heldout_edit(task, model, args.data, args.count, args.steps, args.lr, args.batch,
                                   guidance=args.guidance, log=say, edits=args.edits, mix_mosaic=args.mix_mosaic,
                                   grids=args.mosaic_grids, identity_steps=args.identity_steps)
            else:
                res = heldout_t2i(task, model, args.count, args.steps, args.lr, args.batch, guidance=args.guidance,
                                  log=say)
            ims = [res.pop(k) for k in ("_in", "_out", "_target")]
            if args.grid:
                from unilip_ds.inference.sampling import grid, to_pil
                grid([list(r) for r in zip(*(to_pil(x) for x in ims))]).save(args.grid)
    else:
        from unilip_ds.data.sample_images import PHOTOS
        caps = args.captions if args.captions is not None else \
            [c for n, c in PHOTOS if n.split(".")[0] in ("chelsea", "coffee", "astronaut")]
        res = evaluate_export(args.ckpt, args.edits, caps, steps=args.steps, guidance=args.guidance)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
