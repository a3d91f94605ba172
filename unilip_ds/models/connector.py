"""The learnable half of the generator's condition path, and the decoder-layer runner it
shares with the frozen LLM.

`QueryConnector` (a diffusers ModelMixin, saved as one component) holds
  - the 256 learnable queries (N(0, 1) init), the LLM's input embeddings at the query slots;
  - the connector: a copy of the LLM's last 6 Qwen2 decoder layers, its final RMSNorm and its
    rotary embedding (no token embedding), run BIDIRECTIONALLY with the padding mask;
  - the projector Linear(d_llm, caption_channels=2304), applied to every token.

`run_layers` runs Qwen2 decoder layers (transformers' own classes) with an explicit mask for
the configured attention backend and, optionally, K/V of a prefix computed earlier: the
same code serves the causal LLM (prefix pass, query pass) and the bidirectional connector,
on eager, SDPA and flash-attention 2 alike. The attention direction is passed to every layer
as `is_causal` (never left to a module default that a backend might read differently).
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

FLASH = "flash_attention_2"
KV = Tuple[torch.Tensor, torch.Tensor]  # (B, kv_heads, T, head_dim) each, after RoPE


def resolve_attn_impl(name: str) -> str:
    """model.attn_impl -> a transformers attention implementation name."""
    if name == "auto":
        import importlib.util
        flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
        return FLASH if flash else "sdpa"
    return {"flash": FLASH, "sdpa": "sdpa", "eager": "eager"}[name]


def attention_mask(impl: str, kv_mask: torch.Tensor, q_len: int, causal: bool,
                   dtype: torch.dtype) -> torch.Tensor:
    """The mask the attention backend expects. `kv_mask` (B, K) marks real keys; the queries
    are the last `q_len` of the K positions (so causal = bottom-right aligned).

    flash: the 2-D padding mask (it unpads; causality comes from `is_causal`);
    sdpa: boolean (B, 1, q, K), True = attend; eager: additive float (B, 1, q, K)."""
    if impl == FLASH:
        return kv_mask.to(torch.int32)
    b, k = kv_mask.shape
    allowed = kv_mask[:, None, None, :].expand(b, 1, q_len, k)
    if causal:
        tri = torch.ones(q_len, k, dtype=torch.bool, device=kv_mask.device).tril(diagonal=k - q_len)
        allowed = allowed & tri
    if impl == "sdpa":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=kv_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class LayerKV:
    """What an attention layer sees as `past_key_values` (its `update` is all it calls).

    Prefix pass: records each layer's K/V and returns them unchanged. Query pass: returns
    the layer's prefix K/V with the new ones appended, without mutating anything, so an
    activation-checkpointed layer recomputes exactly what it computed the first time."""

    def __init__(self, prefix: Optional[Sequence[KV]] = None, record: bool = False):
        self.prefix = prefix
        self.recorded: List[KV] = [] if record else None

    def update(self, key, value, layer_idx, *args, **kwargs) -> KV:
        if self.recorded is not None:
            self.recorded.append((key, value))
            return key, value
        pk, pv = self.prefix[layer_idx]
        return torch.cat([pk.to(key.dtype), key], dim=2), torch.cat([pv.to(value.dtype), value], dim=2)


def run_layers(layers: Sequence[nn.Module], hidden: torch.Tensor, rotary: nn.Module,
               position_ids: torch.Tensor, mask: torch.Tensor, causal: bool,
               kv: Optional[LayerKV] = None, grad_checkpointing: bool = False) -> torch.Tensor:
    """Qwen2 decoder layers over `hidden` (B, T, d) at `position_ids` (B, T)."""
    position_embeddings = rotary(hidden, position_ids)
    for layer in layers:
        fn = functools.partial(layer, attention_mask=mask, position_ids=position_ids,
                               past_key_values=kv, position_embeddings=position_embeddings,
                               is_causal=causal)
        if grad_checkpointing and torch.is_grad_enabled():
            hidden = checkpoint(fn, hidden, use_reentrant=False)
        else:
            hidden = fn(hidden)
    return hidden


def positions(mask: torch.Tensor) -> torch.Tensor:
    """position_ids = cumsum(mask) - 1, clamped at 0 (the reference's rule)."""
    return (mask.long().cumsum(1) - 1).clamp_(min=0)


def qwen2_config(text_config: dict, num_layers: int, attn_impl: Optional[str] = None) -> Qwen2Config:
    cfg = Qwen2Config(**{k: v for k, v in text_config.items() if k != "model_type"})
    cfg.num_hidden_layers = num_layers
    cfg.layer_types = ["full_attention"] * num_layers
    if attn_impl:
        cfg._attn_implementation = attn_impl
    return cfg


class LearnedQueries(nn.Module):
    """The query embeddings; a module of their own so that ZeRO-3 gathers them in a forward."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, num, dim))  # N(0, 1), as the reference

    def forward(self, batch: int) -> torch.Tensor:
        return self.weight.expand(batch, -1, -1)


class QueryConnector(ModelMixin, ConfigMixin):
    """Queries + bidirectional connector + projector (see the module docstring)."""

    @register_to_config
    def __init__(self, text_config: Optional[dict] = None, num_layers: int = 6, num_queries: int = 256,
                 caption_channels: int = 2304):
        super().__init__()
        self.qwen2 = qwen2_config(text_config or {}, num_layers, "sdpa")
        d = self.qwen2.hidden_size
        self.queries = LearnedQueries(num_queries, d)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(self.qwen2, i) for i in range(num_layers))
        self.norm = Qwen2RMSNorm(d, eps=self.qwen2.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(self.qwen2)
        self.projector = nn.Linear(d, caption_channels)
        self.grad_checkpointing = False

    def set_attn_implementation(self, impl: str) -> None:
        self.qwen2._attn_implementation = impl

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """LLM outputs (B, T, d) with padding `mask` (B, T) -> caption features (B, T, C)."""
        impl = self.qwen2._attn_implementation
        attn = attention_mask(impl, mask, hidden.shape[1], causal=False, dtype=hidden.dtype)
        hidden = run_layers(self.layers, hidden, self.rotary_emb, position_ids, attn, causal=False,
                            grad_checkpointing=self.grad_checkpointing)
        return self.projector(self.norm(hidden))

    def load_from_llm(self, llm_state: dict, num_llm_layers: int) -> dict:
        """This module's connector keys from a Qwen2 language model's state dict (keys
        `layers.N.*`, `norm.weight`): the last `num_layers` layers and the final norm."""
        first = num_llm_layers - self.config.num_layers
        out = {}
        for k, v in llm_state.items():
            if k.startswith("layers."):
                idx, rest = k[len("layers."):].split(".", 1)
                if int(idx) >= first:
                    out[f"layers.{int(idx) - first}.{rest}"] = v
            elif k == "norm.weight":
                out[k] = v
        return out
