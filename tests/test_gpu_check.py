"""benchmarks/gpu_check.py, the one-command CUDA check (issue 19), without a GPU: its dry listing
(steps, order, budgets within 8 minutes), the one-line refusal without CUDA, one step's real
command run on CPU at tiny sizes (flash-attention vs SDPA through tests/flash_standin.py) into
the JSON + markdown report, and the step runner's timeout / failure handling."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch_util import env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402

CPU_ORDER = ["env", "flash_vs_sdpa", "gen_step_flash", "gen_step_sdpa", "recon_stage2_448", "cache_speed", "nccl_2gpu"]
ORDER = ["env", "flash_vs_sdpa", "sdpa_vs_fp32", "gen_step_flash", "gen_step_sdpa", "recon_stage2_448", "cache_speed",
         "nccl_2gpu", "train_1gpu"]


def driver(*args, timeout=120):
    return subprocess.run([sys.executable, "benchmarks/gpu_check.py", *map(str, args)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def test_dry_run_lists_the_steps_in_order_within_the_budget():
    proc = driver("--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    listed = [line.split()[1] for line in out.splitlines() if line[:3].strip().rstrip(".").isdigit()]
    assert listed == ORDER
    budgets = [int(line.split("budget")[1].split()[0]) for line in out.splitlines() if " budget " in line
               and line[:3].strip().rstrip(".").isdigit()]
    steps = {s.name: s for s in gpu_check.plan("cuda", "1b")}
    assert [s.budget_s for s in steps.values()] == budgets and min(budgets) > 0
    # steps that exclude each other (flash imports or not; 2 GPUs or exactly 1): the costlier side counts
    worst = sum(budgets) - min(steps["sdpa_vs_fp32"].budget_s, steps["flash_vs_sdpa"].budget_s
                               + steps["gen_step_flash"].budget_s) - min(steps["train_1gpu"].budget_s,
                                                                         steps["nccl_2gpu"].budget_s)
    assert gpu_check.worst_total(list(steps.values())) == worst <= gpu_check.TOTAL_BUDGET_S - 10 == 470
    assert f"total budget {worst} s on the machine that runs the most (limit 480 s)" in out
    for s in steps.values():  # every command names a script of this repository, shown as typed
        assert (REPO / s.argv[1]).is_file(), s.argv
        assert f"$ .venv/bin/python {s.argv[1]}" in out
    gen = " ".join(steps["gen_step_flash"].argv)
    assert "--flavor 1b --device cuda --dtype bf16 --attn flash --grad-ckpt on,off" in gen and "--stop-at-oom" in gen
    assert "--attn sdpa" in " ".join(steps["gen_step_sdpa"].argv)
    assert "--config recon_stage2_448 --flavor 1b" in " ".join(steps["recon_stage2_448"].argv)
    assert "--div 1 --device cuda --dtype bf16" in " ".join(steps["cache_speed"].argv)
    assert steps["flash_vs_sdpa"].needs == steps["gen_step_flash"].needs == "flash"
    assert steps["nccl_2gpu"].needs == "2gpu" and steps["train_1gpu"].needs == "1gpu"
    assert "--nproc 1" in " ".join(steps["train_1gpu"].argv)
    # the stand-in plays flash on CUDA only in the SDPA check that runs when flash_attn is absent
    assert steps["sdpa_vs_fp32"].needs == "noflash" and "--flash-standin" in steps["sdpa_vs_fp32"].argv
    assert not any("--flash-standin" in a for s in steps.values() if s.name != "sdpa_vs_fp32" for a in s.argv)
    info = {"flash_attn_import": "ModuleNotFoundError: No module named 'flash_attn'", "device_count": 1}
    runs = [s.name for s in steps.values() if not gpu_check.skip_reason(s, info, "cuda")]
    assert runs == ["env", "sdpa_vs_fp32", "gen_step_sdpa", "recon_stage2_448", "cache_speed", "train_1gpu"]
    info = {"flash_attn_import": "ok", "device_count": 2}
    runs = [s.name for s in steps.values() if not gpu_check.skip_reason(s, info, "cuda")]
    assert runs == ["env", "flash_vs_sdpa", "gen_step_flash", "gen_step_sdpa", "recon_stage2_448", "cache_speed",
                    "nccl_2gpu"]
    # the CPU plan: the same scripts at tiny sizes, flash through the stand-in
    cpu = {s.name: s for s in gpu_check.plan("cpu", "tiny")}
    assert list(cpu) == CPU_ORDER and "--flash-standin" in cpu["gen_step_flash"].argv
    assert driver("--dry-run", "--only", "nope").returncode == 2


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_it_says_so_in_one_line(tmp_path):
    proc = driver("--out", tmp_path / "r")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no CUDA device here"), proc.stderr
    assert proc.stdout.strip() == ""


def test_one_step_on_cpu_writes_the_json_and_markdown_report(tmp_path):
    out = tmp_path / "report"
    t0 = time.time()
    proc = driver("--device", "cpu", "--only", "flash_vs_sdpa", "--out", out, "--budget-scale", "4", timeout=300)
    print(f"driver --device cpu --only flash_vs_sdpa: {time.time() - t0:.1f}s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads((out / "gpu_check.json").read_text())
    assert rep["finished"] and rep["flavor"] == "tiny" and rep["device"] == "cpu"
    assert [s["name"] for s in rep["steps"]] == ["env", "flash_vs_sdpa"]
    assert all(s["status"] == "ok" for s in rep["steps"])
    figs = rep["steps"][1]["figures"]
    assert [f["task"] for f in figs] == ["t2i", "edit"]
    for f in figs:
        assert f["pass"] and f["n_failures"] == 0
        assert len(set(f["prompt_lengths"])) == len(f["prompt_lengths"]) > 1  # padded, mixed lengths
        assert f["hidden"]["max_rel_l2"] < 1e-4 and f["grad"]["max_rel_l2"] < 1e-4
        assert f["command"].startswith(".venv/bin/python benchmarks/flash_agree.py --flavor tiny --device cpu")
    md = (out / "gpu_check.md").read_text()
    assert "| 2 | flash_vs_sdpa | ok |" in md and "## flash_vs_sdpa" in md
    assert "`.venv/bin/python benchmarks/flash_agree.py --flavor tiny --device cpu --dtype fp32 --batch 3 " \
           "--flash-standin`" in md
    assert (out / "logs" / "flash_vs_sdpa.out").is_file()


def test_a_hung_step_is_killed_at_its_budget_and_a_failing_one_is_recorded(tmp_path):
    hang = gpu_check.Step("hang", "sleeps", [gpu_check.PY, "-c", "import json, time; print(json.dumps({'a': 1}), "
                                             "flush=True); time.sleep(60)"], 1)
    t0 = time.time()
    r = gpu_check.run_step(hang, sys.executable, 1.0, tmp_path, env())
    assert r.status == "timeout" and r.figures == [{"a": 1}] and time.time() - t0 < 15
    bad = gpu_check.Step("bad", "fails", [gpu_check.PY, "-c", "import sys; print('{\"b\": 2}'); "
                                          "sys.exit('boom: the last stderr line')"], 5)
    r = gpu_check.run_step(bad, sys.executable, 5.0, tmp_path, env())
    assert r.status == "fail" and r.rc == 1 and r.figures == [{"b": 2}]
    assert r.stderr_tail.endswith("boom: the last stderr line")
    md = gpu_check.markdown({"started": "now", "host": "h", "device": "cuda", "flavor": "1b", "command": "c",
                             "total_s": 1.0, "total_budget_s": 480, "finished": True,
                             "steps": [gpu_check.asdict(r)]})
    assert "| 1 | bad | fail: exit status 1 |" in md and "boom: the last stderr line" in md


def test_flash_agreement_verdict_catches_a_broken_mask():
    import torch

    import flash_agree
    g = torch.Generator().manual_seed(0)
    ref = {"prefix.hidden": torch.randn(50, 8, generator=g), "grad.w": torch.randn(8, 8, generator=g)}
    noise = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in ref.items()}  # bf16-like rounding
    close = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in ref.items()}
    assert flash_agree.compare(close, noise, ref, 5e-3)["n_failures"] == 0
    broken = dict(close, **{"prefix.hidden": ref["prefix.hidden"].roll(1, 0)})  # rows mixed up
    res = flash_agree.compare(broken, noise, ref, 5e-3)
    assert res["n_failures"] == 1 and res["failures"][0].startswith("prefix.hidden")
    assert flash_agree.mixed_lengths(4, 120) == [120, 90, 60, 30]
