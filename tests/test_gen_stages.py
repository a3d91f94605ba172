"""The three generator stages as users chain them, 2 processes through launch/train.py and
launch/export.py's export, on the tiny flavor from files in the real layouts:

    gen_stage1 (ZeRO-3, torchrun)  from InternVL3 -hf + recon export + SANA + DC-AE directories
      -> export (a UniLIPPipeline directory)
      -> gen_stage2 (ZeRO-3, torchrun, T2I + edit batches) model.init_from=<export>
      -> export -> gen_stage3 (ZeRO-2, deepspeed launcher) -> export
      -> UniLIPPipeline.from_pretrained, generate/edit

Frozen parts are compared bit for bit with the files they came from; what trains is checked
to have moved (and the DiT only from stage 2). gen_stage1's frozen parts under ZeRO-2:
tests/test_lean_checkpoints.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch

from tests.launch_util import check, run, start_error, tiny_gen_args, with_overrides
from unilip_ds.engine import checkpoint
from unilip_ds.engine.export import consolidated, export
from unilip_ds.engine.weights import read_weights_dir
from unilip_ds.models.gen_loading import mllm_state_dict


def _metrics(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _component(export: Path, name: str) -> Dict[str, torch.Tensor]:
    sd = mllm_state_dict(export / name) if name == "mllm" else read_weights_dir(export / name)
    return {k: v.float() for k, v in sd.items()}


def _same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], keys=None) -> bool:
    keys = keys if keys is not None else a.keys()
    return all(torch.equal(a[k].float(), b[k].float()) for k in keys)


@pytest.fixture(scope="module")
def chain(gen_assets, sample_shards, sample_edit_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_chain")
    runs, exports = {}, {}
    init = None
    # stage 2 is also the uninterrupted run of the resume test (_resume_args: ZeRO-3, seed 3)
    for stage, ds, launcher, steps in (("gen_stage1", "ds_configs/zero3.json", "torchrun", 2),
                                       ("gen_stage2", "ds_configs/zero3.json", "torchrun", 4),
                                       ("gen_stage3", "ds_configs/zero2.json", "deepspeed", 2)):
        out = root / stage
        extra = ["data.log_keys=true"] + (["run.seed=3"] if stage == "gen_stage2" else [])
        if stage == "gen_stage3":  # sample grids: fixed prompts + held-out edit pairs
            extra += ["train.sample_every=2", "gen.sample_steps=2", "data.eval.sources=[{name: e, task: edit, "
                      f"urls: [{sample_edit_shards.dir}]}}, {{name: t, task: t2i, urls: [{sample_shards.dir}]}}]"]
        check(run("launch/train.py", tiny_gen_args(out, stage, gen_assets, sample_shards.dir,
                                                   sample_edit_shards.dir, steps=steps, ds=ds,
                                                   init_from=init, extra=extra),
                  nproc=2, launcher=launcher))
        exports[stage] = root / f"{stage}_export"
        export(out, exports[stage])  # launch/export.py's function (the CLI: test_training)
        runs[stage] = out
        init = exports[stage]
    return runs, exports


def test_stage1_trains_queries_and_connector_only(chain, gen_assets):
    runs, exports = chain
    out, exp = runs["gen_stage1"], exports["gen_stage1"]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all("loss/flow" in r and "grad_norm/model" in r for r in rows)
    assert checkpoint.latest_tag(out) == "step_00000002"
    info = json.loads((exp / "export.json").read_text())
    assert info["weights"] == "raw"  # the gen presets keep no EMA, as the reference
    assert info["components"] == ["adapter", "connector", "dcae", "decoder", "mllm", "scheduler",
                                  "tokenizer", "transformer"]
    # frozen parts: bit-identical to the files they were loaded from
    internvl = mllm_state_dict(gen_assets.internvl)
    mllm = _component(exp, "mllm")
    vision = {("model." + k if not k.startswith("model.") else k): v
              for k, v in read_weights_dir(gen_assets.recon / "vision").items()}
    assert _same(mllm, internvl, [k for k in mllm if "language_model" in k or k == "lm_head.weight"])
    assert _same(mllm, vision, list(vision))  # the vision path is the recon export's encoder
    assert _same(_component(exp, "transformer"), read_weights_dir(gen_assets.sana / "transformer"))
    assert _same(_component(exp, "dcae"), read_weights_dir(gen_assets.dcae))
    for name in ("adapter", "decoder"):
        assert _same(_component(exp, name), read_weights_dir(gen_assets.recon / name))
    # the connector started as the LLM's last layer and has trained
    conn = _component(exp, "connector")
    last = "model.language_model.layers.1."
    start = {k: v for k, v in internvl.items() if k.startswith(last)}
    assert not _same({k[len(last):]: v for k, v in start.items()},
                     {k[len("layers.0."):]: v for k, v in conn.items() if k.startswith("layers.0.")})
    assert conn["queries.weight"].shape == (1, 16, 64)


def test_stage2_trains_the_dit_on_t2i_and_edit_and_keeps_frozen_parts(chain):
    runs, exports = chain
    s1, s2 = exports["gen_stage1"], exports["gen_stage2"]
    keys = [json.loads(x) for x in (runs["gen_stage2"] / "keys" / "rank0.jsonl").read_text().splitlines()]
    rows = _metrics(runs["gen_stage2"])
    seen = {t for r in rows for t in ("t2i", "edit") if f"loss/flow_{t}" in r}
    assert seen == {"t2i", "edit"}, rows  # both tasks in 4 steps (mix 0.5 / 0.5, seed 3)
    assert len(keys) == 4
    for name in ("mllm", "adapter", "decoder"):
        assert _same(_component(s2, name), _component(s1, name)), name
    assert not _same(_component(s2, "transformer"), _component(s1, "transformer"))
    assert not _same(_component(s2, "connector"), _component(s1, "connector"))
    assert not (s2 / "dcae").exists()  # the UniLIP latent space needs no DC-AE
    assert json.loads((s2 / "model_index.json").read_text())["target"] == "unilip"


def test_stage3_continues_from_stage2_and_writes_sample_grids(chain):
    from PIL import Image
    runs, exports = chain
    grids = sorted(p.name for p in (runs["gen_stage3"] / "samples").iterdir())
    assert grids == ["step0000002_edit.png", "step0000002_t2i.png"]
    t2i = Image.open(runs["gen_stage3"] / "samples" / grids[1])
    from unilip_ds.inference.sampling import LABEL_H
    assert t2i.size == (224 * 4, LABEL_H + 224)  # the four default gen.sample_prompts, headed by each
    # header input | edited | target, then 2 rows each under its instruction
    assert Image.open(runs["gen_stage3"] / "samples" / grids[0]).size == (224 * 3, LABEL_H + 2 * (LABEL_H + 224))
    meta = checkpoint.read_meta(runs["gen_stage3"], checkpoint.latest_tag(runs["gen_stage3"]))
    assert meta["config"]["model"]["init_from"] == str(exports["gen_stage2"])
    assert not _same(_component(exports["gen_stage3"], "transformer"), _component(exports["gen_stage2"], "transformer"))
    assert _same(_component(exports["gen_stage3"], "mllm"), _component(exports["gen_stage1"], "mllm"))


def test_pipeline_generates_and_edits_and_honours_its_arguments(chain, sample_edit_shards):
    from PIL import Image

    from unilip_ds.inference.pipeline import UniLIPPipeline
    _, exports = chain
    pipe = UniLIPPipeline.from_pretrained(str(exports["gen_stage3"]))
    pipe.set_progress_bar_config(disable=True)

    def gen(**kw):
        args = dict(prompt=["a cat", "a red car"], num_inference_steps=3, guidance_scale=4.5,
                    generator=torch.Generator().manual_seed(0), output_type="pt")
        args.update(kw)
        return pipe(**args).images

    base = gen()
    assert base.shape == (2, 3, 224, 224) and 0 <= base.min() and base.max() <= 1
    assert torch.equal(base, gen())  # same seed, same images
    for change in (dict(num_inference_steps=5), dict(guidance_scale=1.0),
                   dict(generator=torch.Generator().manual_seed(1))):
        assert not torch.allclose(base, gen(**change)), change
    many = gen(num_images_per_prompt=2, generator=[torch.Generator().manual_seed(i) for i in range(4)])
    assert many.shape[0] == 4
    img = Image.new("RGB", (96, 64), (200, 30, 30))
    edited = pipe(image=[img], prompt=["flip the image horizontally"], num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0)).images
    assert len(edited) == 1 and edited[0].size == (224, 224)


def test_generate_and_edit_clis(chain, tmp_path, sample_edit_shards, capsys):
    from PIL import Image
    _, exports = chain
    ckpt = str(exports["gen_stage2"])
    out = tmp_path / "gen"
    (tmp_path / "prompts.txt").write_text("a bowl of fruit\n\na rocket\n")
    check(run("-m", ["unilip_ds.inference.generate", "--ckpt", ckpt, "--prompt", "a cat", "--prompts-file",
                     str(tmp_path / "prompts.txt"), "--steps", "2", "--num-images", "2", "--seed", "7",
                     "--batch-size", "2", "--out", str(out)]))
    meta = json.loads((out / "run.json").read_text())
    assert meta["device"] == "cpu" and meta["dtype"] == "fp32" and meta["steps"] == 2
    assert [r["prompt"] for r in meta["images"]] == ["a cat"] * 2 + ["a bowl of fruit"] * 2 + ["a rocket"] * 2
    assert [r["seed"] for r in meta["images"]] == list(range(7, 13))
    assert all((out / r["file"]).is_file() for r in meta["images"])
    # an image depends on its seed only, not on its batch (the CLI's main in process)
    from unilip_ds.inference.generate import main
    solo = tmp_path / "solo"
    assert main(["--ckpt", ckpt, "--prompt", "a rocket", "--steps", "2", "--seed", "11", "--out", str(solo)]) == 0
    a = torch.from_numpy(np.asarray(Image.open(solo / "000_0.png"), dtype=np.int16))
    b = torch.from_numpy(np.asarray(Image.open(out / "002_0.png"), dtype=np.int16))
    assert (a - b).abs().max() <= 1  # same pixels (batched float rounding at most 1 level)

    src = tmp_path / "in.png"
    Image.new("RGB", (120, 80), (10, 200, 30)).save(src)
    edits = tmp_path / "edit"
    assert main(["--ckpt", ckpt, "--image", str(src), "--instruction", "flip the image horizontally",
                 "--steps", "2", "--flow-shift", "2.0", "--out", str(edits)], edit=True) == 0
    meta = json.loads((edits / "run.json").read_text())
    assert meta["task"] == "edit" and meta["flow_shift"] == 2.0
    assert (edits / "000_0_side_by_side.png").is_file()
    capsys.readouterr()
    assert main(["--ckpt", ckpt, "--image", str(src), "--instruction", "x", "--out", str(edits)], edit=True) == 2
    assert "not empty" in capsys.readouterr().err


def _resume_args(out, assets, shards, edit_shards, init, extra=()):
    return tiny_gen_args(out, "gen_stage2", assets, shards.dir, edit_shards.dir, steps=4,
                         ds="ds_configs/zero3.json", init_from=init, extra=["data.log_keys=true", *extra])


def test_stage2_under_zero3_resumes_bit_identically(chain, gen_assets, sample_shards, sample_edit_shards,
                                                     tmp_path):
    init, full, split = chain[1]["gen_stage1"], chain[0]["gen_stage2"], tmp_path / "split"
    cfg = checkpoint.read_meta(full, "step_00000004")["config"]  # the chain's stage 2 is the full run
    assert cfg["run"]["seed"] == 3 and cfg["deepspeed"]["config"].endswith("zero3.json")
    check(run("launch/train.py", _resume_args(split, gen_assets, sample_shards, sample_edit_shards, init,
                                              ["run.seed=3", "train.stop_after=2"]), nproc=2, launcher="torchrun"))
    assert checkpoint.latest_tag(split) == "step_00000002"
    proc = check(run("launch/train.py", _resume_args(split, gen_assets, sample_shards, sample_edit_shards, init,
                                                     ["run.seed=3"]), nproc=2, launcher="torchrun"))
    assert "resumed from" in proc.stdout
    a, b = consolidated(full, False)[1], consolidated(split, False)[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = _metrics(full), _metrics(split)
    assert [r["step"] for r in mb] == [1, 2, 3, 4]
    tasks = set()
    for ra, rb in zip(ma, mb):
        assert ra["loss/flow"] == rb["loss/flow"] and ra["data/cfg_null_frac"] == rb["data/cfg_null_frac"]
        tasks |= {t for t in ("t2i", "edit") if f"loss/flow_{t}" in ra}
    assert tasks == {"t2i", "edit"}  # mixed T2I / edit across the resume (seed 3)
    for r in (0, 1):
        assert (full / "keys" / f"rank{r}.jsonl").read_text() == (split / "keys" / f"rank{r}.jsonl").read_text()


def _bad(tmp_path, capsys, args):
    line = start_error(args, capsys)
    assert not (tmp_path / "bad_run").exists()  # nothing written in the run dir every bad configuration names
    return line


def test_bad_generator_inputs_are_one_line_errors(chain, gen_assets, sample_shards, sample_edit_shards, tmp_path,
                                                  capsys):
    import shutil
    base = tiny_gen_args(tmp_path / "bad_run", "gen_stage1", gen_assets, sample_shards.dir, steps=1)
    bad = lambda args: _bad(tmp_path, capsys, args)  # noqa: E731
    assert "model.sana_path" in bad(with_overrides(base, [f"model.sana_path={tmp_path / 'nope'}"]))
    assert "flavor 1b needs" in bad(["--config", "gen_stage1", f"data.train.urls=[{sample_shards.dir}]",
                                     f"run.output_dir={tmp_path / 'bad_run'}"])
    # a tokenizer without InternVL's image tokens
    bad_tok = tmp_path / "internvl_no_img"
    shutil.copytree(gen_assets.internvl, bad_tok)
    from transformers import Qwen2Tokenizer
    from unilip_ds.models.tiny_assets import tiny_tokenizer
    vocab = [t for t in tiny_tokenizer([]).get_vocab() if t not in ("<img>", "</img>", "<IMG_CONTEXT>")]
    Qwen2Tokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[]).save_pretrained(str(bad_tok))
    msg = bad(with_overrides(base, [f"model.internvl_path={bad_tok}"]))
    assert "model.internvl_path" in msg and "lacks the special tokens <img>" in msg
    # a recon export of another flavor
    other = tmp_path / "recon_1b"
    shutil.copytree(gen_assets.recon, other)
    (other / "config.yaml").write_text("model:\n  flavor: 1b\n")
    assert "export of flavor '1b'" in bad(with_overrides(base, [f"model.unilip_path={other}"]))
    # an edit source that holds T2I shards; a recon export given as model.init_from
    s2 = tiny_gen_args(tmp_path / "bad_run", "gen_stage2", gen_assets, sample_shards.dir, sample_shards.dir, steps=1,
                       init_from=chain[1]["gen_stage1"])
    msg = bad(s2)
    assert "data.train.sources[1]" in msg and "no input images" in msg
    s2 = tiny_gen_args(tmp_path / "bad_run", "gen_stage2", gen_assets, sample_shards.dir, sample_edit_shards.dir,
                       steps=1, init_from=gen_assets.recon)
    assert "model.init_from" in bad(s2)


def test_dry_run_lists_the_published_generator_sizes(capsys):
    from tests.test_dryrun import _dry
    rep = _dry("--world-size", "16", "--ds_config", "ds_configs/zero3.json", config="gen_stage2", capsys=capsys)
    c = rep["components"]
    assert c["queries"]["total"] == 256 * 896
    assert c["connector (6 layers)"]["total"] == 89_474_304  # ~89.5M
    assert c["projector"]["total"] == 896 * 2304 + 2304  # ~2.07M
    assert 585e6 < c["DiT (SANA)"]["trainable"] < 595e6  # Sana_600M_512px
    assert c["MLLM (frozen)"]["trainable"] == 0 and c["MLLM (frozen)"]["frozen"] > 700e6
    assert rep["memory"]["zero_stage"] == 3 and rep["memory"]["world_size"] == 16
    s1 = _dry(config="gen_stage1", capsys=capsys)["components"]
    assert s1["DiT (SANA), frozen"]["trainable"] == 0 and "DC-AE (frozen)" in s1
