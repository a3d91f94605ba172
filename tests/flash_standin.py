"""TEST-ONLY stand-in for the `flash_attn` (2.x) functions transformers calls, in plain torch,
so that `model.attn_impl=flash` runs on CPU through transformers' real flash-attention
integration (`integrations/flash_attention.py` -> `modeling_flash_attention_utils.
_flash_attention_forward`: unpad by the 2-D mask, `flash_attn_varlen_func`, pad back) and the
project's mask / `is_causal` code.

Semantics follow flash_attn's docstrings (flash_attn_interface.py, 2.x):
  - `flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    dropout_p, softmax_scale, causal, ...)`: q (total_q, H, D), k / v (total_k, H_kv, D), the
    sequences packed back to back at the offsets `cu_seqlens_*` (int32, batch + 1);
  - `flash_attn_func(q, k, v, ...)`: q (B, Sq, H, D), k / v (B, Sk, H_kv, D);
  - H a multiple of H_kv (MQA / GQA: query head h reads kv head h // (H / H_kv));
  - softmax_scale default 1 / sqrt(D);
  - causal: "the causal mask is aligned to the bottom right corner of the attention matrix",
    i.e. query i of a sequence (Sq queries, Sk keys) sees keys j <= i + Sk - Sq; a query row
    with no key allowed outputs 0.
Only dropout_p == 0, no window, softcap, ALiBi or returned probabilities (what the project
uses); anything else raises, so a call the stand-in does not model cannot pass silently.
Unlike the real kernels it accepts fp32 (the tests compare backends in fp32).

`install(monkeypatch)` puts the fake package into sys.modules and makes transformers' FA2
availability check pass for the lazy import; monkeypatch undoes both.
"""

from __future__ import annotations

import importlib.machinery
import math
import sys
import types

import torch
import torch.nn.functional as F

CALLS = {"varlen": 0, "dense": 0}  # how often each entry point ran (tests assert the path taken)


def _check(dropout_p, window_size, softcap, alibi_slopes, return_attn_probs, **extra):
    if dropout_p:
        raise NotImplementedError("flash stand-in: dropout_p must be 0")
    if tuple(window_size) != (-1, -1) or softcap or alibi_slopes is not None or return_attn_probs:
        raise NotImplementedError("flash stand-in: no sliding window, softcap, ALiBi or probabilities")
    extra = {k: v for k, v in extra.items() if v is not None and k not in ("deterministic",)}
    if extra:
        raise NotImplementedError(f"flash stand-in: unsupported arguments {sorted(extra)}")


def _one(q, k, v, scale, causal):
    """One sequence: q (Sq, H, D), k / v (Sk, Hkv, D) -> (Sq, H, D), fp32 maths."""
    sq, h, d = q.shape
    sk, hkv = k.shape[0], k.shape[1]
    if h % hkv:
        raise ValueError(f"flash stand-in: {h} query heads, {hkv} kv heads")
    rep = h // hkv
    kf = k.float().repeat_interleave(rep, dim=1)  # (Sk, H, D)
    vf = v.float().repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale
    if causal:
        qi = torch.arange(sq, device=q.device)[:, None]
        kj = torch.arange(sk, device=q.device)[None, :]
        keep = kj <= qi + (sk - sq)  # bottom-right aligned
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # a row with no key: output 0
    return torch.einsum("hqk,khd->qhd", probs, vf).to(q.dtype)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False,
                           block_table=None):
    _check(dropout_p, window_size, softcap, alibi_slopes, return_attn_probs, block_table=block_table)
    CALLS["varlen"] += 1
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if len(cq) != len(ck) or cq[-1] != q.shape[0] or ck[-1] != k.shape[0]:
        raise ValueError("flash stand-in: cu_seqlens do not match the packed q / k")
    if max(b - a for a, b in zip(cq, cq[1:])) > max_seqlen_q or max(b - a for a, b in zip(ck, ck[1:])) > max_seqlen_k:
        raise ValueError("flash stand-in: a sequence is longer than max_seqlen")
    outs = [_one(q[a:b], k[c:e], v[c:e], scale, causal) for a, b, c, e in zip(cq, cq[1:], ck, ck[1:])]
    return torch.cat(outs, dim=0)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    _check(dropout_p, window_size, softcap, alibi_slopes, return_attn_probs)
    CALLS["dense"] += 1
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return torch.stack([_one(q[i], k[i], v[i], scale, causal) for i in range(q.shape[0])])


def flash_attn_with_kvcache(*args, **kwargs):
    raise NotImplementedError("flash stand-in: flash_attn_with_kvcache (paged decoding) is not modelled")


# flash_attn.bert_padding, as documented there
def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """(B, S, ...) + (B, S) mask -> (total, ...), indices, cu_seqlens, max_seqlen, seqused."""
    every = attention_mask + unused_mask if unused_mask is not None else attention_mask
    seqlens = every.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(every.flatten(), as_tuple=False).flatten()
    cu = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return flat[indices], indices, cu, int(seqlens.max()), attention_mask.sum(dim=-1, dtype=torch.int32)


def pad_input(hidden_states, indices, batch, seqlen):
    out = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    out[indices] = hidden_states
    return out.view(batch, seqlen, *hidden_states.shape[1:])


def _modules():
    pkg = types.ModuleType("flash_attn")
    pkg.__version__ = "2.7.4.post1"
    pkg.__path__ = []  # a package: `flash_attn.bert_padding` imports
    pkg.flash_attn_func = flash_attn_func
    pkg.flash_attn_varlen_func = flash_attn_varlen_func
    pkg.flash_attn_with_kvcache = flash_attn_with_kvcache
    pkg.__file__ = __file__
    pkg.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None, is_package=True)
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.__spec__ = importlib.machinery.ModuleSpec("flash_attn.bert_padding", None)
    padding.pad_input, padding.unpad_input = pad_input, unpad_input
    pkg.bert_padding = padding
    return {"flash_attn": pkg, "flash_attn.bert_padding": padding}


def install(monkeypatch) -> None:
    """The fake `flash_attn` in sys.modules; transformers' FA2 check (which also wants CUDA and
    the pip distribution) answers True for the lazy import, whose cached choice is reset on
    entry and, by monkeypatch, on exit."""
    import diffusers  # noqa: F401  (imported before: its own flash-attn probe must not see the stand-in)
    import transformers.integrations.flash_attention as fa_integration
    import transformers.modeling_flash_attention_utils as fa_utils
    for name, mod in _modules().items():
        monkeypatch.setitem(sys.modules, name, mod)
    yes = lambda *a, **k: True  # noqa: E731
    monkeypatch.setattr(fa_utils, "is_flash_attn_2_available", yes)  # the lazy import's check
    # PreTrainedModel's dispatch check (at __init__ and on a CPU model) reads this matrix
    matrix = fa_utils.FLASH_ATTENTION_COMPATIBILITY_MATRIX
    monkeypatch.setitem(matrix, 2, {**matrix[2], "general_availability_check": yes,
                                    "supported_devices": ((yes, "cpu (flash stand-in)"),)})
    for name in ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn",
                 "_pad_fn", "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn"):
        monkeypatch.setattr(fa_utils, name, None)
    # causal masks bottom-right (flash_attn >= 2.1), as with the real package installed
    assert fa_integration._use_top_left_mask is False
