"""The training core end to end, through launch/train.py and launch/export.py as users
run them: 2 processes over gloo under ZeRO-2 (deepspeed launcher) and ZeRO-3 (torchrun),
plain `python` at world size 1, export -> reload, bad input (the bit-identical resume under
ZeRO-3, after a killed rank: tests/test_fault_tolerance.py)."""

import json
from pathlib import Path

import pytest
import torch

from tests.launch_util import check, run, start_error, tiny_recon_args
from unilip_ds.config import from_dict
from unilip_ds.engine import checkpoint
from unilip_ds.engine.export import consolidated, export
from unilip_ds.tasks.base import MAIN, build_task


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from unilip_ds.data.sample_images import write_caption_tars
    d = tmp_path_factory.mktemp("shards")
    write_caption_tars(d, count=24, per_tar=6, size=256)
    return str(d)


def _metrics(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_zero2_deepspeed_launcher_bf16_and_export(shards, tmp_path, capsys):
    out = tmp_path / "run"
    check(run("launch/train.py", tiny_recon_args(out, shards, steps=4, ds="ds_configs/zero2.json",
                                                 extra=["checkpoint.keep_last=1", "train.grad_accum=2",
                                                        "data.log_keys=true", "wandb.mode=offline"]),
              nproc=2, launcher="deepspeed"))
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss/mse", "loss/lpips", "loss/total", "lr/model", "grad_norm/model",
                "samples_per_s", "step_time_s", "data_wait_frac", "data/skipped/bad_image"):
        assert all(key in r for r in rows), key
    assert rows[0]["lr/model"] == pytest.approx(0.5e-4)  # warmup step 1 of 2
    assert rows[-1]["data/read"] >= 4 * 2 * 2 * 2
    keys = [json.loads(x) for x in (out / "keys" / "rank1.jsonl").read_text().splitlines()]
    assert [k["step"] for k in keys] == [1, 1, 2, 2, 3, 3, 4, 4]  # 2 micro-batches per step
    assert checkpoint.latest_tag(out) == "step_00000004"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000004"]
    assert list((out / "wandb").glob("offline-run-*"))

    # export -> reload through model.init_from's path equals the live (checkpointed) weights
    # (the EMA export through the CLI, the raw one through its function in process)
    for ema in (True, False):
        exp = tmp_path / f"export_ema{ema}"
        if ema:
            check(run("launch/export.py", ["--run", str(out), "--out", str(exp)]))
        else:
            export(out, exp, use_ema=False)
        info = json.loads((exp / "export.json").read_text())
        assert info["weights"] == ("ema" if ema else "raw") and info["step"] == 4
        cfg, live, _ = consolidated(out, use_ema=ema)
        task = build_task(cfg)
        modules = task.build_modules()
        task.init_from(modules, str(exp))
        reloaded = modules[MAIN].state_dict()
        comps = task.export_components(modules[MAIN])
        exported = {id(p) for c in comps.values() for p in c.parameters()}
        n = 0
        for name, p in modules[MAIN].named_parameters():
            if id(p) in exported:
                assert torch.equal(reloaded[name].float(), live[name].float()), name
                n += 1
        assert n > 0
    from launch.export import main as export_main  # the CLI's main in process
    capsys.readouterr()
    assert export_main(["--run", str(out), "--out", str(exp)]) == 2
    assert "not empty" in capsys.readouterr().err  # never overwrites


def test_plain_python_world_size_1_and_incompatible_run_dir(shards, tmp_path, capsys):
    out = tmp_path / "run"
    check(run("launch/train.py", tiny_recon_args(out, shards, steps=2, extra=["wandb.mode=disabled"])))
    meta = checkpoint.read_meta(out, "step_00000002")
    assert meta["world_size"] == 1 and from_dict(meta["config"]).train.max_steps == 2
    before = (out / "config.yaml").read_text()
    line = start_error(tiny_recon_args(out, shards, steps=2, extra=["model.flavor=1b"]), capsys)
    assert "belongs to a run with model.flavor='tiny'" in line
    assert (out / "config.yaml").read_text() == before


def test_missing_and_empty_data_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for spec, msg in (('"%s"' % (tmp_path / "nope" / "x-{0..3}.tar"), "does not exist"),
                      (tmp_path / "empty", "no *.tar")):
        assert msg in start_error(tiny_recon_args(tmp_path / "run", str(spec)), capsys)
    assert not (tmp_path / "run").exists()


def test_sigusr1_checkpoints_and_stops(shards, tmp_path):
    """A scheduler's time-limit warning: checkpoint at the next step, exit 0, resume later."""
    import signal
    import subprocess
    import sys
    import time

    from tests.launch_util import REPO, env
    out = tmp_path / "run"
    args = tiny_recon_args(out, shards, steps=1000, extra=["wandb.mode=disabled",
                                                            "checkpoint.every_steps=1000"])
    proc = subprocess.Popen([sys.executable, "launch/train.py", *args], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "stopping on signal SIGUSR1" in output
    tag = checkpoint.latest_tag(out)
    step = checkpoint.read_meta(out, tag)["step"]
    assert 1 <= step < 1000 and _metrics(out)[-1]["step"] == step


# -- tests that protect the checkpoint ----------------------------------------------------

def test_checkpoint_restores_every_rng_stream(tmp_path):
    """save/load round trip of the Python, NumPy and torch RNG states (skipping the
    restore, or one stream of it, fails here)."""
    import random

    import numpy as np
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    checkpoint.save(tmp_path, 1, {}, {}, {}, keep_last=1)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(7)  # every stream moves on
    checkpoint.load(tmp_path, "step_00000001", {})
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


class _SlowToPickle:
    """Delays the torch.save of the rank that holds it (a slow filesystem), then leaves a
    marker once its part of the file is written."""

    def __init__(self, seconds: float, done: str):
        self.seconds, self.done = seconds, done

    def __reduce__(self):
        import time
        time.sleep(self.seconds)
        Path(self.done).touch()
        return (int, (0,))


def _save_two_ranks(rank: int, out: str, port: int) -> None:
    import os

    import torch.distributed as tdist
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    checkpoint.save(out, 1, {}, {}, {}, keep_last=3)
    slow = {"slow": _SlowToPickle(3.0, f"{out}/rank1_written")} if rank == 1 else {}
    checkpoint.save(out, 2, {}, slow, {}, keep_last=3)
    tdist.destroy_process_group()


def test_latest_moves_only_after_every_rank_wrote(tmp_path):
    """Rank 1's files of step 2 are slow to write: until they are, `latest` still names
    step 1 (removing the barrier before `latest` moves fails here)."""
    import time

    import torch.multiprocessing as mp

    from unilip_ds.engine.dist import free_port
    procs = [mp.get_context("spawn").Process(target=_save_two_ranks, args=(r, str(tmp_path), port))
             for port in [free_port()] for r in range(2)]
    for p in procs:
        p.start()
    step2, done, seen = tmp_path / "checkpoints" / "step_00000002", tmp_path / "rank1_written", 0
    while any(p.is_alive() for p in procs):
        if (step2 / "rank00000.pt").is_file() and not done.exists():
            assert checkpoint.latest_tag(tmp_path) == "step_00000001"
            seen += 1
        time.sleep(0.05)
    assert all(p.exitcode == 0 for p in procs)
    assert seen > 10  # rank 0 had finished step 2 while rank 1 was still writing
    assert checkpoint.latest_tag(tmp_path) == "step_00000002"
