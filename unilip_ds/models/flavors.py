"""Model flavors: the dimensions of the UniLIP autoencoder, its discriminator and the
generator (queries, connector, SANA DiT).

`tiny` is random and small enough for a CPU step in tests; `1b` / `2b` carry the real
dimensions (InternViT-300M-448px + Qwen2.5 0.5B / 1.5B, DC-AE f32c32 SANA decoder,
Sana_600M_512px / Sana_1600M_512px), so real weights from `model.internvl_path`,
`model.dcae_path` and `model.sana_path` fit them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Tuple


@dataclass(frozen=True)
class Flavor:
    name: str
    vision: Dict[str, Any]  # InternVLVisionConfig kwargs
    text: Dict[str, Any]  # Qwen2 config kwargs (only hidden_size matters to the autoencoder)
    dcae: Dict[str, Any]  # AutoencoderDC config kwargs (the decoder half is built)
    disc_channels: int = 128
    disc_mults: Tuple[int, ...] = (1, 2, 4)  # level widths x disc_channels: 128 -> 128 -> 256 -> 512
    disc_groups: int = 32
    latent_channels: int = 32
    downsample_ratio: float = 0.5
    # perceptual nets: real widths (published weights) unless narrowed for the tiny flavor
    vgg_width_div: int = 1
    convnext_dims: Tuple[int, ...] = (96, 192, 384, 768)
    convnext_depths: Tuple[int, ...] = (3, 3, 27, 3)
    classifier_size: int = 224
    # generator
    sana: Dict[str, Any] = field(default_factory=dict)  # SanaTransformer2DModel config kwargs
    num_queries: int = 256
    connector_layers: int = 6  # copies of the LLM's last decoder layers
    # target latent x this in the UniLIP space (gen_stage2/3); the DC-AE space uses dcae's
    # scaling_factor (0.41407)
    unilip_latent_scale: float = 10.6
    gen_resolution: int = 448  # UniLIP-space targets and edit reference images

    @property
    def d_llm(self) -> int:
        return self.text["hidden_size"]


# InternViT-300M-448px-V2.5, the vision tower of InternVL3-1B/2B (transformers layout)
_INTERNVIT_300M = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
    image_size=448, patch_size=14, attention_bias=True, use_qk_norm=False, norm_type="layer_norm",
    layer_norm_eps=1e-6, layer_scale_init_value=0.1, use_mean_pooling=True, hidden_act="gelu")

# mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers (the 1.0 architecture, improved decoder)
_DCAE_F32C32_SANA = dict(
    in_channels=3, latent_channels=32, attention_head_dim=32,
    encoder_block_types=["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock",
                         "EfficientViTBlock"],
    decoder_block_types=["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock",
                         "EfficientViTBlock"],
    encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    encoder_layers_per_block=[2, 2, 2, 3, 3, 3], decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
    encoder_qkv_multiscales=[[], [], [], [5], [5], [5]], decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    upsample_block_type="interpolate", downsample_block_type="Conv", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407)

# Qwen2.5 settings shared by InternVL3-1B/2B's language models
_QWEN25 = dict(model_type="qwen2", rope_theta=1000000.0, rms_norm_eps=1e-6,
               max_position_embeddings=32768, hidden_act="silu", tie_word_embeddings=False,
               vocab_size=151674)

# Efficient-Large-Model/Sana_600M_512px_diffusers, transformer/config.json as published
# (interpolation_scale unset: gen_loading.sana_config makes the positional embedding explicit)
_SANA_600M_512 = dict(
    in_channels=32, out_channels=32, num_attention_heads=36, attention_head_dim=32, num_layers=28,
    num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152,
    caption_channels=2304, mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=16,
    patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None)
# Efficient-Large-Model/Sana_1600M_512px_diffusers
_SANA_1600M_512 = dict(_SANA_600M_512, num_attention_heads=70, num_layers=20,
                       num_cross_attention_heads=20, cross_attention_head_dim=112,
                       cross_attention_dim=2240)

FLAVORS: Dict[str, Flavor] = {
    "tiny": Flavor(
        name="tiny",
        vision=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    image_size=224, patch_size=14, attention_bias=True, use_qk_norm=False,
                    norm_type="layer_norm", layer_norm_eps=1e-6, layer_scale_init_value=0.1,
                    use_mean_pooling=True, hidden_act="gelu"),
        text=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1024, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=False),
        # still x32 (six stages, five upsamplings), just narrow and one layer per stage
        dcae=dict(_DCAE_F32C32_SANA, attention_head_dim=8,
                  encoder_block_out_channels=[8, 8, 16, 16, 32, 32],
                  decoder_block_out_channels=[8, 8, 16, 16, 32, 32],
                  encoder_layers_per_block=[1, 1, 1, 1, 1, 1], decoder_layers_per_block=[1, 1, 1, 1, 1, 1]),
        disc_channels=16, disc_mults=(1, 2, 2), disc_groups=8,
        vgg_width_div=8, convnext_dims=(16, 32, 64, 128), convnext_depths=(1, 1, 1, 1), classifier_size=64,
        # DiT width 128 = 4 x the latent's 32 channels (SANA's is 36 x): at width 32 a tiny DiT
        # did not learn in 3000 steps to carry a condition token to its place in the output,
        # even given the target itself with a position code (README, "Does the condition
        # reach the image?")
        sana=dict(_SANA_600M_512, num_attention_heads=4, attention_head_dim=32, num_layers=2,
                  num_cross_attention_heads=4, cross_attention_head_dim=32, cross_attention_dim=128,
                  caption_channels=64, sample_size=8),
        num_queries=16, connector_layers=1, gen_resolution=224),
    "1b": Flavor(
        name="1b", vision=_INTERNVIT_300M,
        text=dict(_QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2),
        dcae=_DCAE_F32C32_SANA, sana=_SANA_600M_512, unilip_latent_scale=10.6),
    "2b": Flavor(
        name="2b", vision=_INTERNVIT_300M,
        text=dict(_QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2),
        dcae=_DCAE_F32C32_SANA, sana=_SANA_1600M_512, unilip_latent_scale=9.5),
}


def get_flavor(name: str) -> Flavor:
    if name not in FLAVORS:
        from unilip_ds.config import ConfigError
        raise ConfigError(f"config key 'model.flavor': unknown flavor '{name}' (known: {', '.join(FLAVORS)})")
    return FLAVORS[name]


def internvl_config(flavor: Flavor):
    """The transformers InternVLConfig whose vision path this flavor is."""
    from transformers import InternVLConfig
    return InternVLConfig(vision_config=dict(flavor.vision), text_config=dict(flavor.text),
                          downsample_ratio=flavor.downsample_ratio, projector_hidden_act="gelu")
