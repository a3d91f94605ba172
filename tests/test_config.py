"""Config tree, DeepSpeed JSON filling, and the CLI's one-line errors."""

import json

import pytest

from tests.launch_util import run, start_error
from unilip_ds.config import ConfigError, load_config
from unilip_ds.engine.ds_config import build_ds_config, load_json


def test_defaults_preset_and_overrides():
    cfg = load_config("recon_stage2", ["optim.lr=3e-4", "train.max_steps=7"])
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 7
    assert cfg.recon.distill_weight == 1.0  # from the preset
    assert cfg.run.task == "recon"
    cfg448 = load_config("recon_stage2_448")  # _base_: recon_stage2
    assert cfg448.data.resolution == 448 and cfg448.recon.distill_weight == 1.0


@pytest.mark.parametrize("overrides, key", [
    (["train.nope=1"], "train.nope"),
    (["train.max_steps=abc"], "train.max_steps"),
    (["train.global_batch_size=7"], "train.global_batch_size"),
    (["train.grad_clip=null"], "train.grad_clip"),
    (["train.precision=fp16"], "train.precision"),
    (["optim.min_lr=1.0"], "optim.min_lr"),
    (["data.train.urls=[/d/shard-{0..9}.tar]"], "quote brace patterns"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_global_batch_uses_world_size():
    load_config(None, ["train.micro_batch_size=2", "train.grad_accum=3",
                       "train.global_batch_size=24"], world_size=4)
    with pytest.raises(ConfigError, match="world size 2"):
        load_config(None, ["train.micro_batch_size=2", "train.grad_accum=3",
                           "train.global_batch_size=24"], world_size=2)


def test_ds_config_auto_filled_and_contradictions(tmp_path):
    cfg = load_config(None, ["train.micro_batch_size=3", "train.grad_accum=2",
                             "train.precision=fp32", "train.grad_clip=0.5"])
    ds = build_ds_config(cfg, load_json("ds_configs/zero3_offload.json"), 4, lr=2e-4)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False
    assert ds["optimizer"]["params"]["lr"] == 2e-4
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.999]
    assert ds["zero_optimization"]["stage"] == 3  # ZeRO settings kept
    raw = load_json("ds_configs/zero2.json")
    raw["gradient_clipping"] = 2.0
    with pytest.raises(ConfigError, match="gradient_clipping"):
        build_ds_config(cfg, raw, 4, lr=1e-4)
    raw = load_json("ds_configs/zero2.json")
    raw["zero_optimization"] = {"stage": 0, "offload_optimizer": {"device": "cpu"}}
    with pytest.raises(ConfigError, match="offload"):
        build_ds_config(cfg, raw, 4, lr=1e-4)
    raw = load_json("ds_configs/zero2.json")
    raw["scheduler"] = {"type": "WarmupCosineLR", "params": {}}
    ds = build_ds_config(cfg, raw, 1, lr=1e-4)
    assert ds["scheduler"]["params"]["total_num_steps"] == cfg.train.max_steps


def test_cli_errors_are_one_line_before_anything_starts(tmp_path, capsys):
    """launch/train.py's main in process (as the CLI runs it, without a second interpreter)."""
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    out = tmp_path / "run"
    assert "train.grad_clip" in start_error(
        ["--config", "recon_stage1", "train.grad_clip=null", f"run.output_dir={out}"], capsys)
    assert "does not parse" in start_error(
        ["--config", "recon_stage1", "--ds_config", str(bad), f"run.output_dir={out}"], capsys)
    off0 = tmp_path / "off0.json"
    off0.write_text(json.dumps({"zero_optimization": {"stage": 0,
                                                      "offload_optimizer": {"device": "cpu"}}}))
    assert "offload" in start_error(["--config", "recon_stage1", "--ds_config", str(off0)], capsys)
    assert "unknown preset" in start_error(["--config", "no_such_stage"], capsys)
    assert not out.exists()  # nothing was created


def test_print_config():
    proc = run("launch/train.py", ["--config", "recon_stage2", "--print-config", "optim.lr=5e-5"])
    assert proc.returncode == 0, proc.stderr
    assert "lr: 5.0e-05" in proc.stdout and "distill_weight: 1.0" in proc.stdout


def test_lr_schedule_warmup_cosine_and_late_engine():
    from unilip_ds.engine.engines import lr_factor
    cfg = load_config(None, ["train.max_steps=100", "optim.warmup_steps=10", "optim.lr=1e-4",
                             "optim.min_lr=1e-5"])
    f = lr_factor(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    late = lr_factor(cfg, first_step=60)  # e.g. the discriminator from recon.gan_start_step
    assert late(0) == pytest.approx(0.1) and late(9) == pytest.approx(1.0)
    assert late(40) == pytest.approx(0.1)  # its last step is the run's last step


def test_urls_and_sources_on_the_command_line_replace_the_presets_other():
    cfg = load_config("recon_stage1", ["model.flavor=tiny"], world_size=1)
    assert [(s.name, s.weight) for s in cfg.data.train.sources] == [
        ("blip3o_short", 0.2), ("blip3o_long", 0.6), ("journeydb", 0.2)]  # the reference mixture
    cfg = load_config("recon_stage1", ["data.train.urls=[/data/a]"], world_size=1)
    assert cfg.data.train.urls == ["/data/a"] and cfg.data.train.sources == []
    cfg = load_config("gen_stage2", ["data.train.urls=[/data/a]", "data.train.sources=[{name: x, task: t2i, "
                                     "urls: [/data/b]}]"], world_size=1)
    assert cfg.data.train.urls == [] and [s.urls for s in cfg.data.train.sources] == [["/data/b"]]


def test_override_forms_a_new_user_types():
    # webdataset's convention: one brace pattern as a plain string is a list of one
    cfg = load_config(None, ["data.train.urls=/d/shard-{000000..000127}.tar"])
    assert cfg.data.train.urls == ["/d/shard-{000000..000127}.tar"]
    with pytest.raises(ConfigError, match=r"config key 'optim.betas': takes a list.*\[") as e:
        load_config(None, ["optim.betas=0.9"])
    assert "AnyNode" not in str(e.value)
    # YAML reads `off` as a boolean; a string key sees the text typed
    with pytest.raises(ConfigError, match="offline, online or disabled, got 'off'"):
        load_config(None, ["wandb.mode=off"])
    assert load_config(None, ["run.name=no"]).run.name == "no"
    # an unknown key is named as typed, whole
    with pytest.raises(ConfigError, match=r"config key 'model.foo.bar': unknown key"):
        load_config(None, ["model.foo.bar=1"])
    # ... with the nearest real key: by spelling, or the name other trainers use
    for typo, near in (("optim.learning_rate", "optim.lr"), ("optm.lr", "optim.lr"),
                       ("model.intervl_path", "model.internvl_path"), ("train.batch_size", "train.micro_batch_size"),
                       ("data.num_worker", "data.num_workers")):
        with pytest.raises(ConfigError, match=rf"config key '{typo}': unknown key; did you mean '{near}'\?"):
            load_config(None, [f"{typo}=1"])
    with pytest.raises(ConfigError, match=r"unknown key \(") as e:  # nothing close: no guess
        load_config(None, ["train.zzz_qqq=1"])
    assert "did you mean" not in str(e.value)


def test_warmup_not_shorter_than_the_run_is_a_warning():
    from unilip_ds.config import config_warnings
    assert config_warnings(load_config(None, ["train.max_steps=300"])) == [
        "optim.warmup_steps=10000 >= train.max_steps=300: the learning rate never leaves its warmup; "
        "lower optim.warmup_steps"]
    assert config_warnings(load_config(None, ["train.max_steps=300", "optim.warmup_steps=30"])) == []


def test_a_key_given_twice_on_the_command_line_is_an_error(capsys):
    # what the shell makes of an unquoted data.train.urls=/d/shard-{0..2}.tar
    line = start_error(["--config", "recon_stage1", "--print-config", *(
        f"data.train.urls=/d/shard-{i}.tar" for i in range(3))], capsys)
    assert "config key 'data.train.urls': given 3 times" in line and "quote" in line
