"""--dry-run: meta-device build, parameter counts per component, model-state memory."""

import json

import pytest

from tests.launch_util import run


def _dry(*args):
    proc = run("launch/train.py", ["--config", "recon_stage2", "--dry-run", "--json", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_dry_run_counts_real_sizes_and_memory():
    z3 = _dry("--world-size", "8", "--ds_config", "ds_configs/zero3.json")
    c = z3["components"]
    # published sizes: InternViT-300M-448px, InternVL3-1B mlp1 (4096 -> 896), DC-AE f32c32 decoder
    assert c["encoder (InternViT)"]["total"] == 304_012_288
    assert c["projector (mlp1)"]["total"] == 4096 * 2 + 4096 * 896 + 896 + 896 * 896 + 896
    assert 155e6 < c["decoder (DC-AE)"]["total"] < 165e6
    engines = {k: v for k, v in c.items() if "outside engines" not in k}
    assert z3["total"]["total"] == sum(v["total"] for v in engines.values())
    # the fp32 loss networks (teacher + LPIPS-VGG + ConvNeXt-S) on every GPU, outside the engines
    outside = sum(v["total"] for k, v in c.items() if "outside engines" in k)
    assert c["teacher (frozen) [fp32, outside engines]"]["total"] > 300e6
    assert z3["memory"]["outside_engines_gib"] == pytest.approx(outside * 4 / 2 ** 30)
    assert 1.3 < z3["memory"]["outside_engines_gib"] < 1.5
    z2 = _dry("--world-size", "8", "--ds_config", "ds_configs/zero2.json")
    assert z3["memory"]["zero_stage"] == 3 and z2["memory"]["zero_stage"] == 2
    assert z3["memory"]["gpu_gib"] < z2["memory"]["gpu_gib"]
    off = _dry("--world-size", "8", "--ds_config", "ds_configs/zero3_offload.json")
    assert off["memory"]["gpu_optimizer_gib"] == 0 and off["memory"]["gpu_params_gib"] == 0
    assert off["memory"]["gpu_gib"] < z3["memory"]["gpu_gib"] and off["memory"]["cpu_gib_per_rank"] > 0
    two_b = _dry("model.flavor=2b")["components"]
    assert two_b["projector (mlp1)"]["total"] == 4096 * 2 + 4096 * 1536 + 1536 + 1536 * 1536 + 1536
    # stage 1: encoder and projector frozen
    s1 = run("launch/train.py", ["--config", "recon_stage1", "--dry-run", "--json"])
    s1 = json.loads(s1.stdout.strip().splitlines()[-1])["components"]
    assert s1["encoder (InternViT)"]["trainable"] == 0 and s1["adapter"]["frozen"] == 0
