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
