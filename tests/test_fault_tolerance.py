"""Fault tolerance through launch/train.py as users run it (2 ranks over gloo, torchrun):
a rank killed with SIGKILL (between checkpoints and in the middle of a checkpoint write,
under ZeRO-3: the resume is bit-identical),
torchrun --max-restarts (slurm/launch.sh's UNILIP_MAX_RESTARTS: tests/test_slurm.py), a stalled rank
(dist.timeout_s), non-finite losses on one rank, Ctrl-C, and run directories that are
never mixed or clobbered."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import List, Optional

import psutil
import pytest
import torch

from tests.launch_util import BIN, REPO, _port, check, env, run, start_error, tiny_recon_args
from unilip_ds.engine import checkpoint
from unilip_ds.engine.export import consolidated


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from unilip_ds.data.sample_images import write_caption_tars
    d = tmp_path_factory.mktemp("shards")
    write_caption_tars(d, count=24, per_tar=6, size=256)
    return str(d)


def _metrics(out: Path) -> List[dict]:
    f = out / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []


def _args(out, shards, extra=(), wandb="disabled"):
    return tiny_recon_args(out, shards, steps=4, extra=["train.precision=fp32", f"wandb.mode={wandb}",
                                                        *extra])


def _torchrun(args: List[str], log: Path, restarts: int = 0) -> subprocess.Popen:
    # the static rendezvous, as slurm/launch.sh starts torchrun
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_port()),
           "--max-restarts", str(restarts), "launch/train.py", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _rank_pid(proc: subprocess.Popen, rank: int, not_pid: Optional[int] = None) -> Optional[int]:
    for child in psutil.Process(proc.pid).children():  # the workers, not their data workers
        try:
            if "launch/train.py" in " ".join(child.cmdline()) and \
                    child.environ().get("RANK") == str(rank) and child.pid != not_pid:
                return child.pid
        except psutil.Error:
            continue
    return None


def _wait(cond, proc: subprocess.Popen, log: Path, timeout: float = 300, poll: float = 0.05):
    deadline = time.time() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
        time.sleep(poll)


def _resume_args(out, shards):  # ZeRO-3, the data stream's keys logged, W&B offline
    return tiny_recon_args(out, shards, steps=4, ds="ds_configs/zero3.json", extra=[
        "train.precision=fp32", "wandb.mode=offline", "data.log_keys=true"])


def _by_step(rows: List[dict]) -> dict:
    """Records by step; a step run again after a resume is logged again, and its last record counts."""
    return {r["step"]: r for r in rows}


def test_killed_rank_restarts_and_resume_is_bit_identical(shards, tmp_path):
    """ZeRO-3, 2 ranks under torchrun. SIGKILL of rank 1 after step 3 (between checkpoints):
    torchrun --max-restarts 1 restarts both workers, which resume from step 2. SIGKILL again
    while step 4 is being written: no restarts left, the job fails, the half-written step 4
    is not `latest`. The same command again resumes from step 2 and ends bit-identical to an
    uninterrupted run (weights, EMA, losses, the data stream's keys), in the same W&B run;
    its save of step 4 replaced the half-written directory."""
    full, out, log = tmp_path / "full", tmp_path / "run", tmp_path / "log.txt"
    check(run("launch/train.py", _resume_args(full, shards), nproc=2, launcher="torchrun"))

    proc = _torchrun(_resume_args(out, shards), log, restarts=1)
    try:
        _wait(lambda: any(r["step"] == 3 for r in _metrics(out)), proc, log)
        first = _rank_pid(proc, 1)
        os.kill(first, signal.SIGKILL)
        step4 = out / "checkpoints" / "step_00000004"
        _wait(lambda: "resumed from" in log.read_text(), proc, log)
        # the restarted workers resume from step 2 and reach the save of step 4
        second = _wait(lambda: step4.is_dir() and _rank_pid(proc, 1, not_pid=first), proc, log, poll=0.001)
        os.kill(second, signal.SIGKILL)
        assert proc.wait(timeout=300) != 0  # no restart left: the launcher's job fails
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert text.count("resumed from") == 1 and "step_00000002 at step 2" in text, text[-4000:]
    assert checkpoint.latest_tag(out) == "step_00000002"
    assert step4.is_dir() and not checkpoint.is_complete(step4)  # killed during the write
    run_id = checkpoint.read_meta(out, "step_00000002")["wandb_run_id"]
    assert run_id  # W&B offline: the id that the resumed run must continue

    proc2 = check(run("launch/train.py", _resume_args(out, shards), nproc=2, launcher="torchrun"))
    assert "step_00000002 at step 2" in proc2.stdout
    assert checkpoint.latest_tag(out) == "step_00000004" and checkpoint.is_complete(step4)
    assert checkpoint.read_meta(out, "step_00000004")["wandb_run_id"] == run_id
    for ema in (False, True):
        a, b = consolidated(full, ema)[1], consolidated(out, ema)[1]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"ema={ema}"
    ma, mb = _by_step(_metrics(full)), _by_step(_metrics(out))
    assert sorted(ma) == sorted(mb) == [1, 2, 3, 4]
    assert all(ma[s]["loss/total"] == mb[s]["loss/total"] for s in ma)
    for r in (0, 1):  # the data stream resumed exactly: same keys at every step
        ka, kb = ({k["step"]: k["keys"] for k in map(json.loads, (d / "keys" / f"rank{r}.jsonl").read_text()
                   .splitlines())} for d in (full, out))
        assert ka == kb and sorted(ka) == [1, 2, 3, 4]
    # ZeRO-3 partitions parameters before the task splits them: matrices still decay
    optim = next((full / "checkpoints" / "step_00000004" / "model").rglob("*optim_states.pt"))
    state = torch.load(optim, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    decays = sorted({g["weight_decay"] for g in state["optimizer_state_dict"]["param_groups"]})
    assert decays == [0.0, 1e-4], decays


def test_stalled_rank_times_out_naming_the_step(shards, tmp_path):
    """A rank that stops answering (SIGSTOP) turns the other's next collective into an
    error naming the step within dist.timeout_s; the job exits non-zero."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = _torchrun(_args(out, shards, ["train.max_steps=1000", "checkpoint.every_steps=1000",
                                         "dist.timeout_s=10"]), log)
    stalled = None
    try:
        _wait(lambda: len(_metrics(out)) >= 2, proc, log)
        stalled = _rank_pid(proc, 1)
        os.kill(stalled, signal.SIGSTOP)
        t0 = time.time()
        _wait(lambda: "error: rank 0: step" in log.read_text(), proc, log, timeout=60)
        waited = time.time() - t0
        # torchrun now stops the stalled rank (SIGTERM, SIGKILL after 30 s); let it see its
        # SIGTERM at once to keep the test short
        os.kill(stalled, signal.SIGCONT)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc != 0 and 10 <= waited < 40, text[-3000:]
    line = next(x for x in text.splitlines() if "error: rank 0: step" in x)
    step = _metrics(out)[-1]["step"]
    # gloo's timeout or the trainer's watchdog (DeepSpeed's CPU all-reduce has no timeout)
    assert f"step {step + 1}: " in line and "dist.timeout_s=10" in line, line


def test_nonfinite_losses_skip_and_roll_back(s3_server, s3_sample_shards, tmp_path):
    """NaN in rank 1's micro-batches 3, 5 and 6: each of those steps is skipped on both
    ranks (weights, optimizer and LR schedule unchanged), counted and logged with the
    batch keys; the second in a row (step 6) rolls back to the last checkpoint (step 5) with
    the LR halved, and the run goes on with new batches to the end. The data comes from S3: the secret
    key appears nowhere in what training writes (console, config, checkpoints, metrics,
    W&B files)."""
    out = tmp_path / "run"
    proc = check(run("launch/train.py", _args(out, s3_sample_shards.dir, wandb="offline", extra=[
        "train.max_steps=6", "checkpoint.every_steps=1", "checkpoint.keep_last=10", "data.log_keys=true",
        "train.on_nonfinite=rollback", "train.max_nonfinite_in_a_row=2", "train.rollback_lr_scale=0.5",
        "train.test_nan_batches=[3,5,6]"]), nproc=2, launcher="torchrun"))
    secret = s3_server.secret_key.encode()
    assert secret not in (proc.stdout + proc.stderr).encode()
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in written) and list((out / "wandb").rglob("*.wandb"))
    assert not [p for p in written if secret in p.read_bytes()]
    keys1 = [json.loads(x) for x in (out / "keys" / "rank1.jsonl").read_text().splitlines()]
    assert [k["step"] for k in keys1] == [1, 2, 3, 4, 5, 6, 6]  # 6 again after the rollback
    assert keys1[6]["keys"] != keys1[5]["keys"]  # on new batches
    logged = [line for line in proc.stdout.splitlines() if "non-finite loss (model) on rank" in line]
    assert len(logged) == 3 and all("on rank 1" in x for x in logged)
    for line, k in zip(logged, (keys1[2], keys1[4], keys1[5])):
        assert str(k["keys"]) in line
    assert "rolled back to step_00000005 after 2 non-finite steps in a row: LR x0.5" in proc.stdout

    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # the rolled-back step 6 is not logged
    assert [r["train/skipped_nonfinite"] for r in rows] == [0, 0, 1, 1, 2, 3]
    assert rows[3]["lr/model"] == rows[2]["lr/model"]  # the skipped step did not move the schedule
    assert rows[5]["lr/model"] == pytest.approx(0.5 * rows[4]["lr/model"])
    assert [i for i, r in enumerate(rows) if r["loss/total"] != r["loss/total"]] == [2, 4]  # NaN
    # skipped steps 3 and 5 left the weights as steps 2 and 4 wrote them; 4 and 6 trained
    w = {s: consolidated_at(out, s) for s in (2, 3, 4, 5, 6)}
    for a, b, same in ((2, 3, True), (3, 4, False), (4, 5, True), (5, 6, False)):
        assert all(torch.equal(w[a][k], w[b][k]) for k in w[a]) == same, (a, b)
    meta = checkpoint.read_meta(out, "step_00000006")
    assert meta["lr_scale"] == 0.5 and meta["skipped_nonfinite"] == 3


def consolidated_at(out: Path, step: int):
    from unilip_ds.engine.export import raw_weights
    return raw_weights(checkpoint.ckpt_root(out) / f"step_{step:08d}", "model")


def test_nonfinite_stop_and_run_dir_never_mixed_or_clobbered(shards, tmp_path, capsys):
    """NaN in two batches in a row with train.on_nonfinite=stop: one error line, exit 3.
    On the run it leaves: another stage's engines and checkpoint.resume=false are refused
    before anything of it is written; a changed LR on resume is applied and said;
    run.overwrite=true moves the whole run aside."""
    out = tmp_path / "run"
    proc = run("launch/train.py", _args(out, shards, ["train.on_nonfinite=stop", "train.test_nan_batches=[2,3]",
                                                      "train.max_nonfinite_in_a_row=2"]))
    assert proc.returncode == 3, proc.stderr[-3000:]
    err = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "step 3: 2 steps in a row with a non-finite loss" in err[0]
    assert checkpoint.latest_tag(out) == "step_00000002"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    # recon_stage2's engines (model + disc) on a recon_stage1 run dir (launch/train.py's
    # main in process: the check comes before any process group)
    line = start_error(_args(out, shards, ["recon.gan_start_step=0"]), capsys)
    assert "holds a recon run (run.name=" in line and "model.init_from=DIR" in line
    assert "trains engines ['model']; this config trains ['model', 'disc']" in line
    assert "run.overwrite=true" in start_error(_args(out, shards, ["checkpoint.resume=false"]), capsys)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # a changed LR on resume is applied from the next step and logged
    proc = check(run("launch/train.py", _args(out, shards, ["train.max_steps=3", "optim.lr=1e-3"])))
    assert "resume: optim.lr 0.0001 -> 0.001 (applied from step 3)" in proc.stdout
    rows = _metrics(out)  # step 2 was skipped: the schedule is where step 1 left it (warmup done)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["lr/model"] == pytest.approx(1e-3)

    # run.overwrite=true moves the whole run aside, nothing is deleted
    proc = check(run("launch/train.py", _args(out, shards, ["train.max_steps=1", "run.overwrite=true"])))
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and checkpoint.latest_tag(moved[0]) == "step_00000003"
    assert [r["step"] for r in _metrics(moved[0])] == [1, 2, 3]
    assert [r["step"] for r in _metrics(out)] == [1] and checkpoint.latest_tag(out) == "step_00000001"


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_and_scancel_checkpoint_at_the_next_step(sig, shards, tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C, and SIGTERM to every
    process, as Slurm's plain scancel (data workers included)."""
    out = tmp_path / "run"
    args = _args(out, shards, ["train.max_steps=1000", "checkpoint.every_steps=1000"])
    proc = subprocess.Popen([str(BIN / "python"), "launch/train.py", *args], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while not _metrics(out):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, getattr(signal, sig))
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert f"stopping on signal {sig}" in output and "Traceback" not in output
    tag = checkpoint.latest_tag(out)
    assert tag is not None and checkpoint.read_meta(out, tag)["step"] == _metrics(out)[-1]["step"]


def test_lecam_emas_ignore_a_nonfinite_batch():
    """The GAN's LeCam EMAs (buffers the skipped step does not roll back) keep their value
    through a NaN batch, so the steps after it are finite again."""
    from unilip_ds.models.discriminator import LeCamEMA
    ema = LeCamEMA(0.9)
    ema(torch.ones(4), torch.zeros(4))
    before = (ema.real.clone(), ema.fake.clone())
    ema(torch.full((4,), float("nan")), torch.full((4,), float("inf")))
    assert torch.equal(ema.real, before[0]) and torch.equal(ema.fake, before[1])
    assert torch.isfinite(ema(torch.ones(4), torch.zeros(4)))
