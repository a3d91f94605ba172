"""Every CUDA check of the project in one run, within 8 minutes on one H100 / H200:
an ordered list of steps, each a command with its own time budget, run as a subprocess that is
killed (with its children) when its budget is spent, so one hang cannot eat the rest. Each
step's JSON lines are its figures; a failing step is recorded with the last lines of its
stderr and the run goes on. Writes <out>/gpu_check.json and <out>/gpu_check.md (rewritten after
every step, so an interrupted run still leaves a report) and each step's output under
<out>/logs/. Every figure carries the command that produced it.

    bash benchmarks/gpu_check.sh                                  # installs flash-attn if needed, then this
    .venv/bin/python benchmarks/gpu_check.py --dry-run            # the plan: order, commands, budgets
    .venv/bin/python benchmarks/gpu_check.py --out gpu_check_out  # run everything (needs CUDA)
    .venv/bin/python benchmarks/gpu_check.py --only gen_step_sdpa # one step again (env always runs first)
    .venv/bin/python benchmarks/gpu_check.py --device cpu --flavor tiny --only flash_vs_sdpa  # CPU, tiny sizes

Steps (1b flavor, random weights, bf16): env (versions, devices, whether flash_attn imports);
flash_vs_sdpa (benchmarks/flash_agree.py: hidden states and gradients of the condition path,
flash against SDPA, each against an fp32 SDPA reference, padded batch of mixed prompt
lengths, T2I and edit); gen_step_flash / gen_step_sdpa (benchmarks/gen_step.py: gen_stage2
step time, samples/s, peak memory, MFU, activation checkpointing on and off, growing batch
sizes until one runs out of memory); recon_stage2_448 (benchmarks/recon_step.py); cache_speed
(benchmarks/cache_speed.py at the real widths on CUDA bf16); nccl_2gpu (benchmarks/nccl_check.py,
torchrun x 2 over NCCL; skipped with fewer than 2 GPUs) or, on a one-GPU machine, train_1gpu
(the same trainer run as one process). When flash_attn does not import, the flash steps are
skipped (the report says why) and sdpa_vs_fp32 runs flash_agree.py with the plain-torch
stand-in in flash's place: the CUDA SDPA kernels under the project's masks against an fp32
reference at the real shapes (the stand-in is no flash-attn kernel: its column says nothing
about flash-attn). Without CUDA (and without `--device cpu`)
the run stops with one line and exit status 2. `--device cpu` runs the same scripts on the
tiny flavor (flash steps through tests/flash_standin.py, the 2-process step over gloo): the
command lines' own check, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOTAL_BUDGET_S = 480  # 8 minutes on one H100 / H200, every step included
PY = "{python}"  # replaced by the interpreter that runs this driver


@dataclass
class Step:
    name: str
    what: str
    argv: List[str]
    budget_s: int
    needs: str = ""  # "" | "flash" (flash_attn imports) | "noflash" (it does not) | "2gpu" | "1gpu" (exactly 1)


@dataclass
class Result:
    name: str
    command: str
    budget_s: float
    status: str  # ok | fail | timeout | skipped
    seconds: float = 0.0
    rc: Optional[int] = None
    figures: List[Dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    stderr_tail: str = ""
    what: str = ""


def plan(device: str = "cuda", flavor: str = "1b", out: str = "gpu_check_out") -> List[Step]:
    """The ordered steps. `flavor` other than tiny: the real sizes (1b: what fits the budget on
    one H100 / H200); tiny: a few samples, one timed step (the CPU check of the commands)."""
    big = flavor != "tiny"
    cpu = device == "cpu"
    dev = ["--flavor", flavor, "--device", device, "--dtype", "fp32" if cpu else "bf16"]
    standin = ["--flash-standin"] if cpu else []
    steps = "3" if big else "1"

    agree = [PY, "benchmarks/flash_agree.py", *dev, "--batch", "4" if big else "3"]

    def gen(attn: str, batches: str) -> List[str]:
        return [PY, "benchmarks/gen_step.py", *dev, "--attn", attn, "--grad-ckpt", "on,off", "--batch", batches,
                "--stop-at-oom", "--steps", steps] + (standin if attn == "flash" else [])
    return [
        Step("env", "torch / CUDA / NCCL versions, devices, the peak-FLOPS table's entry, whether flash_attn imports",
             [PY, "benchmarks/gpu_env.py"], 30),
        Step("flash_vs_sdpa", f"flash-attn vs SDPA on the {flavor} condition path (prefix pass, query pass, "
             "connector; vision tower for edit), padded batch of mixed prompt lengths, T2I + edit: hidden states "
             "and gradients, each backend against an fp32 SDPA reference",
             agree + standin, 55, "flash"),
    ] + ([] if cpu else [
        Step("sdpa_vs_fp32", f"flash_attn does not import: the same comparison on the {flavor} shapes with "
             "tests/flash_standin.py (plain torch) in flash's place, so the CUDA SDPA kernels under the project's "
             "masks are checked against an fp32 reference (the 'flash' column is the stand-in, not flash-attn)",
             agree + ["--flash-standin"], 55, "noflash"),
    ]) + [
        Step("gen_step_flash", f"gen_stage2 training step at {flavor} dims (random weights), flash-attn: step time, "
             "samples/s, peak memory, MFU; activation checkpointing on and off; batch sizes until out of memory",
             gen("flash", "32,64,128,256" if big else "2"), 90, "flash"),
        Step("gen_step_sdpa", "the same with SDPA",
             gen("sdpa", "32,64,128,256" if big else "2"), 95),
        Step("recon_stage2_448", f"recon_stage2_448 training step at {flavor} (encoder + decoder, distillation, "
             "GAN from step 0, checkpointing): step time, samples/s, peak memory, MFU; batch 8 / 16 / 32",
             [PY, "benchmarks/recon_step.py", "--config", "recon_stage2_448", *dev,
              "--batch", "8,16,32" if big else "2", "--stop-at-oom", "--steps", steps]
             + ([] if big else ["--resolution", "224"]), 70),
        Step("cache_speed", "benchmarks/cache_speed.py at the real widths: gen_stage2 step per frozen-output "
             "cache level (none / latents / prefix), T2I + edit, against the FLOP prediction",
             [PY, "benchmarks/cache_speed.py", "--flavor", flavor, "--div", "1", "--device", device,
              "--dtype", "fp32" if cpu else "bf16", "--batch", "32" if big else "2", "--steps", "2" if big else "1",
              "--warmup", "1" if big else "0", "--json"] + ([] if big else ["--words", "8"]), 70),
        Step("nccl_2gpu", "2 processes (torchrun) train tiny recon_stage1 under DeepSpeed ZeRO-2 over NCCL"
             + (" (CPU: over gloo)" if cpu else ""),
             [PY, "benchmarks/nccl_check.py", "--work", f"{out}/nccl_work", "--steps", "4", "--timeout", "55"]
             + (["--cpu"] if cpu else []), 60, "" if cpu else "2gpu"),
    ] + ([] if cpu else [
        Step("train_1gpu", "one GPU: the same trainer run as one process (torchrun, DeepSpeed ZeRO-2, bf16, NCCL "
             "group of 1): the trainer's CUDA path, its MFU / memory lines and run summary",
             [PY, "benchmarks/nccl_check.py", "--work", f"{out}/train_1gpu_work", "--nproc", "1", "--steps", "4",
              "--timeout", "55"], 60, "1gpu"),
    ])


def display(argv: List[str], python: str) -> str:
    """The command as a user types it from the repository root."""
    py = python
    try:
        py = os.path.relpath(python, ROOT) if Path(python).resolve().is_relative_to(ROOT) else python
    except ValueError:
        pass
    if Path(python).parent == ROOT / ".venv" / "bin":
        py = ".venv/bin/python"  # the venv's python (a symlink: not resolved)
    return " ".join(shlex.quote(py if a == PY else a) for a in argv)


def worst_total(steps: List[Step]) -> int:
    """The budget on the machine that runs the most: of the steps that exclude each other
    (flash imports or not; 2 GPUs or exactly 1), the costlier side counts."""
    by = {n: sum(s.budget_s for s in steps if s.needs == n) for n in ("flash", "noflash", "2gpu", "1gpu")}
    return sum(s.budget_s for s in steps if not s.needs) + max(by["flash"], by["noflash"]) + \
        max(by["2gpu"], by["1gpu"])


def print_plan(steps: List[Step], python: str, scale: float, device: str, flavor: str) -> None:
    total = worst_total(steps)
    print(f"gpu_check plan ({device}, flavor {flavor}): {len(steps)} steps in this order, each a subprocess with "
          f"its own time budget; total budget {total * scale:.0f} s on the machine that runs the most "
          f"(limit {TOTAL_BUDGET_S * scale:.0f} s)")
    for i, s in enumerate(steps, 1):
        needs = {"flash": "  [skipped unless flash_attn imports]",
                 "noflash": "  [only when flash_attn does not import]", "2gpu": "  [skipped with fewer than 2 GPUs]", "1gpu": "  [only with exactly 1 GPU]"}
        print(f"{i:>2}. {s.name:<17} budget {s.budget_s * scale:>4.0f} s{needs.get(s.needs, '')}")
        print(f"    {s.what}")
        print(f"    $ {display(s.argv, python)}")
    print(f"writes <out>/gpu_check.json, <out>/gpu_check.md, <out>/logs/<step>.out|.err")


# -- running ------------------------------------------------------------------------------
def child_env(device: str) -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env["DS_ACCELERATOR"] = "cpu" if device == "cpu" else "cuda"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def parse_figures(text: str) -> List[Dict[str, Any]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    keep = [x for x in text.splitlines() if x.strip()]
    return "\n".join(keep[-lines:])


def run_step(step: Step, python: str, timeout: float, logs: Path, env: Dict[str, str]) -> Result:
    argv = [python if a == PY else a for a in step.argv]
    res = Result(step.name, display(step.argv, python), round(timeout, 1), "ok", what=step.what)
    out_path, err_path = logs / f"{step.name}.out", logs / f"{step.name}.err"
    t0 = time.time()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=err, env=env, start_new_session=True)
        try:
            res.rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)  # the step's own process group (torchrun's workers too)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            res.status, res.rc = "timeout", proc.returncode
            res.reason = f"over its budget of {timeout:.0f} s: killed"
    res.seconds = round(time.time() - t0, 1)
    res.figures = parse_figures(out_path.read_text(errors="replace"))
    if res.status == "ok" and res.rc != 0:
        res.status = "fail"
        res.reason = f"exit status {res.rc}"
    if res.status != "ok":
        res.stderr_tail = tail(err_path)
    return res


def skip_reason(step: Step, env_info: Dict[str, Any], device: str) -> str:
    if device == "cpu":
        return ""
    if step.needs == "flash" and env_info.get("flash_attn_import") != "ok":
        return f"flash_attn does not import ({env_info.get('flash_attn_import', 'unknown')})"
    if step.needs == "noflash" and env_info.get("flash_attn_import") == "ok":
        return "flash_attn imports: flash_vs_sdpa runs instead"
    if step.needs == "1gpu" and int(env_info.get("device_count", 0)) != 1:
        return f"runs on a one-GPU machine only (nccl_2gpu covers more), found {env_info.get('device_count', 0)}"
    if step.needs == "2gpu" and int(env_info.get("device_count", 0)) < 2:
        return f"needs 2 CUDA devices, found {env_info.get('device_count', 0)}"
    return ""


# -- the report ---------------------------------------------------------------------------
def _f(v, fmt="{:.3g}"):
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return fmt.format(v)
    return str(v)


def _pct(v):
    return "n/a" if v is None else f"{100 * v:.1f}%"


def figure_tables(r: Result) -> List[str]:
    """Markdown tables of one step's figures, each row with its command."""
    rows = [f for f in r.figures if not f.get("skipped")]
    if not rows:
        return []
    if r.name == "env":
        e = rows[0]
        devs = ", ".join(f"{d['name']} ({d['memory_gib']} GiB, sm {d['capability']})" for d in e.get("devices", []))
        return [f"torch {e.get('torch')} (CUDA {e.get('torch_cuda')}, cuDNN {e.get('cudnn', 'n/a')}, NCCL "
                f"{e.get('nccl', 'n/a')}), python {e.get('python')}; devices: {devs or 'none'}; peak bf16 "
                f"{_f(e.get('peak_tflops_bf16'))} TFLOPS ({e.get('peak_source', 'n/a')}), measured bf16 matmul "
                f"{_f(e.get('matmul_bf16_tflops'))} TFLOPS (8192^3, random data); flash_attn "
                f"{e.get('flash_attn') or 'not installed'} (import: {e.get('flash_attn_import')}); transformers "
                f"{e.get('transformers')}, diffusers {e.get('diffusers')}, deepspeed {e.get('deepspeed')}; "
                f"nvidia-smi: {e.get('nvidia_smi', 'n/a')}", "", f"`{r.command}`"]
    if r.name in ("flash_vs_sdpa", "sdpa_vs_fp32"):
        lines = ["| task | pass | prompt lengths | hidden: max abs / rel L2 (flash vs sdpa) | grad: max abs / rel L2 "
                 "| rel L2 to fp32: flash / sdpa (hidden; grad) | worst tensor | command |", "|---|---|---|---|---|---|---|---|"]
        for f in rows:
            h, g = f.get("hidden", {}), f.get("grad", {})
            lines.append(f"| {f.get('task')} | {_f(f.get('pass'))} | {f.get('prompt_lengths')} | "
                         f"{_f(h.get('max_abs'))} / {_f(h.get('max_rel_l2'))} | {_f(g.get('max_abs'))} / "
                         f"{_f(g.get('max_rel_l2'))} | {_f(h.get('max_flash_vs_fp32'))} / {_f(h.get('max_sdpa_vs_fp32'))}; "
                         f"{_f(g.get('max_flash_vs_fp32'))} / {_f(g.get('max_sdpa_vs_fp32'))} | "
                         f"{g.get('worst')} | `{f.get('command')}` |")
            if f.get("failures"):
                lines.append(f"| | failures: {'; '.join(f['failures'])} | | | | | | |")
        return lines
    if r.name.startswith("gen_step") or r.name.startswith("recon"):
        lines = ["| attn | grad ckpt | batch | step s | samples/s | peak GiB (alloc / reserved) | TFLOPS | MFU | command |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for f in rows:
            if f.get("oom"):
                lines.append(f"| {f.get('attn', '-')} | {_f(f.get('grad_checkpointing'))} | {f.get('batch')} | "
                             f"out of memory | | | | | `{f.get('command')}` |")
                continue
            lines.append(f"| {f.get('attn', '-')} | {_f(f.get('grad_checkpointing'))} | {f.get('batch')} | "
                         f"{_f(f.get('step_s'), '{:.4g}')} | {_f(f.get('samples_per_s'), '{:.4g}')} | "
                         f"{_f(f.get('peak_mem_gib'))} / {_f(f.get('peak_reserved_gib'))} | "
                         f"{_f(f.get('tflops_per_s'), '{:.4g}')} | {_pct(f.get('mfu'))} | `{f.get('command')}` |")
        f0 = next((f for f in rows if "gflops_per_step" in f), None)
        if f0:
            lines.append("")
            lines.append(f"FLOPs per sample {f0['flops'] / f0['batch'] / 1e9:.1f} G (unilip_ds.flops, meta device), "
                         f"peak {_f(f0.get('peak_tflops'))} TFLOPS ({f0.get('peak_source')}), "
                         f"{f0.get('trainable_params', 0) / 1e6:.1f} M trainable parameters (torch AdamW in the model "
                         "dtype, no DeepSpeed: a DeepSpeed bf16 run adds 12 B per trainable parameter)")
        return lines
    if r.name == "cache_speed":
        f = rows[-1]
        lines = [f"batch {f.get('batch')}, {f.get('device')} {f.get('dtype')}, grad checkpointing "
                 f"{_f(f.get('grad_checkpointing'))}; `{r.command}`", "",
                 "| task | level | step s | samples/s | speed-up | FLOP prediction |", "|---|---|---|---|---|---|"]
        for task, e in f.get("tasks", {}).items():
            for lvl in ("none", "latents", "prefix"):
                lines.append(f"| {task} | {lvl} | {_f(e['step_s'].get(lvl), '{:.4g}')} | "
                             f"{_f(e['samples_per_s'].get(lvl), '{:.4g}')} | {_f(e['measured_speedup'].get(lvl))}x | "
                             f"{_f(e['predicted_speedup'].get(lvl))}x |")
        return lines
    if r.name in ("nccl_2gpu", "train_1gpu"):
        f = rows[-1]
        lines = [f"world size {f.get('world_size')} over {f.get('backend')}: {f.get('steps')} steps, final loss "
                 f"{_f(f.get('final_loss'))} (finite: {_f(f.get('loss_finite'))}), {_f(f.get('samples_per_s'))} "
                 f"samples/s, step {_f(f.get('step_time_s'))} s, MFU {_pct(f.get('mfu'))}, peak reserved "
                 f"{_f(f.get('peak_reserved_gb'))} GB, {f.get('wall_s')} s wall", "", f"`{f.get('command')}`"]
        if f.get("run_summary"):
            from unilip_ds.tracking import summary_lines
            lines += ["", *[f"    {x}" for x in summary_lines(f["run_summary"])]]
        return lines
    return ["```", *[json.dumps(f) for f in rows], "```"]


def markdown(report: Dict[str, Any]) -> str:
    s = report
    lines = [f"# GPU check: unilip_ds", "",
             f"- started {s['started']} on {s['host']}, {s['device']}, flavor {s['flavor']}; driver: `{s['command']}`",
             f"- total {s['total_s']:.0f} s of the {s['total_budget_s']:.0f} s budget "
             f"({'finished' if s['finished'] else 'in progress or interrupted'})"]
    if s.get("flash_install"):
        fi = s["flash_install"]
        lines.append(f"- flash-attn install: `{fi.get('command')}` -> {fi.get('status')}")
        if fi.get("log_tail"):
            lines += ["", "```", fi["log_tail"], "```"]
    lines += ["", "| # | step | status | seconds (budget) | command |", "|---|---|---|---|---|"]
    for i, r in enumerate(s["steps"], 1):
        status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
        lines.append(f"| {i} | {r['name']} | {status} | {r['seconds']:.1f} ({r['budget_s']:.0f}) | `{r['command']}` |")
    for r in s["steps"]:
        res = Result(**r)
        tables = figure_tables(res)
        if tables or res.stderr_tail:
            lines += ["", f"## {res.name}", "", res.what, ""]
            lines += tables
            if res.stderr_tail:
                lines += ["", f"{res.status}: last lines of stderr (logs/{res.name}.err):", "", "```",
                          res.stderr_tail, "```"]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: Dict[str, Any]) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check_out", help="report folder (gpu_check.json, gpu_check.md, logs/)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit (no CUDA needed)")
    ap.add_argument("--only", default="", help="comma-separated step names (env always runs first)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--flavor", default="", help="1b (default on cuda) or tiny (default on cpu)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="every budget x this (slow machines)")
    ap.add_argument("--flash-install-command", default="", help="(gpu_check.sh) the install command it ran")
    ap.add_argument("--flash-install-status", default="", help="(gpu_check.sh) its outcome")
    ap.add_argument("--flash-install-log", default="", help="(gpu_check.sh) its log")
    args = ap.parse_args(argv)
    flavor = args.flavor or ("tiny" if args.device == "cpu" else "1b")
    python = sys.executable
    steps = plan(args.device, flavor, args.out)
    names = [s.name for s in steps]
    only = [x for x in args.only.split(",") if x]
    unknown = [x for x in only if x not in names]
    if unknown:
        print(f"error: unknown step {', '.join(unknown)} (steps: {', '.join(names)})", file=sys.stderr)
        return 2
    if only:
        steps = [s for s in steps if s.name == "env" or s.name in only]
    if args.dry_run:
        print_plan(steps, python, args.budget_scale, args.device, flavor)
        return 0

    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = child_env(args.device)
    t_start = time.time()
    deadline = t_start + TOTAL_BUDGET_S * args.budget_scale
    report: Dict[str, Any] = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname(),
        "device": args.device, "flavor": flavor,
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/gpu_check.py",
                                                      *(argv if argv is not None else sys.argv[1:])]),
        "total_budget_s": TOTAL_BUDGET_S * args.budget_scale, "total_s": 0.0, "finished": False, "steps": []}
    if args.flash_install_command or args.flash_install_status:
        report["flash_install"] = {"command": args.flash_install_command, "status": args.flash_install_status,
                                   "log_tail": tail(Path(args.flash_install_log), 8) if args.flash_install_log else ""}
    env_info: Dict[str, Any] = {}
    for step in steps:
        left = deadline - time.time()
        budget = step.budget_s * args.budget_scale
        why = skip_reason(step, env_info, args.device)
        if not why and left < 5:
            why = f"out of the total budget ({TOTAL_BUDGET_S * args.budget_scale:.0f} s)"
        if why:
            res = Result(step.name, display(step.argv, python), budget, "skipped", reason=why, what=step.what)
        else:
            if step.name != "env":  # env first decides whether there is anything to run here
                print(f"[gpu_check] {step.name} (budget {min(budget, left):.0f} s) ...", flush=True)
            res = run_step(step, python, min(budget, left), logs, env)
        if step.name == "env":
            env_info = res.figures[0] if res.figures else {}
            if not env_info:
                last = res.stderr_tail.splitlines()[-1:] or [res.reason]
                print(f"error: the env step failed ({res.status}: {last[0]}); see {logs / 'env.err'}", file=sys.stderr)
                return 2
            if args.device == "cuda" and not env_info.get("cuda_available"):
                print(f"error: no CUDA device here (torch {env_info.get('torch', '?')}, "
                      f"cuda available {env_info.get('cuda_available', '?')}); gpu_check needs a GPU "
                      "(--dry-run lists the plan; --device cpu runs it small on CPU)", file=sys.stderr)
                return 2
        line = f"[gpu_check] {step.name}: {res.status}" + (f" ({res.reason})" if res.reason else "") + \
            f", {res.seconds:.1f} s, {len(res.figures)} figure line(s)"
        print(line, flush=True)
        report["steps"].append(asdict(res))
        report["total_s"] = round(time.time() - t_start, 1)
        write_report(out, report)
    report["finished"] = True
    write_report(out, report)
    bad = [r["name"] for r in report["steps"] if r["status"] in ("fail", "timeout")]
    print(f"[gpu_check] done in {report['total_s']:.0f} s: {out / 'gpu_check.md'}, {out / 'gpu_check.json'}"
          + (f"; failed: {', '.join(bad)}" if bad else ""), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
