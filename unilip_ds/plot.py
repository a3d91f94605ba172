"""PNG plots of a run from its <run>/metrics.jsonl, no W&B needed:

    python -m unilip_ds.plot --run runs/recon_stage1 [--out <dir>]

writes into <run>/plots/ (or --out): losses.png (every loss term), lr.png, grad_norm.png,
throughput.png (samples/s, tokens/s, step time), hardware.png (MFU, achieved TFLOPS per
device), memory.png (peak device memory allocated / reserved, or RSS on CPU), data.png
(data-wait fraction and the data layer's counters), eval.png (every eval metric; not the
image counts eval/images, eval/<source>/images) and
overview.png (the total loss beside the main eval metric: PSNR for recon, the held-out flow
loss for gen). A group with no values in the file is left out. A resumed run's records are
merged by step (the last value wins). The run summaries (<run>/run_summary.jsonl, one per
session of the run, written at its exit) go to summary.txt.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

Series = Dict[str, List[Tuple[int, float]]]

# file name -> which keys go into it
GROUPS = {
    "losses": lambda k: k.startswith("loss/"),
    "lr": lambda k: k.startswith("lr/"),
    "grad_norm": lambda k: k.startswith("grad_norm/"),
    "throughput": lambda k: k in ("samples_per_s", "tokens_per_s", "step_time_s"),
    "hardware": lambda k: k in ("mfu", "tflops_per_device"),
    "memory": lambda k: k.startswith("mem/"),
    "data": lambda k: k == "data_wait_frac" or k.startswith("data/"),
    "eval": lambda k: k.startswith("eval/") and not is_count(k),
}
# eval keys that count what was evaluated (eval/images, eval/<source>/images), not metrics
COUNT_KEYS = ("images",)


def is_count(key: str) -> bool:
    return key.rsplit("/", 1)[-1] in COUNT_KEYS
# overview: the first key present of each list
OVERVIEW = (("loss/total", "loss/flow"), ("eval/psnr", "eval/flow"))


class PlotError(ValueError):
    """Bad command-line input: one line, exit status 2."""


def read_metrics(path: Path) -> Series:
    """metrics.jsonl -> {key: [(step, value)] sorted by step}, numeric values only."""
    if not path.is_file():
        raise PlotError(f"no metrics file {path} (is --run a run.output_dir?)")
    by_key: Dict[str, Dict[int, float]] = defaultdict(dict)
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise PlotError(f"{path}:{n}: not a JSON line") from None
        step = record.get("step")
        for k, v in record.items():
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                by_key[k][step] = float(v)  # a resume may log a step again: the last wins
    if not by_key:
        raise PlotError(f"{path} holds no metrics yet")
    return {k: sorted(v.items()) for k, v in by_key.items()}


def read_summaries(path: Path) -> List[dict]:
    """The run summaries (<run>/run_summary.jsonl: one per session, written at its exit)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "steps" in record:
            out.append(record)
    return out


def _figure(series: Series, keys: List[str], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        steps, values = zip(*series[key])
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if key.startswith(("loss/", "grad_norm/")) and min(values) > 0 and max(values) > 10 * min(values):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_run(run: Path, out: Path = None) -> List[Path]:
    """Writes the PNGs (see the module doc); returns their paths."""
    run = Path(run)
    series = read_metrics(run / "metrics.jsonl")
    out = Path(out) if out else run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, wanted in GROUPS.items():
        keys = sorted(k for k in series if wanted(k))
        if keys:
            paths.append(_figure(series, keys, out / f"{name}.png", f"{run.name}: {name}"))
    overview = [next((k for k in group if k in series), None) for group in OVERVIEW]
    overview = [k for k in overview if k]
    overview += sorted(k for k in series if k.startswith("eval/") and k.endswith("/psnr")
                       and k.count("/") == 2)  # per eval source (e.g. a training-set view)
    if overview:
        paths.append(_figure(series, overview, out / "overview.png", f"{run.name}: overview"))
    summaries = read_summaries(run / "run_summary.jsonl")
    if summaries:
        from unilip_ds.tracking import summary_lines
        text = [f"session {i} (ended at step {s['step']}):\n  " + "\n  ".join(summary_lines(s))
                for i, s in enumerate(summaries, 1)]
        (out / "summary.txt").write_text("\n".join(text) + "\n")
        paths.append(out / "summary.txt")
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run.output_dir (holds metrics.jsonl)")
    ap.add_argument("--out", default=None, help="where the PNGs go (default: <run>/plots)")
    args = ap.parse_args(argv)
    try:
        paths = plot_run(Path(args.run), Path(args.out) if args.out else None)
    except PlotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
