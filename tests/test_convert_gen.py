"""Import of the released UniLIP generators (python -m unilip_ds.models.convert_gen).

A tiny generator is written IN THE REFERENCE'S LAYOUT, as its `save_pretrained` would write
`UniLIP_InternVLForCausalLM`: config.json (model_type unilip_internvl + n_query, connect_layer,
unilip_factor, ...), the tokenizer, and the weights under the reference's key names:
the remote-code InternViT (fused qkv, ls1, norm1, ...) and mlp1 (0, 1, 3), the language model,
`model.latent_queries`, `model.llm_connector.*`, `model.projector.*`, `model.dit.*` and
`model.vae_decoder.*` (adapter + DC-AE decoder). transformers 4.52 (the reference's pin)
writes InternVL's legacy names on save (`language_model.model.*`, `vision_tower.*`, ...);
that variant is sharded, the other one uses the current names.

The CLI runs as a subprocess; the export must hold every original tensor and sample the
same images as a pipeline built directly from the original modules.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.launch_util import check, one_line_error, run

FACTOR = 7.25  # the checkpoint's unilip_factor (any value: it must reach the export)

# transformers 4.52 InternVLForConditionalGeneration._checkpoint_conversion_mapping; its
# save_pretrained applies the reverse (pattern = value, unanchored, first hit wins)
INTERNVL_452_MAPPING = {"^language_model.model": "model.language_model", "^vision_tower": "model.vision_tower",
                        "^multi_modal_projector": "model.multi_modal_projector",
                        "^language_model.lm_head": "lm_head"}

# transformers InternVLVision -> remote-code InternViT (the inverse of convert.py's renames)
HF_TO_REMOTE = [(r"^embeddings\.cls_token$", "embeddings.class_embedding"),
                (r"^embeddings\.position_embeddings$", "embeddings.position_embedding"),
                (r"^embeddings\.patch_embeddings\.projection\.", "embeddings.patch_embedding."),
                (r"^encoder\.layer\.(\d+)\.attention\.projection_layer\.", r"encoder.layers.\1.attn.proj."),
                (r"^encoder\.layer\.(\d+)\.lambda_1$", r"encoder.layers.\1.ls1"),
                (r"^encoder\.layer\.(\d+)\.lambda_2$", r"encoder.layers.\1.ls2"),
                (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"encoder.layers.\1.norm1."),
                (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"encoder.layers.\1.norm2."),
                (r"^encoder\.layer\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp.")]
QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")
PROJECTOR_TO_MLP1 = {"layer_norm": "0", "linear_1": "1", "linear_2": "3"}


def hf_vision_to_remote(vision: dict) -> dict:
    out, qkv = {}, {}
    for k, v in vision.items():
        m = QKV.match(k)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
            continue
        for pat, rep in HF_TO_REMOTE:
            if re.match(pat, k):
                out[re.sub(pat, rep, k)] = v
                break
        else:
            raise AssertionError(f"no remote-code name for {k}")
    for (layer, leaf), parts in qkv.items():
        out[f"encoder.layers.{layer}.attn.qkv.{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def save_452(sd: dict) -> dict:
    """The key renaming transformers 4.52's save_pretrained applies to an InternVL model."""
    reverse = {v: k for k, v in INTERNVL_452_MAPPING.items()}
    out = {}
    for key, value in sd.items():
        for pattern, replacement in reverse.items():
            key, n = re.subn(pattern, replacement.lstrip("^"), key)
            if n:
                break
        out[key] = value
    return out


def reference_state_dict(model, legacy: bool) -> dict:
    """The reference model's state dict (current transformers names; `legacy`: as 4.52 saves it)."""
    from unilip_ds.engine.weights import full_state_dict
    mllm, conn = full_state_dict(model.mllm), full_state_dict(model.connector)
    sd = {}
    vision = {k[len("model.vision_tower."):]: v for k, v in mllm.items() if k.startswith("model.vision_tower.")}
    sd.update({f"model.vision_tower.{k}": v for k, v in hf_vision_to_remote(vision).items()})
    for k, v in mllm.items():
        if k.startswith("model.multi_modal_projector."):
            name, leaf = k[len("model.multi_modal_projector."):].split(".", 1)
            sd[f"model.multi_modal_projector.{PROJECTOR_TO_MLP1[name]}.{leaf}"] = v
        elif k.startswith("model.language_model.") or k == "lm_head.weight":
            sd[k] = v
    sd["model.latent_queries"] = conn["queries.weight"]
    for k, v in conn.items():
        if k.startswith(("layers.", "norm.")):
            sd[f"model.llm_connector.{k}"] = v
        elif k.startswith("projector."):
            sd[f"model.{k}"] = v
    sd.update({f"model.dit.{k}": v for k, v in full_state_dict(model.transformer).items()})
    sd.update({f"model.vae_decoder.{k}": v for k, v in full_state_dict(model.adapter).items()})
    sd.update({f"model.vae_decoder.{k}": v for k, v in full_state_dict(model.decoder).items()})
    return save_452(sd) if legacy else sd


def save_reference(root: Path, model, tokenizer, sd: dict, shards: int = 1) -> Path:
    """What the reference's save_pretrained leaves: config.json, weights (sharded with an
    index beyond one shard), tokenizer files."""
    from safetensors.torch import save_file
    root.mkdir(parents=True)
    config = model.mllm.config.to_dict()
    config.update(model_type="unilip_internvl", architectures=["UniLIP_InternVLForCausalLM"],
                  n_query=model.connector.config.num_queries, connect_layer=len(model.connector.layers),
                  mllm_path="OpenGVLab/InternVL3-1B", mllm_hf_path="OpenGVLab/InternVL3-1B-hf",
                  vae_path="mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers",
                  dit_path="Efficient-Large-Model/Sana_600M_512px_diffusers", unilip_factor=FACTOR)
    (root / "config.json").write_text(json.dumps(config, indent=1))
    keys = sorted(sd)
    if shards == 1:
        save_file({k: sd[k].contiguous() for k in keys}, str(root / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = keys[i::shards]
            save_file({k: sd[k].contiguous() for k in part}, str(root / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        (root / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
             "weight_map": weight_map}))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(root))
    return root


@pytest.fixture(scope="module")
def original(gen_assets):
    """The tiny generator (fp32) whose weights the reference checkpoint holds."""
    from unilip_ds.config import load_config
    from unilip_ds.tasks.base import MAIN, build_task
    cfg = load_config("gen_stage2", gen_assets.overrides() + [
        "data.train.sources=[]", "data.train.urls=[/nonexistent]", "train.precision=fp32"])
    task = build_task(cfg)
    modules = task.build_modules()
    task.load_pretrained(modules)
    model = modules[MAIN].eval()
    torch.manual_seed(5)
    with torch.no_grad():  # the connector must not equal the LLM layers it was copied from
        for p in model.connector.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.latent_scale = FACTOR
    return task, model


@pytest.fixture(scope="module")
def converted(original, tmp_path_factory):
    """The legacy-named (4.52), sharded reference checkpoint, converted by the CLI."""
    task, model = original
    root = tmp_path_factory.mktemp("convert_gen")
    src = save_reference(root / "UniLIP-tiny", model, task.prompts().tokenizer,
                         reference_state_dict(model, legacy=True), shards=2)
    out = root / "export"
    proc = check(run("-m", ["unilip_ds.models.convert_gen", "--src", str(src), "--out", str(out)]))
    return src, out, json.loads(proc.stdout)


def _assert_same_tensors(pipe, model, dtype=None):
    from unilip_ds.engine.weights import full_state_dict
    for name in ("mllm", "connector", "transformer", "adapter", "decoder"):
        got, want = full_state_dict(getattr(pipe, name)), full_state_dict(getattr(model, name))
        assert got.keys() == want.keys(), name
        for k in want:
            w = want[k].to(dtype) if dtype is not None else want[k]
            assert got[k].dtype == w.dtype and torch.equal(got[k], w), f"{name}: {k}"


def test_reference_layout_is_what_the_reference_saves(original):
    """The fixture's layout, checked against the names read from the reference source."""
    _, model = original
    sd = reference_state_dict(model, legacy=True)
    assert "language_model.model.embed_tokens.weight" in sd and "language_model.lm_head.weight" in sd
    assert "vision_tower.encoder.layers.0.attn.qkv.weight" in sd and "vision_tower.encoder.layers.0.ls1" in sd
    assert "vision_tower.embeddings.class_embedding" in sd and "multi_modal_projector.3.weight" in sd
    assert sd["model.latent_queries"].shape == (1, 16, 64)
    assert {k.split(".")[3] for k in sd if k.startswith("model.llm_connector.layers.")} == {"0"}
    assert "model.llm_connector.norm.weight" in sd and "model.projector.bias" in sd
    assert any(k.startswith("model.vae_decoder.down_blocks.0.mlp.") for k in sd)
    assert any(k.startswith("model.vae_decoder.down_mlp.3.") for k in sd)
    assert any(k.startswith("model.vae_decoder.decoder.") for k in sd)
    assert any(k.startswith("model.dit.transformer_blocks.") for k in sd)
    assert not any(k.startswith(("model.language_model.", "model.vision_tower.", "lm_head")) for k in sd)


def test_conversion_keeps_every_tensor(original, converted):
    from omegaconf import OmegaConf

    from unilip_ds.inference.pipeline import UniLIPPipeline
    task, model = original
    src, out, summary = converted
    assert summary["flavor"] == "tiny" and summary["latent_scale"] == FACTOR and summary["dtype"] == "float32"
    assert set(summary["components"]) - {"dcae"} == {"mllm", "tokenizer", "connector", "transformer",
                                                      "scheduler", "adapter", "decoder"}
    counts = summary["tensors"]
    assert counts["connector"] == len(model.connector.state_dict())
    assert counts["transformer"] == len(model.transformer.state_dict())
    assert counts["adapter"] == len(model.adapter.state_dict())
    assert counts["decoder"] == len(model.decoder.state_dict())
    assert counts["mllm"] == len(model.mllm.state_dict())
    assert summary["tensors_total"] == sum(counts[n] for n in ("mllm", "connector", "transformer", "adapter",
                                                               "decoder"))
    assert json.loads((out / "export.json").read_text())["source"] == str(src.resolve())
    cfg = OmegaConf.load(out / "config.yaml")
    assert cfg.model.flavor == "tiny" and cfg.run.task == "gen" and cfg.gen.target == "unilip"
    assert cfg.gen.latent_scale == FACTOR and cfg.data.resolution == 224

    pipe = UniLIPPipeline.from_pretrained(str(out))
    assert pipe.dcae is None and pipe.config.latent_scale == FACTOR and pipe.config.resolution == 224
    _assert_same_tensors(pipe, model)
    tok = task.prompts().tokenizer
    assert pipe.tokenizer.get_vocab() == tok.get_vocab()
    text = "<|im_start|>user\nGenerate an image: a cat<|im_end|>\n<|im_start|>assistant\n<img>"
    assert pipe.tokenizer(text).input_ids == tok(text).input_ids


def test_converted_pipeline_samples_like_the_original(original, converted):
    from PIL import Image

    from unilip_ds.inference.pipeline import UniLIPPipeline
    task, model = original
    _, out, _ = converted
    pipe = UniLIPPipeline.from_pretrained(str(out))
    # the released DiT was trained under diffusers 0.32: with SANA's fixed positional embedding
    assert json.loads((out / "transformer" / "config.json").read_text())["interpolation_scale"] == 1
    assert pipe.transformer.patch_embed.pos_embed is not None
    ref = UniLIPPipeline.from_gen_model(model, task.prompts().tokenizer, task.cfg)
    image = Image.new("RGB", (80, 64), (40, 160, 90))
    for p in (pipe, ref):
        p.set_progress_bar_config(disable=True)

    def sample(p, **kw):
        return p(num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="pt", **kw).images

    a, b = sample(pipe, prompt=["a cat", "a red car"]), sample(ref, prompt=["a cat", "a red car"])
    assert a.shape == (2, 3, 224, 224) and torch.equal(a, b)
    # editing reads the reference image through the converted (remote-code) vision tower
    a, b = sample(pipe, prompt=["flip it"], image=[image]), sample(ref, prompt=["flip it"], image=[image])
    assert torch.equal(a, b)


def test_current_key_names_single_file_and_bf16(original, gen_assets, tmp_path):
    """Later transformers write the current InternVL names; a stray rotary buffer is tolerated;
    a SANA DC-AE under `model.vae.*` (the published build_sana holds none) becomes `dcae/`;
    --dtype bf16 casts every weight."""
    from diffusers import AutoencoderDC

    from unilip_ds.engine.weights import full_state_dict
    from unilip_ds.inference.pipeline import UniLIPPipeline
    task, model = original
    sd = reference_state_dict(model, legacy=False)
    sd["model.llm_connector.rotary_emb.inv_freq"] = model.connector.rotary_emb.inv_freq.clone()
    dcae = full_state_dict(AutoencoderDC.from_pretrained(str(gen_assets.dcae)))
    sd.update({f"model.vae.{k}": v for k, v in dcae.items()})
    src = save_reference(tmp_path / "src", model, task.prompts().tokenizer, sd)
    out = tmp_path / "out"
    summary = json.loads(check(run("-m", ["unilip_ds.models.convert_gen", "--src", str(src), "--out", str(out),
                                          "--dtype", "bf16"])).stdout)
    assert summary["dtype"] == "bfloat16" and summary["tensors"]["dropped_rotary_buffers"] == 1
    pipe = UniLIPPipeline.from_pretrained(str(out), dtype=torch.bfloat16)
    _assert_same_tensors(pipe, model, dtype=torch.bfloat16)
    assert "dcae" in summary["components"] and summary["tensors"]["dcae"] == len(dcae)
    got = full_state_dict(pipe.dcae)
    assert got.keys() == dcae.keys() and all(torch.equal(got[k], v.bfloat16()) for k, v in dcae.items())
    from safetensors import safe_open
    with safe_open(str(out / "connector" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def _fails(capsys, args, match):
    """convert_gen's main in process: exit code 2 and one stderr line matching `match`."""
    from unilip_ds.models.convert_gen import main
    line = one_line_error(main, args, capsys)
    assert re.search(match, line), line
    return line


def test_one_line_errors(original, converted, gen_assets, tmp_path, capsys):
    task, model = original
    src, out, _ = converted
    _fails(capsys, ["--src", str(src), "--out", str(out)], r"--out .* exists and is not empty")
    _fails(capsys, ["--src", str(gen_assets.internvl), "--out", str(tmp_path / "a")],
           r"not a reference UniLIP checkpoint \(config.json model_type 'internvl'")
    _fails(capsys, ["--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a")], r"not a directory")
    tok = task.prompts().tokenizer
    sd = reference_state_dict(model, legacy=True)
    del sd["model.projector.bias"]
    bad = save_reference(tmp_path / "missing", model, tok, sd)
    _fails(capsys, ["--src", str(bad), "--out", str(tmp_path / "b")],
           r"connector: 1 missing \(e\.g\. \['model\.projector\.bias'\]\)")
    sd = reference_state_dict(model, legacy=True)
    sd["model.latent_queries"] = sd["model.latent_queries"][:, :8]
    bad = save_reference(tmp_path / "shape", model, tok, sd)
    _fails(capsys, ["--src", str(bad), "--out", str(tmp_path / "c")], r"latent_queries has shape \(1, 8, 64\)")
    sd = reference_state_dict(model, legacy=True)
    sd["model.something_else.weight"] = torch.zeros(2)
    bad = save_reference(tmp_path / "unknown", model, tok, sd)
    _fails(capsys, ["--src", str(bad), "--out", str(tmp_path / "d")], r"keys of no known part .*something_else")
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_tokenizer_from_elsewhere(original, gen_assets, tmp_path, capsys):
    """A checkpoint saved without its tokenizer: one error line naming --tokenizer, then the
    InternVL3 directory's tokenizer through --tokenizer."""
    from transformers import AutoTokenizer
    task, model = original
    src = save_reference(tmp_path / "src", model, None, reference_state_dict(model, legacy=True))
    _fails(capsys, ["--src", str(src), "--out", str(tmp_path / "a")], r"no tokenizer in .*pass --tokenizer")
    out = tmp_path / "out"
    summary = json.loads(check(run("-m", ["unilip_ds.models.convert_gen", "--src", str(src), "--out", str(out),
                                          "--tokenizer", str(gen_assets.internvl)])).stdout)
    assert summary["tokenizer"] == str(gen_assets.internvl)
    got = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert got.get_vocab() == task.prompts().tokenizer.get_vocab()
