"""benchmarks/gen_flops.py on the tiny flavor (meta device, no memory, a few seconds): the
per-component FLOPs of a generator training step add up to one whole-step count, and the
frozen prompt prefix weighs more in an edit step (the reference image's tokens are in the
prompt) than in a T2I step, so the `prefix` cache level pays off more for edit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gen_flops  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return gen_flops.measure("tiny", batch=4, prompt_tokens=24)


def test_component_sum_equals_whole_step(tiny):
    for task, e in tiny["tasks"].items():
        assert e["whole_step_gflops"] > 0
        assert abs(e["sum_vs_whole"] - 1) < 0.02, (task, e["sum_vs_whole"])
        f = e["gflops_per_sample_fwd_bwd"]
        for frozen in ("target_enc", "ref_enc", "llm_prefix"):  # no_grad / no graph: no backward
            assert f[frozen]["bwd"] == 0
        for trained in ("llm_query", "connector", "dit"):  # gradients flow (to the queries)
            assert f[trained]["fwd"] > 0 and f[trained]["bwd"] > f[trained]["fwd"]
        assert (f["ref_enc"]["fwd"] > 0) == (task == "edit")
        s = e["predicted_speedup"]
        assert s["none"] == 1.0 and 1.0 < s["latents"] < s["prefix"]
    assert tiny["optimizer_counted_flops"] == 0  # AdamW is element-wise: nothing FlopCounterMode counts


def test_edit_prefix_dominates_more_than_t2i(tiny):
    t2i, edit = tiny["tasks"]["t2i"], tiny["tasks"]["edit"]

    def share(e):
        return e["gflops_per_sample"]["llm_prefix"] / sum(e["gflops_per_sample"].values())
    assert share(edit) > share(t2i)
    assert edit["predicted_speedup"]["prefix"] > t2i["predicted_speedup"]["prefix"]
    gain = {t: e["predicted_speedup"]["prefix"] / e["predicted_speedup"]["latents"] for t, e in tiny["tasks"].items()}
    assert gain["edit"] > gain["t2i"]  # what the prefix level adds on top of latents


def test_depthwise_conv_backward_counts_groups():
    # torch's formula ignores groups in the weight gradient; the benchmark's does not
    x = torch.empty(2, 64, 8, 8, device="meta", requires_grad=True)
    w = torch.empty(64, 1, 3, 3, device="meta", requires_grad=True)
    fwd, bwd = gen_flops.flop_counter(), gen_flops.flop_counter()
    with fwd:
        y = torch.nn.functional.conv2d(x, w, padding=1, groups=64)
    with bwd:
        y.sum().backward()
    assert bwd.get_total_flops() == 2 * fwd.get_total_flops()


def test_cache_speed_flavor_keeps_the_1b_proportions():
    """benchmarks/cache_speed.py's flavor: the 1b widths / div; layers, heads, tokens kept."""
    import cache_speed

    from unilip_ds.models.flavors import get_flavor
    real, small = get_flavor("1b"), get_flavor(cache_speed.scaled_flavor("1b", 8))
    assert small.text["hidden_size"] * 8 == real.text["hidden_size"]
    assert small.vision["hidden_size"] * 8 == real.vision["hidden_size"]
    assert small.sana["cross_attention_dim"] * 8 == real.sana["cross_attention_dim"]
    for part in ("text", "vision", "sana"):
        a, b = getattr(real, part), getattr(small, part)
        for key in ("num_hidden_layers", "num_layers", "num_attention_heads", "num_key_value_heads",
                    "image_size", "patch_size", "sample_size"):
            assert a.get(key) == b.get(key), (part, key)
    assert (small.num_queries, small.connector_layers, small.gen_resolution) == \
        (real.num_queries, real.connector_layers, real.gen_resolution)


def test_run_counter_per_task_and_cache_shares():
    """unilip_ds.flops (what a run counts at its start for the MFU, the counter above): per data
    task of the run's sources, one sample at the nominal prompt; a window's FLOPs follow its
    micro-batches' tasks and drop what the cached samples did not compute."""
    from unilip_ds.config import load_config
    from unilip_ds.flops import NOMINAL_PROMPT_TOKENS, stage_flops
    cfg = load_config("gen_stage2", ["model.flavor=tiny", "data.resolution=224"])  # t2i + edit sources
    rng = torch.random.get_rng_state()
    s = stage_flops(cfg)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the run's random stream is untouched
    assert set(s.per_sample) == {"t2i", "edit"}
    for task, f in s.per_sample.items():
        assert f == sum(s.components[task].values()) and (s.components[task]["ref_enc"] > 0) == (task == "edit")
    assert s.tokens["t2i"] == NOMINAL_PROMPT_TOKENS + 16 and s.tokens["edit"] == s.tokens["t2i"] + 64 + 2
    t2i, edit, c = s.per_sample["t2i"], s.per_sample["edit"], s.components["edit"]
    assert s.for_window({"t2i": 3, "edit": 1})[0] == pytest.approx((3 * t2i + edit) / 4)
    half = s.for_window({"edit": 2}, {"data/cached_latents": 0.5, "data/cached_prefix": 0.25})[0]
    assert half == pytest.approx(edit - 0.5 * (c["target_enc"] + c["ref_enc"]) - 0.25 * c["llm_prefix"])


def test_stage_time_estimate_cli(capsys):
    """`python -m unilip_ds.flops`: the stage's FLOPs per sample (the run's own counter) and
    the estimate steps x global batch x FLOPs / (devices x peak x MFU), per task and mixed."""
    from unilip_ds.config import load_config
    from unilip_ds.flops import main, stage_flops
    over = ["model.flavor=tiny", "data.resolution=224", "train.max_steps=1000", "train.micro_batch_size=4"]
    assert main(["--config", "gen_stage2", "--gpus", "2", "--mfu", "0.5", "--peak-tflops", "100",
                 "--edit-share", "0.25", *over]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("gen_stage2 (flavor tiny): 1000 steps x global batch 8 (2 devices x micro-batch 4")
    per = stage_flops(load_config("gen_stage2", over, world_size=2)).per_sample
    hours = {t: f * 8000 / (2 * 100e12 * 0.5) / 3600 for t, f in per.items()}
    hours["mix (25% edit)"] = 0.75 * hours["t2i"] + 0.25 * hours["edit"]
    est = [ln for ln in out if ln.startswith("estimate on 2 devices at 100 TFLOPS peak x MFU 0.5")]
    assert [ln.split(", ")[-1].split(":")[0] for ln in est] == list(hours)
    for ln, h in zip(est, hours.values()):
        assert float(ln.rsplit(": ", 1)[1].split(" h")[0]) == pytest.approx(h, rel=5e-3)  # printed to 3 digits
    assert main(["--config", "no_such_stage"]) == 2
