"""What a new user trips over: every user error a run can detect is reported by prepare()
(before any process group or model) in one line naming the key, and leaves nothing behind."""

import pytest

from unilip_ds.config import ConfigError, load_config
from unilip_ds.trainer import prepare

ZERO2 = "ds_configs/zero2.json"


def _prepare(preset, overrides, world=1, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setenv("WORLD_SIZE", str(world))
    return prepare(load_config(preset, overrides, world_size=world), ZERO2)


@pytest.mark.parametrize("preset, overrides, expect", [
    # a real flavor without its weights (used to fail after DeepSpeed built the model)
    ("recon_stage1", ["model.perceptual_pretrained=false"], "config key 'model.internvl_path'"),
    ("recon_stage1", ["model.flavor=tiny", "model.perceptual_pretrained=false", "model.init_from=/nope/export"],
     "config key 'model.init_from': no such path /nope/export"),
    ("recon_stage1", ["model.flavor=tiny"], "set model.vgg_path=<file>, or model.perceptual_pretrained=false"),
    # a stage after the first on a real flavor starts from the previous stage's export
    ("recon_stage2", ["model.perceptual_pretrained=false", "model.internvl_path=TMP", "model.dcae_path=TMP"],
     "config key 'model.init_from': a stage that trains the encoder"),
    ("gen_stage2", [], "config key 'model.init_from': a stage that trains the DiT"),
])
def test_start_errors_name_the_key(preset, overrides, expect, sample_shards, tmp_path):
    over = [f"run.output_dir={tmp_path / 'run'}", f"data.train.urls=[{sample_shards.dir}]",
            *(o.replace("TMP", str(tmp_path)) for o in overrides)]
    with pytest.raises(ConfigError) as e:
        _prepare(preset, over)
    assert expect in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_more_readers_than_shards(sample_shards, tmp_path, monkeypatch):
    over = ["model.flavor=tiny", "model.perceptual_pretrained=false", f"run.output_dir={tmp_path / 'run'}",
            f"data.train.urls=[{sample_shards.dir}]", "train.max_steps=20", "optim.warmup_steps=2"]
    _prepare("recon_stage1", over + ["data.num_workers=5"], world=2, monkeypatch=monkeypatch)  # 10 shards
    with pytest.raises(ConfigError, match=r"config key 'data.num_workers': source 'train' has 10 shard\(s\) "
                                          r"x 1 repeat\(s\) for 12 readers \(world size 2 x data.num_workers 6\)"):
        _prepare("recon_stage1", over + ["data.num_workers=6"], world=2, monkeypatch=monkeypatch)


def test_warnings_tiny_later_stage_and_long_warmup(sample_shards, gen_assets, tmp_path, capsys):
    over = ["model.flavor=tiny", "model.perceptual_pretrained=false", f"recon.teacher_path={gen_assets.internvl}",
            f"run.output_dir={tmp_path / 'run'}", "train.max_steps=300"]
    with pytest.raises(Exception, match="no such file"):  # a failing check: its error is the only line
        _prepare("recon_stage2", over + [f"data.train.urls=[{tmp_path / 'none'}]"])
    assert capsys.readouterr().err == ""
    _prepare("recon_stage2", over + [f"data.train.urls=[{sample_shards.dir}]"])
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: optim.warmup_steps=10000 >= train.max_steps=300: the learning rate never "
                   "leaves its warmup; lower optim.warmup_steps",
                   "warning: model.init_from is not set: a stage that trains the encoder starts from a "
                   "recon export (model.init_from=<export>); this tiny run starts from random weights"]



def test_torch_threads_are_chosen_not_inherited(monkeypatch):
    import os

    import torch

    from unilip_ds.engine.dist import set_torch_threads
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        monkeypatch.delenv("LOCAL_SIZE", raising=False)
        assert set_torch_threads(0, 0) == cores == torch.get_num_threads()  # plain python, no workers
        assert set_torch_threads(0, 1) == max(1, cores - 1)  # one core per data worker
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))  # torchrun: a core per rank
        assert set_torch_threads(0, 2) == 1
        assert set_torch_threads(3, 2) == 3 == torch.get_num_threads()  # train.torch_threads
        with pytest.raises(ConfigError, match="train.torch_threads"):
            load_config(None, ["train.torch_threads=-1"])
    finally:
        torch.set_num_threads(before)


WARN_STEPS = r"""
import os, sys, warnings
import torch, torch.distributed as d
from unilip_ds.engine.dist import free_port
from unilip_ds.tracking import show_warnings_once
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
d.init_process_group("gloo", rank=0, world_size=1)

def step():  # what DeepSpeed's ZeRO-3 does every step: a deprecated collective, and some
    with warnings.catch_warnings():  # library code enters catch_warnings (which resets
        pass  # Python's record of warnings already shown)
    d.all_gather_into_tensor(torch.zeros(2), torch.ones(2))

for phase in ("plain", "once"):
    if phase == "once":
        show_warnings_once()
        show_warnings_once()  # idempotent
    print(f"--- {phase}", file=sys.stderr, flush=True)
    for _ in range(4):
        step()
"""


def test_library_warnings_are_shown_once_per_process():
    import subprocess
    import sys

    from tests.launch_util import REPO, env
    proc = subprocess.run([sys.executable, "-c", WARN_STEPS], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, once = proc.stderr.split("--- once")
    count = lambda s: s.count("FutureWarning: `torch.distributed.all_gather_into_tensor` is deprecated")  # noqa: E731
    assert count(plain) == 4  # without: at every step
    assert count(once) == 1


@pytest.mark.parametrize("script, kind, absent", [
    ("shard_blip3o", "t2i", ("--input-field", "--output-field", "edit --src")),
    ("shard_edit", "edit", ("--image-field", "t2i --src")),
    ("shard_sft", None, ()),
])
def test_data_prep_help_describes_every_option_and_the_input_layouts(script, kind, absent):
    import importlib

    from data_prep.sharding import build_parser
    doc = importlib.import_module(f"data_prep.{script}").__doc__
    parser = build_parser(doc, kind)
    assert all(a.help for a in parser._actions), [a.option_strings for a in parser._actions if not a.help]
    text = parser.format_help()
    assert doc.splitlines()[0] in text  # the description
    layouts = {"t2i": ["<stem>.jpg + <stem>.txt", "webdataset tars of <key>.jpg + <key>.txt", "input_prompt"],
               "edit": ["<key>.input.jpg + <key>.output.jpg + <key>.txt", "edited_image"]}
    for k in (kind,) if kind else ("t2i", "edit"):
        assert all(s in text for s in layouts[k]), text
    assert not any(s in text for s in absent), text


def test_a_recon_export_given_as_gen_init_from_names_the_right_key(gen_assets):
    from unilip_ds.config import ConfigError, load_config
    from unilip_ds.models.gen_loading import check_paths
    cfg = load_config("gen_stage2", ["model.flavor=tiny", f"model.init_from={gen_assets.recon}"])
    with pytest.raises(ConfigError, match=r"model.init_from'.*is a recon export: give it as model.unilip_path"):
        check_paths(cfg)


def test_an_empty_or_broken_weights_directory_fails_at_start(gen_assets, sample_shards, tmp_path):
    """(Used to pass the start checks and fail minutes later, after DeepSpeed built the model.)"""
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    over = [f"run.output_dir={tmp_path / 'run'}", f"data.train.urls=[{sample_shards.dir}]",
            "model.flavor=tiny", "model.perceptual_pretrained=false"]
    for path in (empty, broken):
        with pytest.raises(ConfigError, match=rf"config key 'model.internvl_path': {path}: (no config.json|"
                                              "config.json names no model_type)"):
            _prepare("recon_stage1", over + [f"model.internvl_path={path}"])
        with pytest.raises(ConfigError, match=rf"config key 'model.internvl_path': {path}: "):
            _prepare("gen_stage1", [f"run.output_dir={tmp_path / 'run'}", f"data.train.urls=[{sample_shards.dir}]"]
                     + [o for o in gen_assets.overrides("dcae") if "internvl_path" not in o]
                     + [f"model.internvl_path={path}"])
    assert not (tmp_path / "run").exists()  # nothing left behind
