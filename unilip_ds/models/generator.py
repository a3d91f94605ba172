"""The generator: frozen InternVL3 MLLM (its vision path = the UniLIP encoder +
mlp1) + learnable queries + bidirectional connector + projector + SANA DiT, trained with
rectified flow on UniLIP (or, in gen_stage1, DC-AE) latents.

The condition is computed in two calls, so that a cache of frozen outputs replaces the
first one exactly:

    state = model.prefix(prompts, ref_features)   # frozen LLM over the prompt prefix (no grad):
                                                  # last hidden states + per-layer K/V
    enc, mask = model.condition(state)            # LLM over the query slots attending to the
                                                  # prefix K/V, then connector + projector

The live path is exactly "compute the prefix, then run the queries"; a cache stores `state`.
Model code is single-device code (no DeepSpeed here).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from unilip_ds.models.connector import (LayerKV, QueryConnector, attention_mask, positions, run_layers)
from unilip_ds.models.prompts import PromptBatch
from unilip_ds.models.unilip import IMAGENET_MEAN, IMAGENET_STD, Adapter, DCAEDecoder, normalize

NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class PrefixState:
    """What the frozen LLM computes over the prompt prefix (cacheable: independent of the
    trained parameters). `hidden` is post-norm, with the reference image's positions already
    holding the raw UniLIP features (the dual condition); `kv[l]` are layer l's K/V after RoPE."""
    hidden: torch.Tensor  # (B, P, d)
    kv: List[tuple]  # per LLM layer: (K, V), each (B, kv_heads, P, head_dim)
    mask: torch.Tensor  # (B, P) bool


def train_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Logit-normal draws u in (0, 1) -> sigmas, as the reference picks them: the index
    floor(u x 1000) into FlowMatchEulerDiscreteScheduler's 1000 training timesteps
    (1000 ... 1), i.e. sigma = (1000 - floor(1000 u)) / 1000, then the flow shift."""
    idx = (u * NUM_TRAIN_TIMESTEPS).long()
    s = (NUM_TRAIN_TIMESTEPS - idx).double() / NUM_TRAIN_TIMESTEPS
    return (shift * s / (1 + (shift - 1) * s)).float()


class GenModel(nn.Module):
    """The "model" engine's module of the gen task; also what UniLIPPipeline samples with.

    Frozen (requires_grad False, always in eval mode): `mllm`, `adapter`, `decoder`, `dcae`
    and, when `train_dit` is False, `transformer` (gradients still flow through it)."""

    def __init__(self, mllm: nn.Module, connector: QueryConnector, transformer: nn.Module,
                 adapter: Adapter, decoder: DCAEDecoder, dcae: Optional[nn.Module] = None,
                 target: str = "unilip", latent_scale: float = 1.0, resolution: int = 448,
                 train_dit: bool = True, grad_checkpointing: bool = False):
        super().__init__()
        if target not in ("unilip", "dcae"):
            raise ValueError(f"gen.target: unilip or dcae, got '{target}'")
        if target == "dcae" and dcae is None:
            raise ValueError("gen.target=dcae needs the DC-AE (model.dcae_path)")
        self.mllm = mllm.requires_grad_(False)
        self.adapter = adapter.requires_grad_(False)
        self.decoder = decoder.requires_grad_(False)
        self.dcae = dcae.requires_grad_(False) if dcae is not None else None
        self.connector = connector
        self.transformer = transformer.requires_grad_(train_dit)
        self.target, self.latent_scale, self.resolution = target, latent_scale, resolution
        self.train_dit = train_dit
        self.grad_checkpointing = grad_checkpointing
        connector.grad_checkpointing = grad_checkpointing
        if grad_checkpointing:
            transformer.enable_gradient_checkpointing()

    # -- structure ----------------------------------------------------------------------
    @property
    def llm(self) -> nn.Module:
        return self.mllm.model.language_model

    @property
    def attn_impl(self) -> str:
        return self.llm.config._attn_implementation

    @property
    def dtype(self) -> torch.dtype:
        return self.connector.projector.weight.dtype

    def frozen_modules(self) -> List[nn.Module]:
        out = [self.mllm, self.adapter, self.decoder] + ([self.dcae] if self.dcae is not None else [])
        return out + ([] if self.train_dit else [self.transformer])

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen_modules():  # no dropout / drop-path in frozen parts, ever
            m.eval()
        return self

    # -- frozen encoders ----------------------------------------------------------------
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> (B, N, d_llm) UniLIP features (InternViT + mlp1 output)."""
        pixels = normalize(images, IMAGENET_MEAN, IMAGENET_STD, dtype=self.dtype)  # fp32 maths, then cast
        return self.mllm.model.get_image_features(
            pixels, vision_feature_layer=-1, vision_feature_select_strategy="default").pooler_output

    @torch.no_grad()
    def target_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (already squashed to the target size) -> scaled target latent."""
        if self.target == "dcae":
            z = self.dcae.encode((images.float() * 2 - 1).to(self.dtype)).latent
        else:
            z = self.adapter.to_latent(self.image_features(images))
        return z * self.latent_scale

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> fp32 images in [0, 1], as the reference: the latent divided by the
        scale in fp32, decoded in fp32, clamped, then (UniLIP) the 28/32 bilinear resize to
        `resolution`; DC-AE: its own 512 px."""
        decoder = self.dcae if self.target == "dcae" else self.decoder
        params = list(decoder.parameters())
        if params[0].dtype != torch.float32 and not any(hasattr(p, "ds_id") for p in params):
            # inside a bf16 engine (training-time sample grids): an fp32 copy for this call;
            # a ZeRO-3-partitioned decoder stays in the engine's precision
            decoder = copy.deepcopy(decoder).float()
        z = (latent.float() / self.latent_scale).to(next(decoder.parameters()).dtype)
        out = (decoder.decode(z).sample if self.target == "dcae" else decoder(z)).float().clamp(-1, 1)
        if self.target != "dcae":
            out = F.interpolate(out, size=(self.resolution, self.resolution), mode="bilinear",
                                align_corners=False)
        return (out + 1) / 2

    # -- condition ----------------------------------------------------------------------
    @torch.no_grad()
    def prefix(self, prompts: PromptBatch, ref_features: Optional[torch.Tensor] = None) -> PrefixState:
        """The frozen LLM over the prompt prefixes (cacheable)."""
        llm, mask = self.llm, prompts.mask
        embeds = llm.embed_tokens(prompts.input_ids)
        image_mask = prompts.image_mask.unsqueeze(-1)
        if ref_features is not None:
            embeds = embeds.masked_scatter(image_mask, ref_features.to(embeds.dtype))
        elif bool(prompts.image_mask.any()):
            raise ValueError("edit prompts need the reference image's features")
        attn = attention_mask(self.attn_impl, mask, mask.shape[1], causal=True, dtype=embeds.dtype)
        kv = LayerKV(record=True)
        hidden = run_layers(llm.layers, embeds, llm.rotary_emb, positions(mask), attn, causal=True, kv=kv)
        hidden = llm.norm(hidden)
        if ref_features is not None:  # dual condition: raw features at the image positions
            hidden = hidden.masked_scatter(image_mask, ref_features.to(hidden.dtype))
        return PrefixState(hidden, kv.recorded, mask)

    def llm_hidden(self, state: PrefixState):
        """Query pass: the LLM over the query slots, attending to the prefix K/V. Returns the
        connector's input (B, P + Q, d) (prefix states, then the queries'), its mask and
        position ids."""
        b, p = state.mask.shape
        queries = self.connector.queries(b).to(state.hidden.dtype)
        mask = torch.cat([state.mask, state.mask.new_ones(b, queries.shape[1])], dim=1)
        pos = positions(mask)
        attn = attention_mask(self.attn_impl, mask, queries.shape[1], causal=True, dtype=queries.dtype)
        hq = run_layers(self.llm.layers, queries, self.llm.rotary_emb, pos[:, p:], attn, causal=True,
                        kv=LayerKV(prefix=state.kv), grad_checkpointing=self.grad_checkpointing)
        return torch.cat([state.hidden, self.llm.norm(hq)], dim=1), mask, pos

    def condition(self, state: PrefixState):
        """Query pass + connector + projector -> (caption features (B, T, C), mask (B, T))."""
        hidden, mask, pos = self.llm_hidden(state)
        return self.connector(hidden, mask, pos), mask

    def encode_prompts(self, prompts: PromptBatch, ref_images: Optional[torch.Tensor] = None):
        """Live path: prefix then queries."""
        feats = self.image_features(ref_images) if ref_images is not None else None
        return self.condition(self.prefix(prompts, feats))

    # -- DiT ----------------------------------------------------------------------------
    def velocity(self, x: torch.Tensor, timestep: torch.Tensor, enc: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        return dit_velocity(self.transformer, x, timestep, enc, mask, self.dtype)

    def forward(self, prompts: Optional[PromptBatch], image: Optional[torch.Tensor] = None,
                ref_image: Optional[torch.Tensor] = None, target: Optional[torch.Tensor] = None,
                prefix: Optional[PrefixState] = None, u: Optional[torch.Tensor] = None,
                noise: Optional[torch.Tensor] = None, shift: float = 1.0,
                ref_features: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Rectified-flow loss per sample (fp32, (B,)).

        Targets come from `image` (live) or `target` (a cached scaled latent); the condition
        from `prompts` (+ `ref_image`, or its cached `ref_features`, for edit) or a cached
        `prefix`. `u` (logit-normal draws) and `noise` are drawn here unless given (tests)."""
        x0 = (target if target is not None else self.target_latent(image)).float()
        if prefix is None:
            feats = ref_features if ref_features is not None else \
                self.image_features(ref_image) if ref_image is not None else None
            prefix = self.prefix(prompts, feats)
        enc, mask = self.condition(prefix)
        return flow_loss(self.velocity, x0, enc, mask, u=u, noise=noise, shift=shift)


def dit_velocity(transformer: nn.Module, x: torch.Tensor, timestep: torch.Tensor, enc: torch.Tensor,
                 mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The SANA DiT's velocity for latents `x` at `timestep` (sigma x 1000), conditioned on the
    projected sequence `enc` with its padding `mask`."""
    return transformer(x.to(dtype), encoder_hidden_states=enc.to(dtype), encoder_attention_mask=mask.to(dtype),
                       timestep=timestep.to(x.device), return_dict=False)[0]


def flow_loss(velocity, x0: torch.Tensor, enc: torch.Tensor, mask: torch.Tensor,
              u: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
              shift: float = 1.0) -> Dict[str, torch.Tensor]:
    """Rectified-flow loss per sample (fp32, (B,)) of `velocity(x_t, t, enc, mask)` on clean
    latents x0: x_t = (1 - sigma) x0 + sigma eps, target eps - x0. `u` (logit-normal draws) and
    `noise` are drawn here unless given."""
    b = x0.shape[0]
    if u is None:
        u = torch.sigmoid(torch.randn(b))  # CPU generator: identical on every device
    sigma = train_sigmas(u, shift).to(x0.device)
    if noise is None:  # not randn_like: x0's strides (channels-last from the adapter's
        noise = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device)  # reshape) would reorder it
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    pred = velocity(x_t, sigma * NUM_TRAIN_TIMESTEPS, enc, mask)
    per_sample = (pred.float() - (noise - x0)).pow(2).flatten(1).mean(1)
    return {"loss": per_sample, "sigma": sigma}
