"""The sbatch templates and slurm/launch.sh on a real one-node Slurm cluster (slurmctld +
slurmd as root, config and state in a temp dir): a stage runs to completion with 2 CPU
processes, restarting a SIGKILLed rank in place (UNILIP_MAX_RESTARTS); the time-limit
warning (USR1 to the batch shell, as `--signal=B:USR1@N` sends it) makes the trainers
checkpoint and exit, the job requeues itself and the next run resumes to
max_steps; the generator's stage 2 template trains T2I + edit from a gen_stage1 export,
checkpoints, and its run exports as a UniLIPPipeline. The cluster fixture skips only where
Slurm is not installed or cannot start. The gen templates ask for 2 nodes (the reference's
global batch); on the one-node test cluster `--nodes=1` on the sbatch line overrides that, and
`--gpus-per-node=0` the templates' 8 GPUs (a cluster without GPUs refuses those). The README's
test-cluster lines (slurm/test_cluster.sh, a CPU submission, squeue, the job's log) run as
written; launch/train.py's DeepSpeed extension cache and its note before the op build."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import psutil
import pytest
import torch

from tests.launch_util import REPO, check, env, run, tiny_gen_args, tiny_recon_args
from unilip_ds.engine import checkpoint
from unilip_ds.engine.dist import free_port
from unilip_ds.engine.export import export

SLURM = REPO / "slurm"
TEMPLATES = sorted(SLURM.glob("train_*.sh"))
CLIENT_TIMEOUT = 20  # a client with no controller hangs ~2 min: never wait that long


class SlurmCluster:
    """slurmctld + slurmd in the foreground (so we own their pids), one node, one partition."""

    def __init__(self, root: Path):
        self.root = root
        self.node = "localhost"  # resolves everywhere; it becomes MASTER_ADDR in the jobs
        self.conf = root / "slurm.conf"
        self.procs: List[subprocess.Popen] = []
        self.jobs: List[str] = []
        self.env = env({"SLURM_CONF": str(self.conf)})

    def write_conf(self) -> None:
        r = self.root
        for d in ("state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        ctld_port, slurmd_port = free_port(), free_port()
        self.ctld_port = ctld_port
        self.conf.write_text("\n".join([
            "ClusterName=unilip-test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}", f"SlurmdPort={slurmd_port}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/none", "CredType=cred/none",
            # a requeued job becomes eligible again after the credential lifetime (default
            # 120 s); starting it earlier by hand (StartTime=now) races slurmd's revocation of
            # the old run's credential and fails the job now and then under load
            "AuthInfo=cred_expire=10",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "MpiDefault=none", "ReturnToService=2",
            "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
            "MinJobAge=600",  # finished jobs stay visible to scontrol for the asserts
            "SchedulerParameters=sched_interval=2",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd.log",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")

    def start(self) -> None:
        self.write_conf()
        ctld = self._daemon(["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._listening(self.ctld_port), ctld, "slurmctld")
        slurmd = self._daemon(["slurmd", "-D", "-N", self.node, "-f", str(self.conf)])
        self._wait(lambda: self.client(["sinfo", "-h", "-o", "%t"], check=False).stdout.strip()
                   == "idle", slurmd, "slurmd")

    def _daemon(self, cmd: List[str]) -> subprocess.Popen:
        p = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def _wait(self, ready, proc: subprocess.Popen, name: str, timeout: float = 20) -> None:
        deadline = time.time() + timeout
        while not ready():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{name} did not come up (rc={proc.poll()}):\n{self.logs()}")
            time.sleep(0.2)

    def _listening(self, port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted((self.root / "log").glob("*.log")))

    def client(self, cmd: List[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True,
                              timeout=CLIENT_TIMEOUT, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: rc={proc.returncode}\n{proc.stderr}")
        return proc

    def sbatch(self, template: Path, options: List[str], args: List[str], extra_env: dict) -> str:
        proc = self.client(["sbatch", "--parsable", *options, str(template), *args], cwd=REPO,
                           env={**self.env, **extra_env})
        job = proc.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job: str) -> Dict[str, str]:
        out = self.client(["scontrol", "show", "job", "-o", job]).stdout
        return dict(re.findall(r"(\w[\w/:]*)=(\S*)", out))

    def wait_state(self, job: str, states: tuple, timeout: float, log: Path) -> Dict[str, str]:
        deadline = time.time() + timeout
        while True:
            info = self.job(job)
            if info["JobState"] in states:
                return info
            if time.time() > deadline:
                raise AssertionError(f"job {job} still {info['JobState']} after {timeout}s, "
                                     f"wanted {states}\n{tail(log)}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.jobs:  # a failed test must not leave trainers running
            self.client(["scancel", *self.jobs], check=False)
            deadline = time.time() + 30
            while time.time() < deadline and self.client(
                    ["squeue", "-h", "-t", "RUNNING,COMPLETING", "-j", ",".join(self.jobs)],
                    check=False).stdout.strip():
                time.sleep(0.5)
        for p in reversed(self.procs):  # slurmd first, then the controller
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def tail(path: Path, n: int = 6000) -> str:
    return path.read_text()[-n:] if path.is_file() else f"(no {path})"


def _skip(reason: str):
    pytest.skip(f"no Slurm test cluster: {reason}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        _skip("slurmd must run as root to start jobs")
    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch")):
        # tests do not install system packages; CI runs the script before `make test`
        _skip("Slurm's Debian packages are not installed (as root: bash slurm/install_test_cluster.sh)")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except RuntimeError as exc:
        c.stop()
        _skip(str(exc))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from unilip_ds.data.sample_images import write_caption_tars
    d = tmp_path_factory.mktemp("shards")
    write_caption_tars(d, count=24, per_tar=6, size=256)
    return str(d)


# on the test node: no GPUs, one node, 2 CPU training processes, log into the test's directory
CPU_OPTIONS = ["--gpus-per-node=0", "--nodes=1"]
CPU_ENV = {"NPROC_PER_NODE": "2"}


def stage_args(out: Path, shards: str, steps: int, extra: List[str]) -> List[str]:
    args = tiny_recon_args(out, shards, steps=steps, extra=["wandb.mode=disabled", *extra])
    assert args[:2] == ["--config", "recon_stage1"]  # the template names its stage itself
    return args[2:]


def metrics(out: Path) -> List[dict]:
    f = out / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


def readme_block(first: str, last: str) -> List[str]:
    """The README's indented command lines from the one starting with `first` to the one
    starting with `last`, continuation lines joined."""
    lines = [ln[4:] for ln in (REPO / "README.md").read_text().splitlines() if ln.startswith("    ")]
    start = next(i for i, ln in enumerate(lines) if ln.startswith(first))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith(last))
    out: List[str] = []
    for ln in lines[start:end + 1]:
        if out and out[-1].endswith("\\"):
            out[-1] = out[-1][:-1] + ln.strip()
        else:
            out.append(ln)
    return out


def test_readme_test_cluster_commands_run_as_written(tmp_path):
    """The README's one-node test cluster (slurm/test_cluster.sh) and its CPU submission
    (sbatch --gpus-per-node=0 --nodes=1, NPROC_PER_NODE=2), squeue and the job's log, as
    written; `tail -f` becomes waiting for the job's end, the folder a temporary one. Runs
    before the module's own cluster starts (a second one would share the node's CPUs)."""
    if os.geteuid() != 0:
        _skip("slurmd must run as root to start jobs")
    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch")):
        _skip("Slurm's Debian packages are not installed (as root: bash slurm/install_test_cluster.sh)")
    block = readme_block("bash slurm/install_test_cluster.sh", "bash slurm/test_cluster.sh stop")
    assert block[0].startswith("bash slurm/install_test_cluster.sh")  # installing is the fixture's job
    # a folder too long for slurmstepd's sockets is refused in one line, before any daemon starts
    deep = tmp_path / ("x" * 60) / "cluster"
    proc = subprocess.run(["bash", str(SLURM / "test_cluster.sh"), "start", str(deep)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.startswith("test_cluster.sh: error: ") and "too long for slurmstepd's sockets" in proc.stderr
    assert not (deep / "slurmctld.pid").exists()
    folder = Path(tempfile.mkdtemp(prefix="unilip_slurm_"))  # short, as the README's /tmp/unilip_slurm
    script = []
    for line in block[1:]:
        line = line.replace("/tmp/unilip_slurm", str(folder))
        if line.startswith("tail -f "):
            log = line.split()[2]
            line = (f"echo job=$job; until [[ -z $(squeue -h -j $job) ]]; do sleep 1; done; tail -n 40 {log}; "
                    "scontrol show job -o $job")
        script.append(line)
    assert any(ln.startswith("job=$(NPROC_PER_NODE=2 sbatch --parsable --gpus-per-node=0 --nodes=1 ")
               for ln in script)
    e = {k: v for k, v in env().items() if k != "SLURM_CONF"}
    logs = set((SLURM / "logs").glob("*.out"))
    try:
        proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=REPO, env=e, capture_output=True,
                              text=True, timeout=300)
    finally:
        subprocess.run(["bash", str(SLURM / "test_cluster.sh"), "stop", str(folder)], capture_output=True)
        made = set((SLURM / "logs").glob("*.out")) - logs
        for f in made:  # the job's log, which the README's template writes under the repository
            f.unlink()
    try:
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        job = re.search(r"^job=(\d+)$", proc.stdout, re.M).group(1)
        assert len(made) == 1 and next(iter(made)).name == f"recon_stage1-{job}.out", made
        assert re.search(rf"^\s+{job}\s+debug\s+recon_st", proc.stdout, re.M), out  # squeue's row
        cpus = len(os.sched_getaffinity(0))  # the machine's, though OMP_NUM_THREADS=1 here
        assert f"one node (localhost, {cpus} CPUs" in out
        assert "node 0/1: 2 processes (0 GPUs" in out and "training exited with 0" in out
        assert "JobState=COMPLETED" in out and "ExitCode=0:0" in out
        assert checkpoint.latest_tag(folder / "run") == "step_00000010"
        assert "stopped the cluster" in out and not (folder / "slurmctld.pid").exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_train_py_uses_the_project_extension_cache_and_announces_the_op_build(tmp_path):
    """launch/train.py (under every launcher) puts DeepSpeed's JIT builds in
    <repo>/.cache/torch_extensions unless TORCH_EXTENSIONS_DIR is set, and says so in one line
    before the first, minutes-long build of the CPU communication op (not when it is cached)."""
    code = ("import os, runpy; ns = runpy.run_path('launch/train.py'); "
            "print(os.environ['TORCH_EXTENSIONS_DIR']); ns['announce_op_build']()")
    e = {k: v for k, v in env({"DS_ACCELERATOR": "cpu"}).items() if k != "TORCH_EXTENSIONS_DIR"}
    default = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=e, capture_output=True, text=True,
                             timeout=120)
    assert default.returncode == 0, default.stderr
    assert default.stdout.splitlines()[0] == str(REPO / ".cache" / "torch_extensions")
    empty = tmp_path / "ext"
    fresh = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**e, "TORCH_EXTENSIONS_DIR": str(empty)},
                           capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.splitlines() == [
        str(empty), f"note: DeepSpeed builds its CPU communication op once (about 3 minutes on 2 cores) "
                    f"into {empty}; later runs load it from there"]
    (empty / "deepspeed_shm_comm").mkdir(parents=True)
    (empty / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    cached = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**e, "TORCH_EXTENSIONS_DIR": str(empty)},
                            capture_output=True, text=True, timeout=120)
    assert cached.stdout.splitlines() == [str(empty)], cached.stderr
    on_gpu = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**e, "TORCH_EXTENSIONS_DIR": str(tmp_path / "none"), "DS_ACCELERATOR": "cuda"})
    assert on_gpu.stdout.splitlines() == [str(tmp_path / "none")], on_gpu.stderr


def test_template_runs_a_stage_and_restarts_a_killed_rank_in_place(cluster, shards, tmp_path):
    """The recon template runs a stage to completion with 2 processes; with
    UNILIP_MAX_RESTARTS=1, rank 1 SIGKILLed after step 3 is restarted by torchrun inside the
    same job, the workers resume from step 2 and finish."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = cluster.sbatch(SLURM / "train_recon_stage1.sh", [*CPU_OPTIONS, f"--output={log}"],
                         stage_args(out, shards, 4, []), {**CPU_ENV, "UNILIP_MAX_RESTARTS": "1"})
    deadline = time.time() + 150
    while not any(r["step"] == 3 for r in metrics(out)):
        assert time.time() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), tail(log)
        time.sleep(0.1)
    victim = None
    for p in psutil.process_iter():
        try:
            if str(out) in " ".join(p.cmdline()) and p.environ().get("RANK") == "1" and \
                    "torch.distributed.run" in " ".join(p.parent().cmdline()):
                victim = p
        except psutil.Error:
            continue
    assert victim is not None
    victim.kill()
    info = cluster.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 200, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(log)
    # the template's own directives reached the scheduler
    assert info["JobName"] == "recon_stage1" and info["Requeue"] == "1"
    assert info["TimeLimit"] == "2-00:00:00" and info["OverSubscribe"] == "NO"

    text = log.read_text()
    assert "node 0/1: 2 processes (0 GPUs" in text and f"master {cluster.node}:" in text
    assert "training exited with 0" in text
    assert text.count("resumed from") == 1 and "step_00000002 at step 2" in text, tail(log)
    assert metrics(out)[-1]["step"] == 4 and checkpoint.latest_tag(out) == "step_00000004"
    meta = checkpoint.read_meta(out, "step_00000004")
    assert meta["world_size"] == 2 and meta["step"] == 4


def test_time_limit_signal_checkpoints_requeues_and_resumes(cluster, shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.out"
    steps = 12
    job = cluster.sbatch(SLURM / "train_recon_stage1.sh", [*CPU_OPTIONS, f"--output={log}"],
                         stage_args(out, shards, steps, ["checkpoint.every_steps=1000"]), CPU_ENV)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):
        assert time.time() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), \
            tail(log)
        time.sleep(0.3)
    # what `#SBATCH --signal=B:USR1@120` does near the time limit: USR1 to the batch shell only
    cluster.client(["scancel", "--signal=USR1", "--batch", job])

    info = cluster.wait_state(job, ("PENDING", "COMPLETED", "FAILED", "CANCELLED"), 60, log)
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", (info, tail(log))
    tag = checkpoint.latest_tag(out)  # the only checkpoint: the one the signal asked for
    stopped_at = checkpoint.read_meta(out, tag)["step"]
    assert 1 <= stopped_at < steps, tail(log)
    first = log.read_text()
    assert "got SIGUSR1" in first and "stopping on signal SIGUSR1" in first
    assert "requeueing job" in first

    # the requeued job starts by itself once the credential lifetime (cred_expire) has passed
    info = cluster.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 180, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, tail(log), cluster.logs())
    second = log.read_text()[len(first):]  # --open-mode=append: both runs in one log
    assert "restart 1" in second and "resumed from" in second and tag in second
    assert [r["step"] for r in metrics(out)] == list(range(1, steps + 1))
    assert checkpoint.latest_tag(out) == f"step_{steps:08d}"


def test_launcher_refuses_to_run_outside_slurm():
    e = {k: v for k, v in env().items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(SLURM / "launch.sh"), "recon_stage1"], env=e, cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "not inside a Slurm job" in proc.stderr


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
def test_every_template_names_a_stage_and_the_shared_launcher(template):
    text = template.read_text()
    launch = re.findall(r'^exec "\$\{UNILIP_ROOT:-\$SLURM_SUBMIT_DIR\}/slurm/launch.sh" (\S+) "\$@"$',
                        text, re.M)
    assert launch == [template.stem[len("train_"):]], "the template's stage must match its name"
    assert (REPO / "unilip_ds" / "configs" / f"{launch[0]}.yaml").is_file()
    directives = " ".join(re.findall(r"^#SBATCH (.*)$", text, re.M))
    for needed in ("--signal=B:USR1@", "--requeue", "--open-mode=append", "--ntasks-per-node=1"):
        assert needed in directives, needed
    # the reference's global batch: recon 64 = 1 node x 8 x 8; gen 512 = 2 nodes x 8 x 32
    nodes = 2 if launch[0].startswith("gen_") else 1
    assert f"--nodes={nodes} " in directives and "--gpus-per-node=8" in directives
    assert f"{nodes} node" in text.split("#SBATCH")[0], "the header comment states the node count"
    assert "--gpus-per-node=0" in text.split("#SBATCH")[0], "the header says how to run without GPUs"
    assert os.access(template, os.X_OK)


def test_templates_are_accepted_by_the_scheduler(cluster):
    for template in TEMPLATES:  # --test-only: parsed and validated, never queued
        proc = cluster.client(["sbatch", "--test-only", *CPU_OPTIONS, str(template)], cwd=REPO,
                              check=False)
        assert proc.returncode == 0 and "to start at" in proc.stderr, (template, proc.stderr)


@pytest.fixture(scope="module")
def gen_stage1_export(gen_assets, sample_shards, tmp_path_factory) -> Path:
    """What gen_stage2 starts from: a 2-step gen_stage1 run (1 process) and its export."""
    root = tmp_path_factory.mktemp("gen_stage1")
    out, exp = root / "run", root / "export"
    check(run("launch/train.py", tiny_gen_args(out, "gen_stage1", gen_assets, sample_shards.dir, steps=2,
                                               ds="ds_configs/zero2.json",
                                               extra=["wandb.mode=disabled"])))
    export(out, exp)  # launch/export.py's function (the CLI: test_training)
    return exp


def test_gen_stage2_template_trains_checkpoints_and_exports(cluster, gen_assets, sample_shards,
                                                            sample_edit_shards, gen_stage1_export, tmp_path):
    from unilip_ds.engine.weights import read_weights_dir
    from unilip_ds.inference.pipeline import UniLIPPipeline

    out, log, exp = tmp_path / "run", tmp_path / "job.out", tmp_path / "export"
    args = tiny_gen_args(out, "gen_stage2", gen_assets, sample_shards.dir, sample_edit_shards.dir, steps=4,
                         init_from=gen_stage1_export, extra=["wandb.mode=disabled"])
    assert args[:2] == ["--config", "gen_stage2"]  # the template names its stage itself
    job = cluster.sbatch(SLURM / "train_gen_stage2.sh", [*CPU_OPTIONS, f"--output={log}"], args[2:], CPU_ENV)
    info = cluster.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 180, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(log)
    assert info["JobName"] == "gen_stage2" and info["Requeue"] == "1" and info["NumNodes"] == "1"

    text = log.read_text()
    assert "stage gen_stage2" in text and "node 0/1: 2 processes (0 GPUs" in text
    assert "training exited with 0" in text
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("loss/flow" in r for r in rows)
    assert checkpoint.latest_tag(out) == "step_00000004"
    meta = checkpoint.read_meta(out, "step_00000004")
    assert meta["world_size"] == 2 and meta["step"] == 4
    # the overrides went through sbatch, srun and torchrun intact (the sources one has
    # spaces, braces and commas)
    cfg = meta["config"]
    assert cfg["run"]["name"] == "gen_stage2" and cfg["model"]["init_from"] == str(gen_stage1_export)
    sources = {s["name"]: (s["task"], s["urls"]) for s in cfg["data"]["train"]["sources"]}
    assert sources == {"t2i": ("t2i", [sample_shards.dir]), "edit": ("edit", [sample_edit_shards.dir])}

    export(out, exp)
    pipe = UniLIPPipeline.from_pretrained(str(exp))
    assert type(pipe) is UniLIPPipeline
    # stage 2 trains the DiT it took from the stage-1 export
    a, b = read_weights_dir(exp / "transformer"), read_weights_dir(gen_stage1_export / "transformer")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt=["a cat"], num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    assert images.shape == (1, 3, 224, 224) and torch.isfinite(images).all()


def test_cache_template_builds_a_cache_with_two_ranks(cluster, gen_assets, sample_shards, tmp_path):
    from unilip_ds.data.cache import MANIFEST, CacheManifest
    dst, log = tmp_path / "cache", tmp_path / "job.out"
    job = cluster.sbatch(SLURM / "cache_features.sh", [*CPU_OPTIONS, f"--output={log}"],
                         ["gen_stage2", "--task", "t2i", "--src", sample_shards.dir, "--dst", str(dst),
                          "--what", "latents", "--dtype", "fp32", "--no-progress", *gen_assets.overrides()], CPU_ENV)
    info = cluster.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 180, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(log)
    assert "node 0/1: 2 processes" in log.read_text()
    manifest = CacheManifest.from_json((dst / MANIFEST).read_text())
    assert manifest.level == "latents" and sum(s.samples for s in manifest.shards) == len(sample_shards.keys)
    # both ranks built shards (each its own): rank r takes shards r, r + 2, ...
    parts = [json.loads((dst / "_parts" / f"{s.name}.json").read_text()) for s in manifest.shards]
    assert len(parts) == len(sample_shards.urls) and all(p["samples"] > 0 for p in parts)
    assert [p["rank"] for p in parts] == [i % 2 for i in range(len(parts))]
