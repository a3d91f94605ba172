"""The UniLIP autoencoder: InternVL's vision path (transformers classes) -> adapter -> DC-AE
decoder (diffusers classes).

    image [0,1] -> ImageNet norm -> InternViT (last layer, no CLS) -> pixel shuffle 0.5
      -> multi_modal_projector (= InternVL's mlp1; the "understanding features")
      -> adapter (3 residual MLPs at d_llm, LN -> Linear(d_llm, 32) -> GELU -> Linear(32, 32))
      -> latent (B, 32, h, w) -> DC-AE decoder (x32) -> [-1, 1] -> resized to input size, [0, 1]

Everything is built from config (no weights read at construction), so it works on the meta
device and under deepspeed.zero.Init. New layers get their trunc-normal(0.02) init inside
their own constructors (`reset_parameters`), because zero.Init partitions a module's
parameters as soon as its constructor returns: a parent re-initialising its children would
only touch empty partitions.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_dc import Decoder
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.models.internvl.modeling_internvl import (InternVLModel, InternVLMultiModalProjector,
                                                            InternVLVisionModel)

from unilip_ds.engine.weights import load_state_dict_into, read_weights_dir, weight_keys
from unilip_ds.models.flavors import Flavor, internvl_config

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsNotFound(FileNotFoundError):
    """A configured pretrained-weights path does not exist or holds no weights."""


# ---------------------------------------------------------------------------------------
# adapter (new layers)
# ---------------------------------------------------------------------------------------
class TruncNormalLinear(nn.Linear):
    """nn.Linear with trunc-normal(0.02) weights and zero bias, set in its constructor."""

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class ResidualMLP(nn.Module):
    """x + Lin(GELU(Lin(LN(x)))); `mlp.{0,1,3}` as in the reference checkpoint."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), TruncNormalLinear(dim, dim), nn.GELU(),
                                 TruncNormalLinear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class Adapter(ModelMixin, ConfigMixin):
    """Understanding features (B, N, d_llm) -> latent tokens (B, N, latent_channels). A
    diffusers model (config + save_pretrained), so the generator's pipeline loads it too."""

    @register_to_config
    def __init__(self, dim: int = 896, latent_channels: int = 32, num_blocks: int = 3):
        super().__init__()
        self.down_blocks = nn.ModuleList(ResidualMLP(dim) for _ in range(num_blocks))
        self.down_mlp = nn.Sequential(nn.LayerNorm(dim), TruncNormalLinear(dim, latent_channels), nn.GELU(),
                                      TruncNormalLinear(latent_channels, latent_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.down_blocks:
            x = block(x)
        return self.down_mlp(x)

    def to_latent(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, N, d_llm) features of a square image -> (B, latent_channels, sqrt N, sqrt N)."""
        z = self(feats)
        b, n, c = z.shape
        side = int(n ** 0.5)
        return z.transpose(1, 2).reshape(b, c, side, side)


# ---------------------------------------------------------------------------------------
# vision path (InternVL's own classes)
# ---------------------------------------------------------------------------------------
class VisionPath(nn.Module):
    """InternVL's vision tower + pixel shuffle + projector. Attribute names match
    InternVLModel, so `model.`-prefixed keys of this module are those of
    InternVLForConditionalGeneration."""

    def __init__(self, flavor: Flavor):
        super().__init__()
        config = internvl_config(flavor)
        self.__dict__["internvl_config"] = config  # not a submodule; written with the export
        self.downsample_ratio = config.downsample_ratio
        self.vision_tower = InternVLVisionModel(config.vision_config)
        self.multi_modal_projector = InternVLMultiModalProjector(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised pixels -> (B, (H/28)*(W/28), d_llm)."""
        hidden = self.vision_tower(pixel_values=pixel_values).last_hidden_state[:, 1:, :]
        b, n, c = hidden.shape
        side = int(n ** 0.5)
        if side * side != n:
            raise ValueError(f"UniLIP needs square inputs; got {n} patches")
        hidden = hidden.reshape(b, side, side, c)
        # InternVLModel.pixel_shuffle does not use its instance; reuse the library's op
        hidden = InternVLModel.pixel_shuffle(None, hidden, scale_factor=self.downsample_ratio)
        hidden = hidden.reshape(b, -1, hidden.shape[-1])
        return self.multi_modal_projector(hidden)


class HFVisionLayout(nn.Module):
    """Export view of a VisionPath: keys `model.vision_tower.*` and
    `model.multi_modal_projector.*`, i.e. exactly those of InternVLForConditionalGeneration."""

    def __init__(self, vision: VisionPath):
        super().__init__()
        self.model = vision

    def save_pretrained(self, out_dir: str | Path, safe_serialization: bool = True) -> None:
        """model.safetensors and InternVL's config.json, like any save_pretrained directory:
        `InternVLForConditionalGeneration.from_pretrained(dir)` loads this vision path (its
        language model, absent here, is initialised; `load_vision_into_internvl` puts the
        vision path into a real InternVL3)."""
        import json
        from unilip_ds.engine.weights import full_state_dict, write_safetensors
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_safetensors(full_state_dict(self), out / "model.safetensors")
        config = self.model.internvl_config.to_dict()
        config["architectures"] = ["InternVLForConditionalGeneration"]
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_vision_into_internvl(internvl: nn.Module, path: str | Path) -> None:
    """Replace the vision path of a transformers InternVLForConditionalGeneration (or
    InternVLModel) with an exported UniLIP encoder + projector. Every vision key must fit."""
    base = internvl.model if hasattr(getattr(internvl, "model", None), "vision_tower") else internvl
    holder = nn.Module()  # a view: the submodules stay owned by `internvl`
    holder.vision_tower = base.vision_tower
    holder.multi_modal_projector = base.multi_modal_projector
    sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in read_weights_dir(path).items()}
    load_state_dict_into(holder, sd, strict=True, what=f"vision export {path}")


# ---------------------------------------------------------------------------------------
# decoder (diffusers' DC-AE decoder)
# ---------------------------------------------------------------------------------------
class DCAEDecoder(ModelMixin, ConfigMixin):
    """The decoder half of diffusers' AutoencoderDC. Its config is AutoencoderDC's and its
    keys are AutoencoderDC's `decoder.*` keys, so it loads from a DC-AE checkpoint directly
    (`from_dcae`) and saves with save_pretrained. UniLIP has no use for the DC-AE encoder
    (the reference drops it too): holding it would cost memory and carry no trained weights."""

    @register_to_config
    def __init__(self, in_channels: int = 3, latent_channels: int = 32, attention_head_dim: int = 32,
                 encoder_block_types=None, decoder_block_types="ResBlock",
                 encoder_block_out_channels=None,
                 decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
                 encoder_layers_per_block=None, decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
                 encoder_qkv_multiscales=None,
                 decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
                 upsample_block_type: str = "pixel_shuffle", downsample_block_type: Optional[str] = None,
                 decoder_norm_types="rms_norm", decoder_act_fns="silu", encoder_out_shortcut: bool = True,
                 decoder_in_shortcut: bool = True, decoder_conv_act_fn: str = "relu",
                 scaling_factor: float = 1.0):
        super().__init__()
        # encoder_* are kept in the config only, so AutoencoderDC.from_config(this.config) works
        self.decoder = Decoder(
            in_channels=in_channels, latent_channels=latent_channels, attention_head_dim=attention_head_dim,
            block_type=_tuple(decoder_block_types), block_out_channels=tuple(decoder_block_out_channels),
            layers_per_block=tuple(decoder_layers_per_block),
            qkv_multiscales=tuple(tuple(q) for q in decoder_qkv_multiscales),
            norm_type=_tuple(decoder_norm_types), act_fn=_tuple(decoder_act_fns),
            upsample_block_type=upsample_block_type, in_shortcut=decoder_in_shortcut,
            conv_act_fn=decoder_conv_act_fn)
        self.spatial_compression_ratio = 2 ** (len(decoder_block_out_channels) - 1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent)

    def enable_checkpointing(self) -> None:
        """Activation checkpointing per decoder block. AutoencoderDC has no switch for it,
        so each block's forward is wrapped on the instance (state-dict keys unchanged);
        non-reentrant, which keeps gradients even where a block input needs none."""
        for stage in self.decoder.up_blocks:
            for block in stage:
                if "forward" not in block.__dict__:
                    block.forward = functools.partial(_checkpointed, type(block).forward, block)

    def load_dcae_weights(self, path: str | Path) -> None:
        """Decoder weights from a diffusers AutoencoderDC directory (or a DCAEDecoder export)."""
        sd = read_weights_dir(_existing(path, "model.dcae_path"), keep=lambda k: k.startswith("decoder."))
        load_state_dict_into(self, sd, strict=True, what=f"DC-AE decoder {path}")


def normalize(images: torch.Tensor, mean, std, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(images - mean) / std computed in fp32, as the reference's image processor (in bf16 the
    constants themselves round: 0.485 -> 0.4844), then cast to `dtype` (default: the images')."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return ((images.float() - m) / s).to(dtype or images.dtype)


def _checkpointed(fn, module, x):
    if torch.is_grad_enabled():
        return checkpoint(fn, module, x, use_reentrant=False)
    return fn(module, x)


def _tuple(v):
    return v if isinstance(v, str) else tuple(v)


def _existing(path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise WeightsNotFound(f"{what}: no such path {path}")
    return p


# ---------------------------------------------------------------------------------------
# the autoencoder
# ---------------------------------------------------------------------------------------
class UniLIP(nn.Module):
    """Images in [0, 1] -> understanding features / 32-channel latent -> images in [0, 1]."""

    def __init__(self, flavor: Flavor):
        super().__init__()
        self.flavor_name = flavor.name
        self.vision = VisionPath(flavor)
        self.adapter = Adapter(flavor.d_llm, flavor.latent_channels)
        self.dcae = DCAEDecoder(**flavor.dcae)

    # -- parts ------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        # constants, not buffers: every tensor of the module is then a weight in its files
        return normalize(images, IMAGENET_MEAN, IMAGENET_STD)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, d_llm): the projector output the MLLM consumes (and the distillation target)."""
        return self.vision(self.normalize(images))

    def latent_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.adapter.to_latent(feats)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 32, H/28, W/28) latent."""
        return self.latent_from_features(self.features(images))

    def decode(self, latent: torch.Tensor, size: Optional[tuple] = None) -> torch.Tensor:
        """Latent -> fp32 images in [0, 1] (unclamped), resized to `size` (default: the size
        the encoder would have taken, 28 px per latent cell). The resize is the reference's:
        bilinear, align_corners=False, no antialias (its released weights were trained so)."""
        out = self.dcae(latent).float()  # [-1, 1], x32; fp32 from here (losses, bf16-less CPU resize)
        if size is None:
            size = (latent.shape[-2] * 28, latent.shape[-1] * 28)
        if tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return (out + 1) / 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images), size=images.shape[-2:])

    # -- setup ------------------------------------------------------------------------
    def enable_gradient_checkpointing(self) -> None:
        self.vision.vision_tower.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
        self.dcae.enable_checkpointing()

    def export_components(self) -> Dict[str, nn.Module]:
        """`vision`: encoder + projector in InternVLForConditionalGeneration's key layout;
        `adapter`: the new layers; `decoder`: the DC-AE decoder (save_pretrained)."""
        return {"vision": HFVisionLayout(self.vision), "adapter": self.adapter, "decoder": self.dcae}


# ---------------------------------------------------------------------------------------
# real weights
# ---------------------------------------------------------------------------------------
_HF_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.",
                "multi_modal_projector.")


def internvl_vision_state_dict(path: str | Path) -> Dict[str, torch.Tensor]:
    """Vision tower + projector weights of an InternVL checkpoint, as VisionPath keys. Accepts
    the transformers (`-hf`) layout and the remote-code layout (`vision_model.*`, `mlp1.*`)."""
    path = _existing(path, "model.internvl_path")
    # the headers say which layout it is; then only the vision path's tensors are read
    # (the language model, most of the file, never is)
    if any(k.startswith("vision_model.") for k in weight_keys(path)):
        from unilip_ds.models.convert import remote_vision_to_hf
        return remote_vision_to_hf(read_weights_dir(path, keep=lambda k: k.startswith(("vision_model.", "mlp1."))),
                                   src_prefix="vision_model.")
    out = {}
    for k, v in read_weights_dir(path, keep=lambda k: k.startswith(_HF_PREFIXES)).items():
        for p in _HF_PREFIXES:
            if k.startswith(p):
                out[k[len("model."):] if p.startswith("model.") else k] = v
                break
    if not out:
        raise WeightsNotFound(f"model.internvl_path: {path} holds no InternVL vision weights")
    return out


def load_internvl_vision(vision: VisionPath, path: str | Path) -> None:
    load_state_dict_into(vision, internvl_vision_state_dict(path), strict=True,
                         what=f"InternVL vision {path}")


# ---------------------------------------------------------------------------------------
# any input size (the reference's 256 px evaluation)
# ---------------------------------------------------------------------------------------
PATCH_MULTIPLE = 28  # patch 14 x pixel shuffle 2: one latent cell


def reconstruct_padded(model: UniLIP, images: torch.Tensor) -> torch.Tensor:
    """Reconstruct images of any size as the reference evaluates 256 px: reflect-pad (split
    evenly, the extra pixel at the bottom / right) to a multiple of 28, encode, decode (x32),
    resize by 28/32 (bilinear, align_corners=True), crop the padding. fp32 in [0, 1], unclamped."""
    h, w = images.shape[-2:]
    ph, pw = -h % PATCH_MULTIPLE, -w % PATCH_MULTIPLE
    top, left = ph // 2, pw // 2
    x = F.pad(images, (left, pw - left, top, ph - top), mode="reflect") if ph or pw else images
    out = model.dcae(model.encode(x)).float()
    hp, wp = out.shape[-2:]
    out = F.interpolate(out, size=(round(hp * 28 / 32), round(wp * 28 / 32)), mode="bilinear",
                        align_corners=True)
    out = out[..., top:top + h, left:left + w]
    return (out + 1) / 2


def reconstruct_any(model: UniLIP, images: torch.Tensor) -> torch.Tensor:
    """Multiples of 28 (224, 448): the training path (`model(images)`); other sizes:
    `reconstruct_padded`."""
    h, w = images.shape[-2:]
    if h % PATCH_MULTIPLE == 0 and w % PATCH_MULTIPLE == 0:
        return model(images)
    return reconstruct_padded(model, images)
