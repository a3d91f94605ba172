"""The generator's formulas against oracles written independently of the code under test
(issue 20): the formula in the test, or the library's own implementation (diffusers'
schedulers and AutoencoderDC, transformers' InternVL image features, torch ops), never
another path of this project. Stub DiTs return known velocities, so every number the code
computes can be written down here.

- flow matching: x_t = (1 - sigma) x0 + sigma eps, timestep sigma x 1000, target eps - x0
- targets: latent_scale x adapter(features) (UniLIP), latent_scale x DC-AE latent; decode
  divides by the scale
- CFG: the scheduler receives v_u + g (v_c - v_u), the null rows carry the null prompt;
  20-step sample against diffusers' DPM-Solver loop written here; the pipeline's margin
- the live training path sends the null prompt exactly for the CFG-dropped rows
- cache fingerprint: each part that changes is refused by name
"""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

CAPTIONS = ["a cat sitting on a wooden table in the warm afternoon sun", "a red car", "two dogs"]
EDITS = ["flip the image horizontally and make it brighter please", "turn the image upside down"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet


class StubDiT(nn.Module):
    """A DiT that records its inputs and returns fn(x, timestep, enc, mask)."""

    def __init__(self, fn, in_channels: int = 32):
        super().__init__()
        self.fn, self.calls = fn, []
        self.config = SimpleNamespace(in_channels=in_channels)

    def forward(self, hidden_states, encoder_hidden_states=None, encoder_attention_mask=None, timestep=None,
                return_dict=True):
        self.calls.append({"x": hidden_states.detach().clone(), "t": timestep.detach().clone(),
                           "enc": encoder_hidden_states.detach().clone(), "mask": encoder_attention_mask.clone()})
        return (self.fn(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask),)


def _chat(content: str) -> str:  # DESIGN 2.2's turn format, written out
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def _ids(tok, text: str):
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<img>")]


# ------------------------------------------------------------------------------ flow matching
def test_flow_matching_interpolant_timestep_and_target(build_gen):
    from diffusers import FlowMatchEulerDiscreteScheduler
    task, m = build_gen()
    side = task.cfg.data.resolution // 28
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 32, side, side, generator=g), torch.randn(3, 32, side, side, generator=g)
    u = torch.tensor([0.05, 0.5, 0.93])
    prompts = task.prompts()("t2i", CAPTIONS)
    target = eps - x0
    for shift in (1.0, 3.0):
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        sigma = sched.sigmas[(u * 1000).long()].float()  # the reference's training sigmas
        s = sigma.view(-1, 1, 1, 1)
        for name, out, expect in (("target", target, torch.zeros(3)),
                                  ("zero", torch.zeros_like(x0), target.pow(2).mean((1, 2, 3))),
                                  ("x0", x0, (x0 - target).pow(2).mean((1, 2, 3)))):
            m.transformer = StubDiT(lambda *a, out=out: out.clone())
            with torch.no_grad():
                loss = m(prompts, target=x0, u=u, noise=eps, shift=shift)["loss"]
            call = m.transformer.calls[-1]
            torch.testing.assert_close(call["x"], (1 - s) * x0 + s * eps, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(call["t"].float(), sigma * 1000, atol=1e-3, rtol=1e-6)
            torch.testing.assert_close(loss, expect, atol=1e-6, rtol=1e-5, msg=f"{name} shift={shift}")
            assert loss.dtype == torch.float32 and loss.shape == (3,)


def test_training_draws_logit_normal_sigmas_and_standard_normal_noise():
    """What flow_loss draws when u / noise are not given: u ~ logit-normal(0, 1) (then the
    reference's index into 1000 timesteps), eps ~ N(0, 1); two-sample KS against draws made here."""
    from unilip_ds.models.generator import flow_loss
    seen = {}

    def velocity(x, t, enc, mask):
        seen["x"] = x
        return torch.zeros_like(x)
    n = 20000
    torch.manual_seed(0)
    x0 = torch.zeros(n, 1, 1, 2)
    sigma = flow_loss(velocity, x0, None, None, shift=1.0)["sigma"].double()
    g = torch.Generator().manual_seed(1)
    u = torch.sigmoid(torch.randn(n, generator=g, dtype=torch.float64))
    ref = (1000 - torch.floor(u * 1000)) / 1000

    def ks(a, b):
        grid = torch.cat([a, b]).unique()
        cdf = lambda v: torch.searchsorted(v.sort().values, grid, right=True).double() / len(v)  # noqa: E731
        return (cdf(a) - cdf(b)).abs().max().item()
    assert ks(sigma, ref) < 0.025, ks(sigma, ref)  # uniform u: ~0.1
    eps = (seen["x"] / sigma.view(-1, 1, 1, 1).float()).flatten().double()  # x0 = 0: x_t = sigma eps
    assert ks(eps, torch.randn(2 * n, generator=g, dtype=torch.float64)) < 0.025


# ------------------------------------------------------------------------------ targets / decode
def test_unilip_target_is_the_scaled_adapter_latent_and_decode_inverts_it(build_gen):
    task, m = build_gen(extra=["gen.latent_scale=2.5"])
    assert m.latent_scale == 2.5
    assert build_gen()[1].latent_scale == 10.6  # the tiny flavor keeps the 1B factor (DESIGN 2.2)
    r = task.cfg.data.resolution
    images = torch.rand(2, 3, r, r, generator=torch.Generator().manual_seed(0))
    pixels = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = m.mllm.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                          vision_feature_select_strategy="default").pooler_output
        tokens = m.adapter(feats)  # (B, N, 32), token n = row x side + column
        side = int(tokens.shape[1] ** 0.5)
        z = tokens.permute(0, 2, 1).reshape(2, 32, side, side)
        torch.testing.assert_close(m.target_latent(images), 2.5 * z, atol=1e-5, rtol=1e-5)
        # decode: latent / scale -> decoder -> clamp [-1, 1] -> [0, 1] -> resize to the resolution
        ref = (m.decoder(z).clamp(-1, 1) + 1) / 2
        ref = F.interpolate(ref, size=(r, r), mode="bilinear", align_corners=False)
        # (z x 2.5 / 2.5 is z only up to rounding, which the decoder amplifies a little)
        torch.testing.assert_close(m.decode(2.5 * z), ref, atol=1e-3, rtol=0)


def test_dcae_target_is_the_scaled_dcae_latent_and_decode_inverts_it(build_gen):
    task, m = build_gen("dcae", extra=["gen.latent_scale=0.7"])
    assert m.latent_scale == 0.7 and build_gen("dcae")[1].latent_scale == 0.41407  # SANA's DC-AE factor
    r = task.cfg.data.resolution
    images = torch.rand(2, 3, r, r, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = m.dcae.encode(images * 2 - 1).latent  # diffusers' AutoencoderDC, images in [-1, 1]
        torch.testing.assert_close(m.target_latent(images), 0.7 * z, atol=1e-5, rtol=1e-5)
        ref = (m.dcae.decode(z).sample.clamp(-1, 1) + 1) / 2
        torch.testing.assert_close(m.decode(0.7 * z), ref, atol=1e-3, rtol=0)


def test_published_latent_scales():
    from unilip_ds.config import load_config
    from unilip_ds.tasks.base import build_task
    for flavor, target, scale in (("1b", "unilip", 10.6), ("2b", "unilip", 9.5), ("1b", "dcae", 0.41407)):
        cfg = load_config("gen_stage1" if target == "dcae" else "gen_stage2",
                          [f"model.flavor={flavor}", f"gen.target={target}"])
        assert build_task(cfg).latent_scale() == scale, (flavor, target)


# ------------------------------------------------------------------------------ CFG sampling
def _row_velocities(m, task, refs: dict, values: dict):
    """A stub velocity per row, chosen by which reference condition the row carries."""
    def fn(x, t, enc, mask):
        out = []
        for i in range(x.shape[0]):
            real = enc[i][mask[i].bool()]  # prefix padding sits between the prompt and the queries
            hits = [k for k, (e, em) in refs.items() if int(em.sum()) == real.shape[0]
                    and torch.allclose(real, e[em.bool()], atol=1e-4, rtol=1e-4)]
            assert len(hits) == 1, f"row {i}: condition matches {hits}"
            out.append(values[hits[0]].expand_as(x[i]))
        return torch.stack(out)
    return fn


def _conditions(m, task, kind, texts, feats=None):
    out = {}
    with torch.no_grad():
        for key, text in [(None, None)] + list(enumerate(texts)):
            e, mask = m.condition(m.prefix(task.prompts()(kind, [text]), None if feats is None else feats[:1]))
            out[key] = (e[0], mask[0])
    return out


class _SpyScheduler:
    """diffusers' DPM-Solver multistep with flow sigmas (DESIGN 2.2), recording model outputs."""

    def __init__(self, shift: float):
        from diffusers import DPMSolverMultistepScheduler
        self.inner = DPMSolverMultistepScheduler(
            num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
            final_sigmas_type="zero", lower_order_final=True, timestep_spacing="linspace")
        self.outputs = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, model_output, t, sample, **kw):
        self.outputs.append(model_output.clone())
        return self.inner.step(model_output, t, sample, **kw)


@pytest.mark.parametrize("guidance,n", [(4.5, 2), (1.0, 1)])
def test_cfg_sampling_against_the_formula_and_diffusers_loop(build_gen, guidance, n):
    """Stub velocities per condition: v_u (null prompt), v_0, v_1 (the two prompts). The
    scheduler must receive v_u + g (v_i - v_u) for every image of prompt i (prompt-major,
    n images each), and the whole 4-step sample must equal diffusers' DPM-Solver loop
    (flow sigmas, shift 3) written here, from the same initial noise."""
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.utils.torch_utils import randn_tensor

    from unilip_ds.inference.sampling import sample
    task, m = build_gen()
    refs = _conditions(m, task, "t2i", CAPTIONS[:2])
    c = torch.arange(32, dtype=torch.float32).view(32, 1, 1) / 32
    values = {None: -0.3 + 0 * c, 0: 0.5 - c, 1: 0.2 + c}  # v_u, v_c of prompt 0, of prompt 1
    m.transformer = StubDiT(_row_velocities(m, task, refs, values))
    decoded = []
    m.decode = lambda z: decoded.append(z.clone()) or torch.zeros(z.shape[0], 3, 4, 4)
    steps, shift = 4, 3.0
    spy = _SpyScheduler(shift)
    kw = dict(steps=steps, guidance=guidance, flow_shift=shift, num_images_per_prompt=n)
    sample(m, task.prompts(), "t2i", CAPTIONS[:2], generator=torch.Generator().manual_seed(0), scheduler=spy, **kw)
    side = task.cfg.data.resolution // 28
    cfg = torch.stack([values[None] + guidance * (values[i] - values[None]) for i in (0, 0, 1, 1)[::2 // n]])
    cfg = cfg.expand(2 * n, 32, side, side)
    assert len(spy.outputs) == steps
    for out in spy.outputs:
        torch.testing.assert_close(out, cfg, atol=1e-6, rtol=1e-6)
    rows = [x["x"].shape[0] for x in m.transformer.calls]
    rows = rows[:steps]  # the first sample()'s forwards: [uncond, cond] in one; none at g=1
    assert rows == [4 * n if guidance != 1.0 else 2 * n] * steps
    # the whole loop (with the scheduler sample() builds itself) against diffusers' own, written here
    sample(m, task.prompts(), "t2i", CAPTIONS[:2], generator=torch.Generator().manual_seed(0), **kw)
    sched = DPMSolverMultistepScheduler.from_config(spy.inner.config)
    sched.set_timesteps(steps)
    latents = randn_tensor((2 * n, 32, side, side), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    for t in sched.timesteps:
        latents = sched.step(cfg, t, latents).prev_sample
    assert len(decoded) == 2
    for got in decoded:
        torch.testing.assert_close(got, latents, atol=1e-5, rtol=1e-5)


def test_pipeline_scheduler_is_sanas_with_the_configured_shift(build_gen):
    from unilip_ds.inference.pipeline import UniLIPPipeline
    task, m = build_gen(extra=["gen.flow_shift_sample=2.5"])
    pipe = UniLIPPipeline.from_gen_model(m, task.prompts().tokenizer, task.cfg)
    got = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert got.flow_shift == 2.5 and got.use_flow_sigmas and got.prediction_type == "flow_prediction"
    pipe.scheduler.set_timesteps(20)
    # SANA's sampling sigmas: 20 linear steps of 1 - alpha, alpha from 1 to 1/1000, shifted
    s = (1 - torch.linspace(1, 1 / 1000, 21, dtype=torch.float64)).flip(0)[:-1]
    want = 2.5 * s / (1 + 1.5 * s)
    torch.testing.assert_close(torch.as_tensor(pipe.scheduler.sigmas[:-1], dtype=torch.float64), want,
                               atol=1e-6, rtol=1e-6)
    assert float(pipe.scheduler.sigmas[-1]) == 0.0


def test_cfg_edit_null_rows_keep_the_image(build_gen):
    from unilip_ds.inference.sampling import sample
    task, m = build_gen()
    r = task.cfg.data.resolution
    ref = torch.rand(1, 3, r, r, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = m.image_features(ref)
    refs = _conditions(m, task, "edit", EDITS[:1], feats)
    values = {None: torch.tensor(-1.0), 0: torch.tensor(1.0)}
    m.transformer = StubDiT(_row_velocities(m, task, refs, values))
    m.decode = lambda z: z
    spy = _SpyScheduler(3.0)
    sample(m, task.prompts(), "edit", EDITS[:1], ref_images=ref, steps=2, guidance=3.0,
           generator=torch.Generator().manual_seed(0), scheduler=spy)
    for out in spy.outputs:
        torch.testing.assert_close(out, torch.full_like(out, -1.0 + 3.0 * 2.0))


def test_pipeline_guidance_changes_the_images_by_a_margin(build_gen):
    """UniLIPPipeline over a freshly loaded tiny GenModel (real DiT, random connector): images
    at guidance 1 and 4.5 must differ by more than a rounding error (measured: 0.43; ignoring
    guidance gives 0)."""
    from unilip_ds.inference.pipeline import UniLIPPipeline
    task, m = build_gen()

    def images(pipe, guidance):
        return pipe(prompt=CAPTIONS[:2], num_inference_steps=2, guidance_scale=guidance, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    pipe = UniLIPPipeline.from_gen_model(m, task.prompts().tokenizer, task.cfg)
    pipe.set_progress_bar_config(disable=True)
    diff = (images(pipe, 1.0) - images(pipe, 4.5)).abs().max().item()
    assert diff > 1e-3, f"guidance 1 vs 4.5: max difference {diff:.2e}"


# ------------------------------------------------------------------------------ CFG dropout, live path
@pytest.mark.parametrize("kind", ["t2i", "edit"])
def test_live_path_sends_the_null_prompt_exactly_for_the_dropped_rows(build_gen, kind):
    from unilip_ds.models.prompts import IMG_CONTEXT
    task, m = build_gen(extra=["gen.cfg_dropout=0.5"])
    tok, n = task.prompts().tokenizer, task.num_image_tokens()
    m.transformer = StubDiT(lambda x, *a: torch.zeros_like(x))
    seen, drawn = [], []
    prefix, null_mask = m.prefix, task.null_mask
    m.prefix = lambda prompts, feats=None: seen.append((prompts, feats)) or prefix(prompts, feats)
    task.null_mask = lambda k: drawn.append(null_mask(k)) or drawn[-1]
    r = task.cfg.data.resolution
    texts = CAPTIONS + ["a blue boat"] if kind == "t2i" else EDITS * 2
    b = len(texts)
    g = torch.Generator().manual_seed(0)
    batch = {"__key__": [str(i) for i in range(b)], "__task__": kind, "image": torch.rand(b, 3, r, r, generator=g),
             "input_image": torch.rand(b, 3, r, r, generator=g), "caption": texts, "instruction": texts}
    image = "<img>" + IMG_CONTEXT * n + "</img>"
    null = _chat("Generate an image.") if kind == "t2i" else _chat(f"Edit the image.\n{image}")
    masks = []
    for seed in range(3):
        torch.manual_seed(seed)
        seen.clear(), drawn.clear()
        with torch.no_grad():
            task.loss("model", batch, 0, {"model": m})
        assert len(seen) == 1 and len(drawn) == 1
        prompts, feats = seen[0]
        for i, dropped in enumerate(drawn[0].tolist()):
            if dropped:
                expect = _ids(tok, null)
            elif kind == "t2i":
                expect = _ids(tok, _chat(f"Generate an image: {texts[i]}"))
            else:
                expect = _ids(tok, _chat(f"Edit the image: {texts[i]}\n{image}"))
            assert prompts.input_ids[i, :prompts.lengths[i]].tolist() == expect, (seed, i, dropped)
        if kind == "edit":  # every row, dropped or not, carries its own input image's features
            with torch.no_grad():
                torch.testing.assert_close(feats, m.image_features(batch["input_image"]))
        masks.append(drawn[0])
    assert any(bool(d.any()) and not bool(d.all()) for d in masks)  # dropped and kept rows seen


# ------------------------------------------------------------------------------ cache fingerprint
def _part_named(exc) -> set:
    return set(re.findall(r"(\S+) \(cache: ", str(exc)))


def test_cache_fingerprint_refuses_each_changed_part_by_name(build_gen, tmp_path, monkeypatch):
    from unilip_ds.config import ConfigError
    from unilip_ds.data.cache import MANIFEST, CacheManifest, fingerprint
    from unilip_ds.models import prompts as P
    from unilip_ds.models.prompts import PromptBuilder
    task, m = build_gen(extra=[f"data.train.cache={tmp_path}", "data.train.task=t2i"])
    modules = {"model": m}
    for level in ("prefix", "latents"):
        fp = fingerprint(m, task.prompts(), level, torch.float32, "tiny")
        (tmp_path / MANIFEST).write_text(CacheManifest(task="t2i", level=level, fingerprint=fp).to_json())
        task.after_load(modules)  # as built: accepted

        def refused(part, change, undo, *, level=level):
            change()
            try:
                if part is None:
                    task.after_load(modules)
                    return
                with pytest.raises(ConfigError, match="other settings") as exc:
                    task.after_load(modules)
                assert _part_named(exc.value) == {part}, (level, str(exc.value))
            finally:
                undo()
            task.after_load(modules)

        def bump(p, i=0):
            flat = p.data.view(-1)
            return (lambda: flat[i].add_(1e-3)), (lambda: flat[i].sub_(1e-3))

        base = m.mllm.model
        llm_w = m.llm.layers[-1].mlp.down_proj.weight
        refused("weights.llm" if level == "prefix" else None, *bump(llm_w, 5))
        refused("weights.llm" if level == "prefix" else None, *bump(m.llm.embed_tokens.weight, 7))
        refused("weights.encoder", *bump(next(base.vision_tower.parameters()), 3))
        refused("weights.encoder", *bump(base.multi_modal_projector.linear_1.weight
                                         if hasattr(base.multi_modal_projector, "linear_1")
                                         else next(base.multi_modal_projector.parameters()), 2))
        refused("weights.encoder", *bump(m.adapter.down_mlp[-1].weight, 1))
        refused("resolution", lambda: setattr(m, "resolution", 196), lambda: setattr(m, "resolution", 224))
        refused("latent_scale", lambda: setattr(m, "latent_scale", 3.0), lambda: setattr(m, "latent_scale", 10.6))
        builder = task.prompts()
        tok = copy.deepcopy(builder.tokenizer)
        tok.add_tokens(["zebraquux"])
        other = PromptBuilder(tok, builder.num_image_tokens, builder.num_queries, builder.max_length)
        refused("tokenizer" if level == "prefix" else None, lambda: setattr(task, "_prompts", other),
                lambda: setattr(task, "_prompts", builder))
        for key, text in (("t2i", "Make an image: {}"), ("edit", "Edit this image: {}\n<image>")):
            refused("prompt" if level == "prefix" else None,
                    lambda key=key, text=text: monkeypatch.setitem(P.TEMPLATES, key, text), monkeypatch.undo)
        refused("prompt" if level == "prefix" else None,
                lambda: monkeypatch.setitem(P.NULL_PROMPTS, "t2i", "An image."), monkeypatch.undo)


# ------------------------------------------------------------------------------ trainer input
def test_uint8_images_reach_the_task_in_unit_range():
    """The data layer ships images as uint8; on the device they become x / 255 in [0, 1]."""
    from unilip_ds.trainer import to_device
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 5, 5), generator=g, dtype=torch.uint8)
    images[0, 0, 0, 0], images[0, 0, 0, 1] = 255, 0
    ids = torch.randint(0, 256, (2, 7), generator=g, dtype=torch.uint8)  # not an image: left as it is
    out = to_device({"image": images, "ids": ids, "__key__": ["a", "b"]}, torch.device("cpu"))
    assert out["image"].dtype == torch.float32
    torch.testing.assert_close(out["image"], images.double().div(255).float(), atol=0, rtol=0)
    assert out["image"].max() == 1.0 and out["image"].min() == 0.0
    assert torch.equal(out["ids"], ids) and out["__key__"] == ["a", "b"]


# ------------------------------------------------------------------------------ connector init
def test_connector_starts_as_the_llms_last_layers_and_final_norm(build_gen):
    _, m = build_gen()
    llm, conn = m.llm, m.connector
    n, total = len(conn.layers), len(llm.layers)
    assert 0 < n < total
    for i in range(n):
        a, b = conn.layers[i].state_dict(), llm.layers[total - n + i].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"connector layer {i}"
    assert torch.equal(conn.norm.weight, llm.norm.weight)


# ------------------------------------------------------------------------------ recon losses
def _lpips_oracle(lpips, x, y):
    """LPIPS v0.1 with VGG16 (Zhang et al. 2018, the lpips package's forward) written out: inputs
    in [0, 1] -> [-1, 1] -> ScalingLayer; relu1_2 ... relu5_3; channel-unit-normalised squared
    differences, weighted by the linear heads, averaged over space, summed over layers."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    feats = []
    for t in (x, y):
        h, taps = ((t * 2 - 1) - shift) / scale, []
        for i, layer in enumerate(lpips.vgg.features[:30]):
            h = layer(h)
            if i in (3, 8, 15, 22, 29):
                taps.append(h)
        feats.append(taps)
    total = 0
    for k, (a, b) in enumerate(zip(*feats)):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = lpips.heads[k].model[1].weight.view(1, -1, 1, 1)
        total = total + ((a - b) ** 2 * w).sum(1).mean((1, 2))
    return total


def test_recon_losses_against_their_formulas():
    """recon_stage1's terms on images in [0, 1]: MSE(recon, image); LPIPS as written above; the
    ConvNeXt logits' MSE on ImageNet-normalised images at the classifier's size."""
    from unilip_ds.config import load_config
    from unilip_ds.tasks.base import MAIN, build_task
    cfg = load_config("recon_stage1", ["model.flavor=tiny", "model.perceptual_pretrained=false"])
    model = build_task(cfg).build_modules()[MAIN].eval()
    images = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(images)
        recon = out["recon"].float()
        torch.testing.assert_close(out["loss/mse"], (recon - images).pow(2).mean(), atol=1e-7, rtol=1e-5)
        nets = model.perceptual
        torch.testing.assert_close(out["loss/lpips"], _lpips_oracle(nets.lpips, recon, images).mean(),
                                   atol=1e-7, rtol=1e-4)
        size = (nets.classifier_size,) * 2
        mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)

        def logits(t):
            t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
            return nets.convnext((t - mean) / std)
        torch.testing.assert_close(out["loss/logits"], (logits(recon) - logits(images)).pow(2).mean(),
                                   atol=1e-7, rtol=1e-4)


# ------------------------------------------------------------------------------ recon metrics
def test_psnr_ssim_per_image_and_their_means_match_scikit_image():
    """Two images with different error levels in one batch: each gets its own PSNR / SSIM
    (scikit-image on that pair), and ReconMetrics reports their means over images."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from unilip_ds.evaluation.metrics import psnr, ssim
    from unilip_ds.evaluation.recon import ReconMetrics
    rng = np.random.default_rng(0)
    real = np.round(rng.random((2, 32, 32, 3)) * 255) / 255
    fake = np.round(np.clip(real + rng.normal(0, 1, real.shape) * np.array([0.02, 0.2]).reshape(2, 1, 1, 1),
                            0, 1) * 255) / 255
    want_psnr = [peak_signal_noise_ratio(real[i], fake[i], data_range=1.0) for i in range(2)]
    want_ssim = [structural_similarity(fake[i], real[i], data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                       sigma=1.5, use_sample_covariance=False) for i in range(2)]
    t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float()  # noqa: E731
    np.testing.assert_allclose(psnr(t(fake), t(real)).numpy(), want_psnr, atol=1e-3)
    np.testing.assert_allclose(ssim(t(fake), t(real)).numpy(), want_ssim, atol=1e-4)
    metrics = ReconMetrics()
    metrics.update(t(real), t(fake))
    got = metrics.result()
    assert got["images"] == 2
    assert got["psnr"] == pytest.approx(np.mean(want_psnr), abs=1e-3)
    assert got["ssim"] == pytest.approx(np.mean(want_ssim), abs=1e-4)
