"""Non-finite gradients with a finite loss (issue 20): the skip must come from the gradient
norm (DeepSpeed's overflow check), not from the loss. A fault hook (train.test_inf_grad_batches)
keeps a micro-batch's loss finite and back-propagates infinite gradients. In fp32 and bf16,
through launch/train.py: the step is counted, the weights do not move, and the policy fires
(rollback in fp32, stop in bf16). And no DeepSpeed JSON can turn the overflow check off."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.launch_util import REPO, env, tiny_recon_args
from unilip_ds.engine import checkpoint


def _metrics(out: Path):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path, step: int):
    from unilip_ds.engine.export import raw_weights
    return raw_weights(checkpoint.ckpt_root(out) / f"step_{step:08d}", "model")


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _args(out, shards, precision, extra):
    return tiny_recon_args(out, shards, steps=3, extra=[
        f"train.precision={precision}", "wandb.mode=disabled", "checkpoint.every_steps=1",
        "checkpoint.keep_last=10", "optim.warmup_steps=1", "train.max_nonfinite_in_a_row=2",
        "train.test_inf_grad_batches=[2,3]", *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The fp32 (rollback) and bf16 (stop) runs, started together: each is one process with
    one torch thread, mostly start-up time, so on two cores they take the time of one."""
    import subprocess
    import sys

    from unilip_ds.data.sample_images import write_caption_tars
    root = tmp_path_factory.mktemp("nonfinite")
    write_caption_tars(root / "shards", count=12, per_tar=6, size=64)
    procs = {}
    for precision, policy in (("fp32", "rollback"), ("bf16", "stop")):
        out = root / precision
        procs[precision] = (out, subprocess.Popen(
            [sys.executable, "launch/train.py", *_args(out, str(root / "shards"), precision,
                                                        [f"train.on_nonfinite={policy}"])],
            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = {}
    for precision, (out, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        done[precision] = (out, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done


def test_infinite_gradients_with_a_finite_loss_fp32_skip_count_and_roll_back(runs):
    """fp32: steps 2 and 3 back-propagate infinite gradients with a finite loss. Step 2 is
    skipped (counted, weights and LR schedule unchanged), step 3 too, which is the second in
    a row: the run rolls back to step 2's checkpoint with the LR halved and retrains step 3
    on a new batch."""
    out, proc = runs["fp32"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["train/skipped_nonfinite"] for r in rows] == [0, 1, 2]  # counted, though the loss was finite
    assert math.isfinite(rows[1]["loss/total"])
    assert "non-finite loss (model) on rank" not in proc.stdout  # the loss was not the cause
    assert "step 2: non-finite loss or gradient norm: optimizer step of model skipped" in proc.stdout
    assert "rolled back to step_00000002 after 2 non-finite steps in a row: LR x0.5" in proc.stdout
    w1, w2, w3 = (_weights(out, s) for s in (1, 2, 3))
    assert _same(w1, w2)  # the skipped step did not move the weights
    assert not _same(w2, w3) and all(torch.isfinite(v).all() for v in w3.values() if v.is_floating_point())
    assert checkpoint.read_meta(out, "step_00000003")["lr_scale"] == 0.5


def test_infinite_gradients_with_a_finite_loss_bf16_skip_count_and_stop(runs):
    """bf16 (where DeepSpeed's overflow check is a setting): the same fault skips steps 2 and
    3 with the weights unchanged; with train.on_nonfinite=stop the second one ends the run."""
    out, proc = runs["bf16"]
    assert proc.returncode == 3, proc.stderr[-3000:]
    err = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "step 3: 2 steps in a row with a non-finite loss or gradient norm" in err[0]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and [r["train/skipped_nonfinite"] for r in rows] == [0, 1]
    assert math.isfinite(rows[1]["loss/total"])
    assert checkpoint.latest_tag(out) == "step_00000002"
    assert _same(_weights(out, 1), _weights(out, 2))


def test_deepspeed_config_never_turns_overflow_checks_off():
    """Every shipped JSON, in fp32 and bf16, builds a config with bf16.check_grad_overflow on;
    a JSON that turns it (or the gradient norm it needs) off is refused."""
    from unilip_ds.config import ConfigError, load_config
    from unilip_ds.engine.ds_config import build_ds_config, load_json
    repo = Path(__file__).resolve().parents[1]
    files = sorted((repo / "ds_configs").glob("*.json"))
    assert files
    for precision in ("fp32", "bf16"):
        cfg = load_config("recon_stage1", ["model.flavor=tiny", f"train.precision={precision}"])
        for f in files:
            ds = build_ds_config(cfg, load_json(str(f)), 2, lr=1e-4)
            assert ds["bf16"]["check_grad_overflow"] is True, f.name
            assert ds["bf16"]["enabled"] is (precision == "bf16") and not ds["fp16"]["enabled"]
            assert ds["zero_optimization"].get("compute_grad_norm", True) is True
            assert ds["gradient_clipping"] > 0  # DeepSpeed computes the norm (ZeRO 1/2 fp32 skip on it)
        raw = load_json(str(files[0]))
        with pytest.raises(ConfigError, match="bf16.check_grad_overflow"):
            build_ds_config(cfg, {**raw, "bf16": {"enabled": "auto", "check_grad_overflow": False}}, 2, lr=1e-4)
        with pytest.raises(ConfigError, match="compute_grad_norm"):
            build_ds_config(cfg, {**raw, "zero_optimization": {"stage": 2, "compute_grad_norm": False}}, 2,
                            lr=1e-4)
    # DeepSpeed reads the key we write (a renamed key would be silently ignored)
    from deepspeed.runtime.precision_config import get_bfloat16_config
    assert get_bfloat16_config({"bf16": {"enabled": True, "check_grad_overflow": True}}).check_grad_overflow
    assert not get_bfloat16_config({"bf16": {"enabled": True, "check_grad_overflow": False}}).check_grad_overflow
