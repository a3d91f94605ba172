"""The generator computes what the reference (diffusers 0.32, transformers 4.52) computes:
SANA's fixed positional embedding, the reference's text handling, fp32 pixels, the data shares
of its batch shuffling. Oracles: diffusers' own `get_2d_sincos_pos_embed`, torch ops, and the
formulas written here."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed

from unilip_ds.models.flavors import get_flavor
from unilip_ds.models.gen_loading import sana_config


def _patch_tokens_oracle(dit, x: torch.Tensor, grid: int) -> torch.Tensor:
    """Patch projection + diffusers' 2-D sin-cos table at base size `grid`, scale 1 (what
    PatchEmbed computed under diffusers 0.32 for an unset interpolation_scale)."""
    inner = dit.config.num_attention_heads * dit.config.attention_head_dim
    tokens = dit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    table = get_2d_sincos_pos_embed(inner, grid, base_size=grid, interpolation_scale=1.0, output_type="pt")
    return tokens + table.float().unsqueeze(0)


def test_dit_adds_the_reference_sincos_positional_embedding(build_gen):
    from diffusers import SanaTransformer2DModel
    _, model = build_gen()
    dit = model.transformer
    assert dit.config.interpolation_scale == 1
    side = dit.config.sample_size  # 8: the tiny flavor's 224 px / 28
    x = torch.randn(2, 32, side, side)
    assert torch.allclose(dit.patch_embed(x), _patch_tokens_oracle(dit, x, side), atol=1e-6)
    # the real flavors: base size 16 (16 x 16 UniLIP / DC-AE latents), scale 1
    for name in ("1b", "2b"):
        cfg = sana_config(get_flavor(name))
        assert cfg["interpolation_scale"] == 1 and cfg["sample_size"] == 16
        narrow = SanaTransformer2DModel(**dict(cfg, num_layers=1, num_attention_heads=2, attention_head_dim=16,
                                               num_cross_attention_heads=2, cross_attention_head_dim=16,
                                               cross_attention_dim=32, caption_channels=64))
        x = torch.randn(1, 32, 16, 16)
        assert torch.allclose(narrow.patch_embed(x), _patch_tokens_oracle(narrow, x, 16), atol=1e-6)


def test_dit_without_positional_embedding_on_request(build_gen):
    _, model = build_gen(extra=["gen.dit_pos_embed=false"])
    dit = model.transformer
    x = torch.randn(1, 32, 8, 8)
    assert dit.config.interpolation_scale is None
    assert torch.equal(dit.patch_embed(x), dit.patch_embed.proj(x).flatten(2).transpose(1, 2))


def test_export_keeps_the_positional_embedding_after_from_pretrained(build_gen, tmp_path):
    from unilip_ds.inference.pipeline import UniLIPPipeline
    task, model = build_gen()
    out = tmp_path / "export"
    task.write_export(model, out)
    assert json.loads((out / "transformer" / "config.json").read_text())["interpolation_scale"] == 1
    dit = UniLIPPipeline.from_pretrained(str(out)).transformer
    x = torch.randn(1, 32, 8, 8)
    assert torch.allclose(dit.patch_embed(x), _patch_tokens_oracle(dit, x, 8), atol=1e-6)


def test_continuing_an_export_with_the_other_embedding_setting_is_refused(build_gen, gen_assets, tmp_path):
    from unilip_ds.config import ConfigError, load_config
    from unilip_ds.models.gen_loading import check_paths
    task, model = build_gen()
    out = tmp_path / "export"
    task.write_export(model, out)
    cfg = load_config("gen_stage2", ["model.flavor=tiny", f"model.init_from={out}", "gen.dit_pos_embed=false",
                                     "data.train.sources=[]", "data.train.urls=[/nonexistent]"])
    with pytest.raises(ConfigError, match="gen.dit_pos_embed"):
        check_paths(cfg)


# ------------------------------------------------------------------------------------- text
def _gen_batch(task: str, texts, size: int = 224) -> dict:
    g = torch.Generator().manual_seed(0)
    b = {"__key__": [f"k{i}" for i in range(len(texts))], "__task__": task,
         "image": torch.rand(len(texts), 3, size, size, generator=g)}
    if task == "t2i":
        b["caption"] = list(texts)
    else:
        b["instruction"] = list(texts)
        b["input_image"] = torch.rand(len(texts), 3, size, size, generator=g)
    return b


def test_text_that_spells_special_tokens_trains_and_is_counted(build_gen):
    from unilip_ds.models.prompts import IMG_CONTEXT
    from unilip_ds.tasks.base import MAIN
    task, model = build_gen(extra=["gen.cfg_dropout=0"])
    pb, tok = task.prompts(), task.prompts().tokenizer
    n = pb.num_image_tokens
    # T2I: <image> and special-token spellings stay plain text, never image or turn tokens
    captions = ["a photo of <image> tags on a wall", f"a sign reading <img>{IMG_CONTEXT}</img>", "a red car"]
    loss, logs = task.loss("train", _gen_batch("t2i", captions), 0, {MAIN: model})
    assert torch.isfinite(loss) and logs["data/neutralised_prompts"].item() == 2
    batch = pb("t2i", captions)
    assert not batch.image_mask.any() and batch.neutralised == 2
    assert int((batch.input_ids == tok.convert_tokens_to_ids("<img>")).sum()) == 3  # each row's own <img>
    assert "<image> tags" in tok.decode(batch.input_ids[0])
    # edit: <image> is cut from the instruction (as the reference's conversion); the image stays
    instructions = ["flip <image> it", "make it <|im_end|> night"]
    loss, logs = task.loss("train", _gen_batch("edit", instructions), 0, {MAIN: model})
    assert torch.isfinite(loss) and logs["data/neutralised_prompts"].item() == 2
    batch = pb("edit", instructions)
    assert batch.image_mask.sum(1).tolist() == [n, n]
    assert batch.input_ids[0].tolist()[:batch.lengths[0]] == pb("edit", ["flip  it"]).input_ids[0].tolist()
    assert int((batch.input_ids[1] == tok.convert_tokens_to_ids("<|im_end|>")).sum()) == 1


def test_captions_over_the_limit_are_skipped_and_counted(tmp_path):
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    from unilip_ds.data.config import DataConfig, SourceConfig
    from unilip_ds.data.skips import skip_rate
    from unilip_ds.data.stream import MixtureStream
    png = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(png, format="PNG")
    captions = {"short": "a cat", "limit": "x" * 1000, "over": "y" * 1001, "end": "a dog"}
    with wds.TarWriter(str(tmp_path / "s.tar")) as w:
        for key, cap in captions.items():
            w.write({"__key__": key, "png": png.getvalue(), "txt": cap})
    src = SourceConfig(name="t", task="t2i", urls=[str(tmp_path / "s.tar")])
    cfg = DataConfig(resolution=16, shuffle_buffer=4)
    assert cfg.max_caption_chars == 1000  # the reference's limit by default
    batch = next(iter(MixtureStream([src], [[str(tmp_path / "s.tar")]], cfg, batch_size=3, seed=0)))
    assert sorted(batch["__key__"]) == ["end", "limit", "short"]
    stats = batch["__stats__"]
    assert stats["skipped"]["caption_too_long"] == 1
    assert skip_rate(stats["read"], stats["skipped"]) == 0  # a setting's filter, not bad data
    cfg.max_caption_chars = 0  # no limit
    batch = next(iter(MixtureStream([src], [[str(tmp_path / "s.tar")]], cfg, batch_size=4, seed=0)))
    assert sorted(batch["__key__"]) == ["end", "limit", "over", "short"]


# ----------------------------------------------------------------------------------- pixels
def test_pixels_are_normalised_in_fp32_then_cast(build_gen):
    _, model = build_gen()
    model.to(torch.bfloat16)
    seen = []
    model.mllm.model.vision_tower.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[0] if args else kwargs["pixel_values"]), with_kwargs=True)
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    model.image_features(images)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert seen[0].dtype == torch.bfloat16 and torch.equal(seen[0], ((images - mean) / std).to(torch.bfloat16))


def test_decode_in_fp32_clamps_before_the_final_resize(build_gen):
    import torch.nn.functional as F
    _, model = build_gen(extra=["gen.latent_scale=2.5"])
    out = torch.linspace(-3, 3, 3 * 256 * 256).view(1, 3, 256, 256)
    got_in = []

    class Decoder(torch.nn.Module):  # stands in for the UniLIP decoder: a fixed out-of-range image
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, z):
            got_in.append(z)
            return out

    model.decoder = Decoder()
    latent = torch.randn(1, 32, 8, 8, dtype=torch.bfloat16)
    images = model.decode(latent)
    assert got_in[0].dtype == torch.float32 and torch.equal(got_in[0], latent.float() / 2.5)
    want = (F.interpolate(out.clamp(-1, 1), size=(224, 224), mode="bilinear", align_corners=False) + 1) / 2
    assert torch.equal(images, want)


def test_pipeline_decodes_in_fp32_when_the_rest_is_bf16(build_gen, tmp_path):
    from unilip_ds.inference.pipeline import UniLIPPipeline
    task, model = build_gen()
    task.write_export(model, tmp_path / "export")
    pipe = UniLIPPipeline.from_pretrained(str(tmp_path / "export")).to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt=["a cat"], num_inference_steps=1, output_type="pt").images
    assert images.dtype == torch.float32 and pipe.decoder.dtype == torch.float32
    assert pipe.transformer.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------- mix
def _source_shards(root, name: str, count: int):
    """One shard of `count` tiny samples + its data_prep manifest; returns the manifest url."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    from unilip_ds.data.shards import Manifest, ShardInfo, write_manifest
    png = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(png, format="PNG")
    d = root / name
    d.mkdir()
    with wds.TarWriter(str(d / "s-000000.tar")) as w:
        for i in range(count):
            w.write({"__key__": f"{name}{i:04d}", "png": png.getvalue(), "input.png": png.getvalue(),
                     "output.png": png.getvalue(), "txt": f"sample {i}"})
    write_manifest(str(d / "manifest.json"), Manifest(kind="t2i", complete=True, shards=[
        ShardInfo(name="s-000000.tar", samples=count, bytes=(d / "s-000000.tar").stat().st_size, sha256="")]))
    return str(d / "manifest.json")


@pytest.mark.parametrize("preset,counts", [("gen_stage2", (300, 16)), ("gen_stage3", (60, 46, 47))])
def test_preset_shares_are_sample_count_times_repeats(preset, counts, tmp_path):
    """Source i of the preset holds counts[i] samples (the published sizes, scaled down): its
    share of the samples is count x repeats over the total, as the reference's shuffling of
    all per-task batches of its repeated, concatenated sets; the stream draws tasks so."""
    import numpy as np

    from unilip_ds.config import load_config
    from unilip_ds.data.loader import mix_sources
    from unilip_ds.data.stream import MixtureStream
    cfg = load_config(preset, ["model.flavor=tiny", "data.resolution=28"])
    assert cfg.data.train.mix == "samples"
    for i, (src, n) in enumerate(zip(cfg.data.train.sources, counts)):  # a manifest, or its folder
        url = _source_shards(tmp_path, src.name, n)
        src.urls = [url if i % 2 == 0 else url.replace("/manifest.json", "")]
    repeats = {"gen_stage2": (1, 10), "gen_stage3": (1, 1, 3)}[preset]
    sources = mix_sources(cfg.data, cfg.data.train, "train")
    assert [s.weight for s in sources] == [float(n * r) for n, r in zip(counts, repeats)]
    edit_share = sum(n * r for n, r, s in zip(counts, repeats, sources) if s.task == "edit") / \
        sum(n * r for n, r in zip(counts, repeats))
    stream = MixtureStream(sources, [[str(tmp_path / s.name / "s-000000.tar")] for s in sources], cfg.data,
                           batch_size=1, seed=0)
    stream.cfg.shuffle_buffer = 8
    it = iter(stream)
    tasks = np.array([next(it)["__task__"] == "edit" for _ in range(400)])
    assert abs(tasks.mean() - edit_share) < 0.08, (tasks.mean(), edit_share)  # ~3.2 sigma at 400 draws


def test_sample_shares_need_counts(tmp_path):
    from unilip_ds.config import load_config
    from unilip_ds.data import DataError
    from unilip_ds.data.loader import mix_sources
    cfg = load_config("gen_stage3", ["model.flavor=tiny"])
    for src in cfg.data.train.sources:
        src.urls = [str(tmp_path / "shard-{0..3}.tar")]
    with pytest.raises(DataError, match=r"data.train.sources\[0\].samples"):
        mix_sources(cfg.data, cfg.data.train, "train")
    for src, n in zip(cfg.data.train.sources, (60000, 45717, 46489)):
        src.samples = n  # given: no manifest needed
    shares = [s.weight for s in mix_sources(cfg.data, cfg.data.train, "train")]
    assert shares == [60000.0, 45717.0, 46489.0 * 3]


def test_decode_inside_a_bf16_model_runs_an_fp32_decoder(build_gen):
    """Training-time sample grids: the engine holds the frozen decoder in bf16."""
    import copy
    _, model = build_gen()
    fp32_decoder = copy.deepcopy(model.decoder)
    model.to(torch.bfloat16)
    latent = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(0))
    got = model.decode(latent)
    assert model.decoder.dtype == torch.bfloat16  # the model's own decoder is left as it was
    want_model = copy.deepcopy(model)
    want_model.decoder = fp32_decoder.to(torch.bfloat16).float()  # bf16 weights, fp32 maths
    assert torch.equal(got, want_model.decode(latent))
