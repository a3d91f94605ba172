"""Bad input fails at start, through the real entry points: one `error:` line naming the key
(or option), the path and the fix, exit code 2, no traceback, before any process group, with
nothing written (no run dir). Covers: weight directories checked inside (config.json of the
expected model, files, keys and shapes read from the headers by the run's own loaders), an
unwritable or impossible run.output_dir / --out, a non-tar file given as a shard, S3 without
credentials, a config-key typo; and the gen presets' feedback defaults + the warning of a long
run without any."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.launch_util import REPO, env, run, start_error, with_overrides


def _unwritable_parent(tmp_path: Path) -> Path:
    """A directory in which nothing can be created: a read-only folder for a normal user; as
    root (who ignores permission bits) a sysfs folder, where mkdir is refused (EPERM)."""
    if os.geteuid() == 0:
        return Path("/sys")
    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o555)
    return d


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------
# weights: looked at inside
# ---------------------------------------------------------------------------------------
def _gen1(gen_assets, sample_shards, out, **paths):
    over = {"internvl_path": gen_assets.internvl, "unilip_path": gen_assets.recon,
            "sana_path": gen_assets.sana, "dcae_path": gen_assets.dcae, **paths}
    return ["--config", "gen_stage1", "model.flavor=tiny", "data.resolution=256", f"run.output_dir={out}",
            f"data.train.urls=[{sample_shards.dir}]"] + [f"model.{k}={v}" for k, v in over.items()]


def _recon(sample_shards, out, stage="recon_stage1", *extra):
    return with_overrides(["--config", stage, "model.flavor=tiny", "model.perceptual_pretrained=false",
                           f"run.output_dir={out}", f"data.train.urls=[{sample_shards.dir}]"], [str(e) for e in extra])


def _drop_key(src: Path, dst: Path, key_part: str) -> str:
    """A copy of the weights directory `src` whose safetensors lack the first key containing
    `key_part`; returns that key."""
    shutil.copytree(src, dst)
    f = next(dst.glob("*.safetensors"))
    sd = load_file(f)
    key = sorted(k for k in sd if key_part in k)[0]
    del sd[key]
    save_file(sd, f, metadata={"format": "pt"})
    return key


def _reshape_key(src: Path, dst: Path, key_part: str) -> str:
    shutil.copytree(src, dst)
    f = next(dst.glob("*.safetensors"))
    sd = load_file(f)
    key = sorted(k for k in sd if key_part in k and sd[k].ndim == 2)[0]
    sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1], dtype=sd[key].dtype)
    save_file(sd, f, metadata={"format": "pt"})
    return key


def test_gen_weight_dirs_are_checked_inside(gen_assets, sample_shards, tmp_path, capsys):
    out = tmp_path / "run"
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = []
    # an existing but empty InternVL directory (used to pass and fail ~4 minutes later)
    cases.append(({"internvl_path": empty}, f"config key 'model.internvl_path': {empty}: no config.json "
                  "(expected an InternVL3 -hf directory of flavor tiny, e.g. OpenGVLab/InternVL3-1B-hf)"))
    # another model's directory
    cases.append(({"internvl_path": gen_assets.dcae},
                  f"config key 'model.internvl_path': {gen_assets.dcae}: config.json describes 'AutoencoderDC', "
                  "not internvl"))
    # config.json but no safetensors
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    shutil.copy(gen_assets.internvl / "config.json", noweights)
    (noweights / "pytorch_model.bin").write_bytes(b"")
    cases.append(({"internvl_path": noweights}, f"config key 'model.internvl_path': no *.safetensors weights in "
                  f"{noweights} (only pytorch_model.bin; the safetensors files of the published checkpoint are read)"))
    # a key of the language model missing (the vision path is the recon export's)
    dropped = tmp_path / "dropped"
    key = _drop_key(gen_assets.internvl, dropped, "layers.1.mlp")
    cases.append(({"internvl_path": dropped}, f"config key 'model.internvl_path': InternVL3 {dropped}: 1 missing "
                  f"keys (e.g. ['{key.replace('language_model.model.', 'model.language_model.')}'"))
    # a DiT tensor of the wrong shape
    sana = tmp_path / "sana"
    key = _reshape_key(gen_assets.sana / "transformer", sana / "transformer", "transformer_blocks.0")
    cases.append(({"sana_path": sana}, f"config key 'model.sana_path': {sana / 'transformer'}: shape of '{key}'"))
    # the transformer folder itself instead of the SANA directory
    cases.append(({"sana_path": gen_assets.sana / "transformer"},
                  f"this is the transformer folder itself: give its parent {gen_assets.sana}"))
    # a recon export without its adapter
    recon = tmp_path / "recon"
    shutil.copytree(gen_assets.recon, recon)
    shutil.rmtree(recon / "adapter")
    cases.append(({"unilip_path": recon}, f"config key 'model.unilip_path': {recon}: no adapter/ (expected a "
                  "recon export"))
    # the DC-AE: its decoder's weights cut short
    dcae = tmp_path / "dcae"
    key = _drop_key(gen_assets.dcae, dcae, "decoder.up_blocks")
    cases.append(({"dcae_path": dcae}, f"config key 'model.dcae_path': {dcae}: 1 missing keys (e.g. ['{key}']) "
                  "(expected a diffusers AutoencoderDC directory"))
    for paths, expect in cases:
        line = start_error(_gen1(gen_assets, sample_shards, out, **paths), capsys)
        assert line.startswith("error: config key ") and expect in line, (expect, line)
    # a recon export given as gen_stage2's model.init_from names the key it belongs to
    line = start_error(["--config", "gen_stage2", "model.flavor=tiny", f"model.init_from={gen_assets.recon}",
                  f"run.output_dir={out}", f"data.train.urls=[{sample_shards.dir}]"], capsys)
    assert "it is a recon export: give it as model.unilip_path" in line
    assert not out.exists()


def test_recon_weight_files_are_checked_inside(gen_assets, sample_shards, tmp_path, capsys):
    from unilip_ds.models.flavors import get_flavor
    from unilip_ds.models.perceptual import PerceptualNets
    out = tmp_path / "run"
    empty = tmp_path / "empty"
    empty.mkdir()
    line = start_error(_recon(sample_shards, out, "recon_stage1", f"model.internvl_path={empty}",
                        f"model.dcae_path={gen_assets.dcae}"), capsys)
    assert f"config key 'model.internvl_path': {empty}: no config.json (expected an InternVL3 directory" in line
    line = start_error(_recon(sample_shards, out, "recon_stage1", f"model.internvl_path={gen_assets.internvl}",
                        f"model.dcae_path={gen_assets.sana / 'transformer'}"), capsys)
    assert "config key 'model.dcae_path'" in line and "describes 'SanaTransformer2DModel', not AutoencoderDC" in line
    # a stage-1 export without decoder weights given to stage 2
    export = tmp_path / "export"
    shutil.copytree(gen_assets.recon, export)
    for f in (export / "decoder").glob("*.safetensors"):
        f.unlink()
    line = start_error(_recon(sample_shards, out, "recon_stage2", f"model.init_from={export}",
                        f"recon.teacher_path={gen_assets.recon}"), capsys)
    assert f"config key 'model.init_from': no *.safetensors weights in {export / 'decoder'}" in line
    # the self-distillation teacher: an empty folder
    line = start_error(_recon(sample_shards, out, "recon_stage2", f"model.init_from={gen_assets.recon}",
                        f"recon.teacher_path={empty}"), capsys)
    assert f"config key 'recon.teacher_path': {empty}: no config.json" in line
    # perceptual files: each checked against its network, the failing one named
    f = get_flavor("tiny")
    nets = PerceptualNets(f.vgg_width_div, f.convnext_dims, f.convnext_depths, f.classifier_size)
    files = {"vgg_path": tmp_path / "vgg.pth", "lpips_path": tmp_path / "lpips.pth",
             "convnext_path": tmp_path / "convnext.pth"}
    torch.save(nets.lpips.vgg.state_dict(), files["vgg_path"])
    torch.save(nets.lpips.heads.state_dict(), files["lpips_path"])
    bad = nets.convnext.state_dict()
    bad.pop(sorted(bad)[0])
    torch.save(bad, files["convnext_path"])
    perceptual = ["model.perceptual_pretrained=true"] + [f"model.{k}={v}" for k, v in files.items()]
    args = _recon(sample_shards, out, "recon_stage1", f"model.internvl_path={gen_assets.internvl}",
                  f"model.dcae_path={gen_assets.dcae}")
    line = start_error([a for a in args if "perceptual_pretrained" not in a] + perceptual, capsys)
    assert f"config key 'model.convnext_path': ConvNeXt-S {files['convnext_path']}: 1 missing keys" in line
    files["lpips_path"].write_bytes(b"not a torch file")
    line = start_error([a for a in args if "perceptual_pretrained" not in a] + perceptual, capsys)
    assert line == (f"error: config key 'model.lpips_path': {files['lpips_path']} is not a state-dict file "
                    "torch.load(weights_only=True) reads (UnpicklingError) (expected the LPIPS head (lpips "
                    "weights/v0.1/vgg.pth))")
    assert not out.exists()


def test_good_weights_pass_and_only_headers_are_read(gen_assets, sample_shards, tmp_path, capsys):
    from unilip_ds.config import load_config
    from unilip_ds.engine.weights import headers_only, read_weights_dir
    from unilip_ds.tasks.base import build_task
    t0 = time.perf_counter()
    for preset, over in (("gen_stage1", gen_assets.overrides("dcae")),
                         ("recon_stage1", ["model.flavor=tiny", f"model.internvl_path={gen_assets.internvl}",
                                           f"model.dcae_path={gen_assets.dcae}"]),
                         ("recon_stage2", ["model.flavor=tiny", f"model.init_from={gen_assets.recon}",
                                           f"model.internvl_path={gen_assets.internvl}"])):
        cfg = load_config(preset, over + ["model.perceptual_pretrained=false", "data.train.sources=[]",
                                          f"data.train.urls=[{sample_shards.dir}]"])
        build_task(cfg).check_inputs()
    print(f"checks of 3 good configs: {time.perf_counter() - t0:.2f}s")
    with headers_only():
        meta = read_weights_dir(gen_assets.internvl)
    real = read_weights_dir(gen_assets.internvl)
    assert {k: (v.shape, v.dtype) for k, v in meta.items()} == {k: (v.shape, v.dtype) for k, v in real.items()}
    assert all(v.is_meta for v in meta.values())  # no tensor data was read


# ---------------------------------------------------------------------------------------
# output directories
# ---------------------------------------------------------------------------------------
def test_an_unwritable_or_impossible_output_dir_is_one_line(sample_shards, tmp_path, capsys):
    parent = _unwritable_parent(tmp_path)
    out = parent / "unilip_run"
    # the command itself, in a subprocess: exit code and stderr as a user sees them
    proc = run("launch/train.py", _recon(sample_shards, out, "recon_stage1"))
    line = _one_line(proc)
    assert line == (f"error: config key 'run.output_dir': {out}: cannot write in {parent} "
                    f"({'Operation not permitted' if os.geteuid() == 0 else 'Permission denied'}); "
                    "choose a directory you can write (run.output_dir=<dir>)"), line
    assert not out.exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = start_error(_recon(sample_shards, afile / "run", "recon_stage1"), capsys)
    assert line.startswith(f"error: config key 'run.output_dir': {afile / 'run'}: {afile} is a file, not a directory")
    assert afile.read_text() == "x" and not list(tmp_path.glob(".unilip_probe-*"))


def test_inference_and_bench_check_out_before_loading(tmp_path, capsys):
    parent = _unwritable_parent(tmp_path)
    out = parent / "unilip_out"
    image = tmp_path / "in.png"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(image)
    t0 = time.time()
    for module, extra in (("unilip_ds.inference.generate", ["--prompt", "a cat"]),
                          ("unilip_ds.inference.edit", ["--image", image, "--instruction", "flip it"])):
        proc = subprocess.run([sys.executable, "-m", module, "--ckpt", tmp_path / "no_export", *extra,
                               "--out", out], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
        assert _one_line(proc).startswith(f"error: --out {out}: cannot write in {parent}"), proc.stderr
    print(f"generate + edit refused in {time.time() - t0:.1f}s")
    from unilip_ds.evaluation.bench import main as bench
    assert bench(["geneval", "--ckpt", str(tmp_path), "--data", str(image), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out}: cannot write in {parent}") and len(err.splitlines()) == 1
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------
def test_an_image_given_as_a_shard_is_one_line(sample_shards, tmp_path, capsys):
    from PIL import Image
    jpg = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(jpg)
    out = tmp_path / "run"
    line = start_error(_recon(sample_shards, out, "recon_stage1", f"data.train.urls=[{jpg}]"), capsys)
    assert line.startswith(f"error: shard spec {jpg}: {jpg} is not a .tar shard; name webdataset shards"), line
    src = f"data.train.sources=[{{name: a, urls: [{sample_shards.dir}]}}, {{name: b, urls: ['{tmp_path}/*.jpg']}}]"
    args = [a for a in _recon(sample_shards, out, "recon_stage1") if not a.startswith("data.train.urls")]
    line = start_error(args + [src], capsys)
    assert "matches no *.tar shards" in line  # a glob only ever picks shards
    line = start_error(args + [f"data.train.sources=[{{name: b, urls: ['{tmp_path}/photo.{{jpg,jpg}}']}}]"], capsys)
    assert "is not a .tar shard" in line
    assert not out.exists()


def test_s3_without_credentials_fails_at_once_naming_the_variables(s3_sample_shards, seaweed, sample_shards,
                                                                    tmp_path, monkeypatch, capsys):
    from unilip_ds.data import storage
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))  # no ~/.aws files either
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probe
    storage.reset_filesystems()
    out = tmp_path / "run"
    args = _recon(sample_shards, out, "recon_stage1", f"data.train.urls=[{s3_sample_shards.dir}/]",
                  f"data.s3_endpoint={seaweed.endpoint}", "data.s3_region=us-east-1")
    t0 = time.time()
    try:
        line = start_error(args, capsys)
    finally:
        storage.reset_filesystems()
    took = time.time() - t0
    assert f"error: object {s3_sample_shards.dir}/: no S3 credentials found (NoCredentialsError" in line
    assert "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line and "data.s3_endpoint" in line
    assert took < 20, took  # not retried for data.io_retry_seconds (60)
    assert seaweed.secret_key not in line and not out.exists()


# ---------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------
def test_a_key_typo_is_one_line_with_the_nearest_key(tmp_path, capsys):
    out = tmp_path / "run"
    line = start_error(["--config", "recon_stage1", "optim.learning_rate=1e-4", f"run.output_dir={out}"], capsys)
    assert line == "error: config key 'optim.learning_rate': unknown key; did you mean 'optim.lr'?"
    assert not out.exists()


def test_gen_presets_give_feedback_when_held_out_data_is_set(gen_assets, sample_shards, tmp_path, capsys):
    from unilip_ds.config import load_config
    from unilip_ds.trainer import prepare
    held = f"data.eval.urls=[{sample_shards.dir}]"
    for preset, steps in (("gen_stage1", 50000), ("gen_stage2", 200000), ("gen_stage3", 20000)):
        off = load_config(preset).train
        assert (off.max_steps, off.eval_every, off.sample_every) == (steps, 0, 0)
        on = load_config(preset, [held]).train
        assert (on.eval_every, on.sample_every) == (1000, 1000)
    short = load_config("gen_stage1", [held, "train.max_steps=600"]).train
    assert (short.eval_every, short.sample_every) == (30, 30)  # 20 per run
    mine = load_config("gen_stage1", [held, "train.eval_every=7", "train.sample_every=0"]).train
    assert (mine.eval_every, mine.sample_every) == (7, 0)  # the command line decides
    # at start: a long run without feedback gets one warning line, one with held-out data none
    base = [f"run.output_dir={tmp_path / 'run'}", f"data.train.urls=[{sample_shards.dir}]",
            "train.max_steps=3000", *gen_assets.overrides("dcae")]
    prepare(load_config("gen_stage1", base), "ds_configs/zero2.json")
    assert capsys.readouterr().err.splitlines() == [
        "warning: train.max_steps=3000 with neither train.eval_every nor train.sample_every: no held-out loss "
        "and no sample grids until the run ends; give held-out shards (data.eval.urls=[...]) and "
        "train.eval_every=N (the gen presets set it themselves: every min(1000, max_steps // 20) steps)"]
    cfg = load_config("gen_stage1", base + [held])
    prepare(cfg, "ds_configs/zero2.json")
    assert capsys.readouterr().err == "" and (cfg.train.eval_every, cfg.train.sample_every) == (150, 150)
    assert not (tmp_path / "run").exists()
