"""--dry-run: meta-device build, parameter counts per component, model-state memory."""

import json

import pytest

from tests.launch_util import run


def _dry(*args, config="recon_stage2", capsys=None):
    """The dry run's JSON: through the CLI in a subprocess, or (capsys given) launch/train.py's
    main in this process (no second interpreter start: ~10 s each on 2 cores)."""
    argv = ["--config", config, "--dry-run", "--json", *args]
    if capsys is None:
        proc = run("launch/train.py", argv)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = proc.stdout
    else:
        import importlib.util
        spec = importlib.util.spec_from_file_location("train_cli", "launch/train.py")
        cli = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cli)
        capsys.readouterr()
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1])


def test_dry_run_counts_real_sizes_and_memory(capsys):
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
    z2 = _dry("--world-size", "8", "--ds_config", "ds_configs/zero2.json", capsys=capsys)
    assert z3["memory"]["zero_stage"] == 3 and z2["memory"]["zero_stage"] == 2
    assert z3["memory"]["gpu_gib"] < z2["memory"]["gpu_gib"]
    off = _dry("--world-size", "8", "--ds_config", "ds_configs/zero3_offload.json", capsys=capsys)
    assert off["memory"]["gpu_optimizer_gib"] == 0 and off["memory"]["gpu_params_gib"] == 0
    assert off["memory"]["gpu_gib"] < z3["memory"]["gpu_gib"] and off["memory"]["cpu_gib_per_rank"] > 0
    two_b = _dry("model.flavor=2b", capsys=capsys)["components"]
    assert two_b["projector (mlp1)"]["total"] == 4096 * 2 + 4096 * 1536 + 1536 + 1536 * 1536 + 1536
    # stage 1: encoder and projector frozen
    s1 = _dry(config="recon_stage1", capsys=capsys)["components"]
    assert s1["encoder (InternViT)"]["trainable"] == 0 and s1["adapter"]["frozen"] == 0


def test_memory_terms_follow_the_config(tmp_path):
    """Every term is named and sized from the config: EMA (per partition under ZeRO-3),
    reduce buckets per engine (two with overlap_comm below ZeRO-3), the fp32 step copy of the
    largest parameter group; the total is their sum."""
    from unilip_ds.config import load_config
    from unilip_ds.dryrun import dry_run
    from unilip_ds.engine.ds_config import load_json

    def mem(world, ds, *over):
        cfg = load_config("recon_stage2", [f"deepspeed.config={ds}", *over], world_size=world)
        return dry_run(cfg, load_json(ds), world)["memory"]

    def term(m, *words):
        (t,) = [t for t in m["terms"] if all(w in t["term"] for w in words)]
        return t["gpu_gib"] * 2 ** 30

    z2 = mem(1, "ds_configs/zero2.json")
    trainable = 304_012_288 + 4_482_816 + 4_859_200 + 159_223_171  # encoder, mlp1, adapter, decoder
    assert term(z2, "model: EMA") == trainable * 4  # ~1.76 GiB at world size 1
    assert term(z2, "model: gradient reduce buckets") == 2 * 5e8 * 2  # overlap_comm: two, bf16
    assert term(z2, "disc: gradient reduce buckets") == 2 * 5e8 * 2  # every engine has its own
    # the step's flat copies (bf16, then fp32) are one param group's: the largest, the
    # encoder + mlp1 weights with weight decay (all but biases and norms)
    vision = 304_012_288 + 4_482_816
    assert vision * 6 * 0.98 < term(z2, "model:", "flat gradient copies") < vision * 6
    assert sum(t["gpu_gib"] for t in z2["terms"]) == pytest.approx(z2["gpu_gib"])
    assert z2["gpu_gib"] == pytest.approx(sum(z2[k] for k in ("gpu_params_gib", "gpu_grads_gib",
                                                            "gpu_optimizer_gib", "ema_gib", "buckets_gib",
                                                            "outside_engines_gib"))
                                          + term(z2, "model:", "flat gradient") / 2 ** 30
                                          + term(z2, "disc:", "flat gradient") / 2 ** 30)
    z3 = mem(8, "ds_configs/zero3.json")
    assert term(z3, "model: EMA") == trainable * 4 / 8
    assert term(z3, "model: gradient reduce bucket ") == 5e8 * 2  # ZeRO-3: one
    assert term(z3, "model: ZeRO-3 prefetch bucket") == z3["gpu_params_gib"] * 8 * 2 ** 30 - \
        term(z3, "disc: weights") * 8  # 5e8 elements > the model: all of it
    # the settings behind the terms (tiny flavor: the same code, a faster build)
    ema, no_ema = (mem(8, "ds_configs/zero3.json", "model.flavor=tiny", f"ema.enabled={e}") for e in ("true", "false"))
    assert no_ema["ema_gib"] == 0 < ema["ema_gib"]
    assert ema["gpu_gib"] - no_ema["gpu_gib"] == pytest.approx(ema["ema_gib"])
    custom = tmp_path / "ds.json"
    custom.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": False,
                                                        "reduce_bucket_size": 1e7}}))
    assert term(mem(2, str(custom), "model.flavor=tiny"), "model: gradient reduce bucket ") == 1e7 * 2
