"""The flash-attention path on CPU (issue 19, part 1). `tests/flash_standin.py` stands in for
the `flash_attn` package (plain torch, flash_attn's documented semantics), installed only
here, so `model.attn_impl=flash` runs through transformers' real flash-attention integration
(unpadding by the 2-D mask, `flash_attn_varlen_func` with cu_seqlens, bottom-right causal
alignment for the query pass over the prefix K/V) and the project's mask / `is_causal` code.

- the stand-in against an explicit-mask reference (padded layout, masks built here: it cannot
  agree by construction) and against flash_attn's documented causal example;
- the frozen LLM's prefix pass and query pass and the bidirectional connector give the same
  hidden states, K/V and gradients under flash as under SDPA and eager: padded batches of
  mixed prompt lengths, T2I and edit (the vision tower also runs on the stand-in there),
  activation checkpointing on (the gen presets)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests import flash_standin as FS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from flash_agree import condition_path  # noqa: E402

CAPTIONS = ["a cat sitting on a wooden table in the warm afternoon sun", None]
EDITS = ["flip the image horizontally and make it brighter please", None]


# -- the stand-in itself -----------------------------------------------------------------
def _reference(qs, ks, vs, scale, causal):
    """Padded batch + an explicit (B, H, Sq, Sk) mask, float64: the plain textbook attention."""
    b, h, d = len(qs), qs[0].shape[1], qs[0].shape[2]
    hkv = ks[0].shape[1]
    sq, sk = max(len(q) for q in qs), max(len(k) for k in ks)
    q = torch.zeros(b, sq, h, d, dtype=torch.float64)
    k = torch.zeros(b, sk, hkv, d, dtype=torch.float64)
    v = torch.zeros(b, sk, hkv, d, dtype=torch.float64)
    allowed = torch.zeros(b, 1, sq, sk, dtype=torch.bool)
    for i, (qi, ki, vi) in enumerate(zip(qs, ks, vs)):
        lq, lk = len(qi), len(ki)
        q[i, :lq], k[i, :lk], v[i, :lk] = qi, ki, vi
        for r in range(lq):
            for c in range(lk):
                allowed[i, 0, r, c] = (not causal) or c - r <= lk - lq
    k = k.repeat_interleave(h // hkv, dim=2)
    v = v.repeat_interleave(h // hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return [out[i, :len(qi)] for i, qi in enumerate(qs)]


def test_standin_matches_an_explicit_mask_reference_and_the_documented_alignment():
    from transformers.modeling_flash_attention_utils import _pad_input, _unpad_input
    # flash_attn's docstring: seqlen_q=2, seqlen_k=5 keeps [[1,1,1,1,0],[1,1,1,1,1]];
    # seqlen_q=5, seqlen_k=2 keeps [[0,0],[0,0],[0,0],[1,0],[1,1]], an all-0 row outputs 0.
    # With equal scores and V = one-hot key ids, the output rows are the kept masks normalized.
    for (lq, lk), kept in {(2, 5): [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],
                           (5, 2): [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]}.items():
        q, k = torch.zeros(lq, 1, lk), torch.zeros(lk, 1, lk)
        v = torch.eye(lk).unsqueeze(1)
        out = FS.flash_attn_varlen_func(q, k, v, torch.tensor([0, lq], dtype=torch.int32),
                                        torch.tensor([0, lk], dtype=torch.int32), lq, lk, causal=True)
        kept = torch.tensor(kept, dtype=torch.float32)
        torch.testing.assert_close(out[:, 0], kept / kept.sum(1, keepdim=True).clamp(min=1))

    g = torch.Generator().manual_seed(0)
    h, hkv, d, scale = 4, 2, 8, 0.3  # GQA, a softmax scale that is not 1/sqrt(d)
    for causal in (True, False):
        for lens in ([(3, 3), (5, 5), (1, 1)], [(2, 7), (4, 4), (3, 9)]):  # prefix pass; query pass
            qs = [torch.randn(lq, h, d, generator=g) for lq, _ in lens]
            ks = [torch.randn(lk, hkv, d, generator=g) for _, lk in lens]
            vs = [torch.randn(lk, hkv, d, generator=g) for _, lk in lens]
            cu_q = torch.tensor([0] + [sum(lq for lq, _ in lens[:i + 1]) for i in range(3)], dtype=torch.int32)
            cu_k = torch.tensor([0] + [sum(lk for _, lk in lens[:i + 1]) for i in range(3)], dtype=torch.int32)
            out = FS.flash_attn_varlen_func(torch.cat(qs), torch.cat(ks), torch.cat(vs), cu_q, cu_k,
                                            max(lq for lq, _ in lens), max(lk for _, lk in lens),
                                            softmax_scale=scale, causal=causal)
            ref = torch.cat(_reference(qs, ks, vs, scale, causal)).float()
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        q, k, v = (torch.randn(2, 6, n, d, generator=g) for n in (h, hkv, hkv))
        ref = torch.stack(_reference(list(q), list(k), list(v), d ** -0.5, causal)).float()
        torch.testing.assert_close(FS.flash_attn_func(q, k, v, causal=causal), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="dropout"):
        FS.flash_attn_func(q, k, v, dropout_p=0.1)
    # bert_padding's pair, as transformers' own copies of it
    x, mask = torch.randn(3, 5, 2), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    ours, theirs = FS.unpad_input(x, mask), _unpad_input(x, mask)
    for a, b in zip(ours, theirs):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    assert torch.equal(FS.pad_input(ours[0], ours[1], 3, 5), _pad_input(ours[0], ours[1], 3, 5))


# -- the model on every backend -----------------------------------------------------------
@pytest.fixture(scope="module")
def flash_gen(gen_assets):
    """A gen_stage2 task + model built with model.attn_impl=flash (fp32, activation
    checkpointing as the preset), the stand-in installed for this module only."""
    from unilip_ds.config import load_config
    from unilip_ds.tasks.base import MAIN, build_task
    with pytest.MonkeyPatch.context() as mp:
        FS.install(mp)
        cfg = load_config("gen_stage2", gen_assets.overrides() + [
            "data.train.sources=[]", "data.train.urls=[/nonexistent]", "train.precision=fp32",
            "model.attn_impl=flash", "model.grad_checkpointing=true"])
        task = build_task(cfg)
        modules = task.build_modules()
        task.load_pretrained(modules)
        yield task, modules[MAIN]


def _set_impl(m, impl: str) -> None:
    m.mllm.config._attn_implementation = impl  # the LLM's and the vision tower's sub-configs
    m.connector.set_attn_implementation(impl)
    assert m.attn_impl == impl and m.mllm.config.vision_config._attn_implementation == impl


def _run(task, m, kind, texts, images, refs):
    """Everything the condition path computes, at real positions only, and the gradients of
    a loss on every real connector output w.r.t. the query pass's output, the queries and the
    connector's weights (through the checkpointed recompute): the GPU check's
    flash_agree.condition_path, on a padded batch of mixed prompt lengths."""
    prompts = task.prompts()(kind, texts)
    assert len(set(prompts.lengths)) == len(texts)  # really padded, mixed lengths
    width = prompts.mask.shape[1] + m.connector.config.num_queries
    weights = torch.randn(len(texts), width, m.connector.config.caption_channels,
                          generator=torch.Generator().manual_seed(1))
    out = condition_path(m, prompts, refs, weights)
    assert "grad.connector.queries.weight" in out and "grad.connector.layers.0.self_attn.q_proj.weight" in out
    return out


@pytest.mark.parametrize("kind", ["t2i", "edit"])
def test_flash_equals_sdpa_and_eager_on_the_llm_passes_and_the_connector(flash_gen, kind):
    task, m = flash_gen
    assert m.attn_impl == "flash_attention_2"  # model.attn_impl=flash, through the config
    m.train()
    texts = CAPTIONS if kind == "t2i" else EDITS
    r = task.cfg.data.resolution
    refs = torch.rand(2, 3, r, r, generator=torch.Generator().manual_seed(0)) if kind == "edit" else None
    results = {}
    for impl in ("flash_attention_2", "sdpa", "eager"):
        _set_impl(m, impl)
        before = dict(FS.CALLS)
        results[impl] = _run(task, m, kind, texts, None, refs)
        if impl == "flash_attention_2":
            # the padded batch is unpadded (varlen) in the LLM and connector; the vision
            # tower (edit) has no padding: the dense entry point
            assert FS.CALLS["varlen"] > before["varlen"]
            assert (FS.CALLS["dense"] > before["dense"]) == (kind == "edit")
        else:
            assert FS.CALLS == before
    _set_impl(m, "flash_attention_2")
    flash = results.pop("flash_attention_2")
    for impl, other in results.items():
        assert flash.keys() == other.keys()
        for key in flash:
            # fp32 summation-order noise reaches ~3e-5 on single gradient elements; a broken mask or
            # is_causal moves 7-97% of the elements by far more
            torch.testing.assert_close(flash[key], other[key], atol=1e-4, rtol=1e-4,
                                       msg=lambda s, key=key, impl=impl: f"{key} flash vs {impl}: {s}")
    assert flash["grad.connector.queries.weight"].abs().sum() > 0
