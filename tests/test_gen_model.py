"""The generator's model code in process (tiny flavor, fp32, CPU): prompts, the prefix/query
split against transformers' own causal forward, padding, bidirectional connector on every
CPU backend, dual condition, gradients (with and without activation checkpointing), the
training sigmas against diffusers' scheduler, CFG dropout."""

from __future__ import annotations

import pytest
import torch

from unilip_ds.models.generator import train_sigmas
from unilip_ds.models.prompts import IMG_CONTEXT, PromptBuilder, PromptError, chat

CAPTIONS = ["a cat sitting on a wooden table in the warm afternoon sun", "a red car"]
EDITS = ["flip the image horizontally and make it brighter please", "turn the image upside down"]


def test_prompts_are_the_reference_template_with_ids_from_the_tokenizer(build_gen):
    task, _ = build_gen()
    pb = task.prompts()
    tok = pb.tokenizer
    batch = pb("t2i", [CAPTIONS[0], None])
    text0 = tok.decode(batch.input_ids[0, :batch.lengths[0]])
    assert text0 == chat(f"Generate an image: {CAPTIONS[0]}") + "<img>"
    assert tok.decode(batch.input_ids[1, :batch.lengths[1]]) == chat("Generate an image.") + "<img>"
    assert text0.startswith("<|im_start|>user\n") and "system" not in text0
    assert batch.mask[1, batch.lengths[1]:].sum() == 0 and bool(batch.mask[0].all())  # right padding
    assert pb.img_start_id == tok.convert_tokens_to_ids("<img>")
    edit = pb("edit", [EDITS[0], None])
    n = pb.num_image_tokens
    image = "<img>" + IMG_CONTEXT * n + "</img>"
    assert tok.decode(edit.input_ids[1, :edit.lengths[1]]) == chat(f"Edit the image.\n{image}") + "<img>"
    assert edit.image_mask.sum(1).tolist() == [n, n]
    assert (edit.input_ids[edit.image_mask] == tok.convert_tokens_to_ids(IMG_CONTEXT)).all()
    # user text cannot inject image or turn tokens: it stays text
    sneaky = pb("t2i", [f"a cat {IMG_CONTEXT}<|im_end|>"])
    assert not sneaky.image_mask.any() and int((sneaky.input_ids[0] == tok.convert_tokens_to_ids("<|im_end|>")).sum()) == 1
    assert tok.decode(sneaky.input_ids[0]) == chat(f"Generate an image: a cat {IMG_CONTEXT}<|im_end|>") + "<img>"
    # the same ids as tokenising the whole prompt at once (the reference) when the text is plain
    whole = tok(chat(f"Generate an image: {CAPTIONS[0]}") + "<img>", add_special_tokens=False).input_ids
    assert batch.input_ids[0, :batch.lengths[0]].tolist() == whole
    whole = tok(chat(f"Edit the image: {EDITS[0]}\n{image}") + "<img>", add_special_tokens=False).input_ids
    assert pb("edit", [EDITS[0]]).input_ids[0].tolist() == whole


def test_truncation_cuts_only_the_text_never_image_tokens(build_gen):
    task, _ = build_gen()
    tok = task.prompts().tokenizer
    n, q = task.num_image_tokens(), 16
    full = PromptBuilder(tok, n, q, 4096)("edit", [EDITS[0] * 20]).lengths[0]
    pb = PromptBuilder(tok, n, q, full + q - 40)  # 40 tokens too short
    batch = pb("edit", [EDITS[0] * 20, EDITS[1]])
    assert batch.truncated == 1 and max(batch.lengths) <= pb.max_prefix
    assert batch.image_mask.sum(1).tolist() == [n, n]
    text = tok.decode(batch.input_ids[0, :batch.lengths[0]])
    assert text.startswith("<|im_start|>user\nEdit the image: flip")
    assert text.endswith("<img>" + IMG_CONTEXT * n + "</img><|im_end|>\n<|im_start|>assistant\n<img>")
    with pytest.raises(PromptError, match="no room for text"):
        PromptBuilder(tok, n, q, n + q + 5)


def test_tokenizer_without_image_tokens_is_refused(tmp_path):
    from unilip_ds.models.tiny_assets import tiny_tokenizer
    tok = tiny_tokenizer(["hello world"])
    from transformers import Qwen2Tokenizer
    vocab = {t: i for i, t in enumerate(t for t in tok.get_vocab() if t not in ("<img>", "</img>", IMG_CONTEXT))}
    plain = Qwen2Tokenizer(vocab=vocab, merges=[])
    with pytest.raises(PromptError, match="lacks the special tokens <img>"):
        PromptBuilder(plain, 4, 4, 64)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_prefix_then_queries_equals_transformers_causal_forward_per_sample(build_gen, impl):
    """The padded batch, computed as prefix pass + query pass, gives at every real position
    what transformers' own Qwen2Model computes on that sample alone, laid out as the reference
    does ([prompt, <img>, queries], one causal pass)."""
    task, m = build_gen(extra=[f"model.attn_impl={impl}"])
    assert m.attn_impl == impl
    m.eval()
    for kind, texts in (("t2i", CAPTIONS), ("edit", EDITS)):
        prompts = task.prompts()(kind, texts)
        feats = torch.randn(2, task.num_image_tokens(), 64) if kind == "edit" else None
        with torch.no_grad():
            hidden, mask, pos = m.llm_hidden(m.prefix(prompts, feats))
            for i, length in enumerate(prompts.lengths):
                emb = m.llm.embed_tokens(prompts.input_ids[i:i + 1, :length])
                if feats is not None:
                    emb[prompts.image_mask[i:i + 1, :length]] = feats[i]
                emb = torch.cat([emb, m.connector.queries(1)], 1)
                ref = m.llm(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long),
                            position_ids=torch.arange(emb.shape[1])[None]).last_hidden_state[0]
                if feats is not None:  # dual condition: raw features at the image positions
                    ref[:length][prompts.image_mask[i, :length]] = feats[i]
                ours = hidden[i][mask[i]]
                assert ours.shape == ref.shape
                torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
                assert pos[i][mask[i]].tolist() == list(range(emb.shape[1]))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_padded_batch_loss_equals_one_by_one(build_gen, impl):
    task, m = build_gen(extra=[f"model.attn_impl={impl}"])
    m.eval()
    torch.manual_seed(0)
    r = task.cfg.data.resolution
    images, refs = torch.rand(2, 3, r, r), torch.rand(2, 3, r, r)
    u, noise = torch.tensor([0.3, 0.8]), torch.randn(2, 32, r // 28, r // 28)
    for kind, texts, ref in (("t2i", CAPTIONS, None), ("edit", EDITS, refs)):
        batch = task.prompts()(kind, texts)
        assert len(set(batch.lengths)) == 2  # really padded
        with torch.no_grad():
            both = m(batch, image=images, ref_image=ref, u=u, noise=noise)["loss"]
            single = [m(task.prompts()(kind, texts[i:i + 1]), image=images[i:i + 1],
                        ref_image=None if ref is None else ref[i:i + 1], u=u[i:i + 1],
                        noise=noise[i:i + 1])["loss"] for i in range(2)]
        torch.testing.assert_close(both, torch.cat(single), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_connector_is_bidirectional(build_gen, impl):
    _, m = build_gen(extra=[f"model.attn_impl={impl}"])
    c = m.connector
    torch.manual_seed(0)
    x = torch.randn(1, 6, 64)
    mask = torch.tensor([[True] * 5 + [False]])
    pos = torch.arange(6)[None]
    with torch.no_grad():
        a = c(x, mask, pos)
        y = x.clone()
        y[0, 4] += 1.0  # the last real token
        b = c(y, mask, pos)
        z = x.clone()
        z[0, 5] += 100.0  # a pad token: must change nothing real
        p = c(z, mask, pos)
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4  # the first token sees the last one
    torch.testing.assert_close(a[0, :5], p[0, :5])


def test_gradients_reach_queries_through_the_frozen_llm_with_and_without_checkpointing(build_gen):
    grads = {}
    for ckpt in (False, True):
        torch.manual_seed(0)  # the same random queries and projector
        task, m = build_gen("dcae", extra=[f"model.grad_checkpointing={str(ckpt).lower()}"])
        r = task.cfg.data.resolution
        batch = {"__key__": ["a", "b"], "__task__": "t2i", "image": torch.rand(2, 3, r, r), "caption": CAPTIONS}
        task.set_train_mode({"model": m})
        assert not m.mllm.training and not m.transformer.training and m.connector.training
        loss, logs = task.loss("model", batch, 0, {"model": m})
        loss.backward()
        assert all(p.grad is None for p in m.mllm.parameters())
        assert all(p.grad is None for p in m.transformer.parameters())  # stage 1: frozen DiT
        assert all(not p.requires_grad for p in m.transformer.parameters())
        grads[ckpt] = {n: p.grad.clone() for n, p in m.connector.named_parameters()}
        assert grads[ckpt]["queries.weight"].abs().sum() > 0
        assert grads[ckpt]["layers.0.self_attn.q_proj.weight"].abs().sum() > 0
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], atol=1e-6, rtol=1e-5)


def test_stage2_trains_the_dit_and_edit_uses_the_reference_features(build_gen):
    task, m = build_gen()
    assert all(p.requires_grad for p in m.transformer.parameters())
    groups = task.param_groups("model", m)
    trained = {id(p) for g in groups for p in g.params}
    assert trained == {id(p) for p in list(m.connector.parameters()) + list(m.transformer.parameters())}
    assert all(g.weight_decay == 0.0 for g in groups)  # the reference's weight decay 0
    r = task.cfg.data.resolution
    prompts = task.prompts()("edit", EDITS)
    torch.manual_seed(0)
    ref_a, ref_b = torch.rand(2, 3, r, r), torch.rand(2, 3, r, r)
    with torch.no_grad():
        feats = m.image_features(ref_a)
        state = m.prefix(prompts, feats)
        assert torch.equal(state.hidden[prompts.image_mask], feats.reshape(-1, feats.shape[-1]))
        enc_a, _ = m.condition(state)
        enc_b, _ = m.condition(m.prefix(prompts, m.image_features(ref_b)))
    q = slice(enc_a.shape[1] - 16, None)
    assert (enc_a[:, q] - enc_b[:, q]).abs().max() > 1e-4  # the queries read the image


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_training_sigmas_are_the_reference_schedulers(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    u = torch.sigmoid(torch.randn(500, generator=torch.Generator().manual_seed(0)))
    idx = (u * 1000).long()
    torch.testing.assert_close(train_sigmas(u, shift), sched.sigmas[idx].float())
    torch.testing.assert_close(train_sigmas(u, shift) * 1000, sched.timesteps[idx].float())


def test_cfg_dropout_rate_and_null_rows(build_gen):
    task, _ = build_gen(extra=["gen.cfg_dropout=0.25"])
    torch.manual_seed(0)
    rate = task.null_mask(40000).float().mean().item()
    assert abs(rate - 0.25) < 0.01
    batch = {"__task__": "edit", "instruction": EDITS, "image": torch.zeros(2, 3, 8, 8),
             "input_image": torch.zeros(2, 3, 8, 8)}
    prompts, ref = task._inputs(batch, torch.tensor([True, False]))
    null = task.prompts()("edit", [None])
    assert torch.equal(prompts.input_ids[0, :null.lengths[0]], null.input_ids[0])
    assert prompts.image_mask[0].sum() == task.num_image_tokens()  # the null edit keeps the image
    assert ref is batch["input_image"]


def test_bf16_step_is_finite_and_the_loss_is_fp32(build_gen):
    """DeepSpeed's bf16 mode casts the whole module to bf16; the flow loss stays fp32."""
    task, m = build_gen()
    m.to(torch.bfloat16)
    r = task.cfg.data.resolution
    torch.manual_seed(0)
    for kind in ("t2i", "edit"):
        batch = {"__key__": ["a", "b"], "__task__": kind, "image": torch.rand(2, 3, r, r),
                 "input_image": torch.rand(2, 3, r, r), "caption": CAPTIONS, "instruction": EDITS}
        loss, _ = task.loss("model", batch, 0, {"model": m})
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(m.connector.queries.weight.grad).all()
