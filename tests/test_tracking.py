"""Watching a run: the console line (step N/max, elapsed, ETA, eval metrics), TensorBoard
event files, the recon grids written at each evaluation (one per eval source, with per-source
metrics), the demo echoing its progress, `python -m unilip_ds.plot` on metrics.jsonl, and the
hardware use (FLOPs per sample counted at start, MFU / tokens/s / memory per logged step, the
run summary at exit; train.peak_tflops given, as CPU needs)."""

import importlib.util
import json
import re

import pytest

from PIL import Image

from tests.launch_util import REPO, check, run, tiny_recon_args


def test_console_tensorboard_grids_and_plots(sample_shards, tmp_path, capsys):
    out = tmp_path / "run"
    urls = sample_shards.urls
    sources = (f"data.eval.sources=[{{name: train_view, urls: [{urls[0]}]}}, "
               f"{{name: heldout, urls: [{urls[-1]}]}}]")
    proc = check(run("launch/train.py", tiny_recon_args(out, urls[0].rsplit("/", 1)[0], steps=4, extra=[
        sources, "train.eval_every=2", "train.eval_batches=4", "tensorboard.enabled=true",
        "wandb.mode=disabled", "train.peak_tflops=0.5"])))
    lines = proc.stdout.splitlines()
    # training lines: progress, then the loss terms
    assert any(re.search(r"\] step 2/4 \d+m\d\ds ETA \d+m\d\ds loss/", x) for x in lines), proc.stdout
    assert any(re.search(r"\] step 4/4 \d+m\d\ds loss/", x) for x in lines)
    # hardware use: FLOPs counted once at start, then MFU / tokens/s / memory per logged step
    assert sum("FLOPs per sample, recon: " in x for x in lines) == 1, proc.stdout
    assert any("MFU against 0.5 TFLOPS per device (train.peak_tflops)" in x for x in lines)
    steps = [x for x in lines if re.search(r"\] step \d/4 ", x)]
    assert len(steps) == 4 and all(re.search(r" samples_per_s=\S+ tokens_per_s=\S+ mfu=\S+ .*"
                                             r"mem/peak_rss_gb=\S+", x) for x in steps), steps
    # evaluation lines: the same progress and every eval metric, per source too
    evals = [x for x in lines if "] eval step" in x]
    assert [re.search(r"eval step (\d+)/4", x).group(1) for x in evals] == ["0", "2", "4"], evals
    assert all("eval/psnr=" in x and "eval/train_view/psnr=" in x and "eval/heldout/ssim=" in x
               for x in evals)

    # the demo echoes these lines as its progress (launch/demo.py parses them)
    spec = importlib.util.spec_from_file_location("demo", REPO / "launch" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    capsys.readouterr()
    shown: set = set()
    for x in lines:
        demo.progress(x, "recon_stage1", shown)
    echoed = capsys.readouterr().out.splitlines()
    assert re.match(r"  recon_stage1 eval at step 0/4 eval/psnr=\S+ eval/train_view/psnr=\S+ "
                    r"eval/heldout/psnr=\S+$", echoed[0]), echoed
    assert any(re.match(r"  recon_stage1 step 2/4 loss/total=\S+ +ETA \d+m\d\ds$", e) for e in echoed), echoed

    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss/total" in r]
    assert len(train) + 3 == len(records)  # one record per logged step and evaluation, nothing else
    summary = [json.loads(x) for x in (out / "run_summary.jsonl").read_text().splitlines()]
    assert len(summary) == 1 and summary[0]["step"] == 4
    s = summary[0]
    gflops = s["gflops_per_sample"]["recon"]
    assert gflops > 0.5 and s["peak_tflops"] == 0.5
    for r in train:  # MFU = samples/s x FLOPs per sample / (devices x peak); 16 x 16 patches
        assert r["mfu"] == pytest.approx(r["samples_per_s"] * gflops * 1e9 / 1e12 / 0.5, rel=1e-6)
        assert r["tflops_per_device"] == pytest.approx(r["mfu"] * 0.5)
        assert r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * 256, rel=1e-6)
        assert 0.05 < r["mem/peak_rss_gb"] < 64 and 0.05 < r["mem/rss_gb"] <= r["mem/peak_rss_gb"] + 1e-9
    # the run summary: 4 steps, evaluations at 0 / 2 / 4 (+ their grids), checkpoints at 2 / 4
    assert s["steps"] == 4 and s["checkpoints"] == 2
    assert s["eval_s"] > 0 and s["sample_s"] > 0 and s["checkpoint_s"] > 0 and 0 <= s["data_wait_frac"] < 1
    assert s["wall_s"] >= s["train_s"] + s["eval_s"] + s["sample_s"] + s["checkpoint_s"]
    assert s["samples_per_s"] == pytest.approx(4 * 2 / s["train_s"])
    assert min(r["mfu"] for r in train) <= s["mfu"] <= max(r["mfu"] for r in train)
    assert any(re.search(r"run summary: 4 steps in \d+m\d\ds wall \(training", x) for x in lines)
    assert any(re.search(r"run summary: \S+ samples/s, \S+ tokens/s, MFU \S+%, data wait \S+% of step "
                         r"time, 2 checkpoint\(s\) written, peak memory \S+ GB", x) for x in lines)
    last_eval = [r for r in records if "eval/psnr" in r][-1]
    # eval_batches (4 of 2 images) spans both sources: a shard of 6, then the next source
    assert last_eval["eval/train_view/images"] == 6 and last_eval["eval/heldout/images"] == 2

    # the recon grid at each evaluation (train.sample_every follows train.eval_every in the
    # presets): originals over reconstructions, one grid per eval source
    for step in (2, 4):
        for source in ("train_view", "heldout"):
            grid = Image.open(out / "samples" / f"step{step:07d}_recon_{source}.png")
            from unilip_ds.inference.sampling import LABEL_H  # a label band above each row
            assert grid.size == (2 * 224, 2 * (LABEL_H + 224))
            top = grid.crop((0, LABEL_H, 448, LABEL_H + 224))
            bottom = grid.crop((0, 2 * LABEL_H + 224, 448, 2 * (LABEL_H + 224)))
            assert top.tobytes() != bottom.tobytes()

    # TensorBoard: the same scalars and the grids
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    total = [e.value for e in acc.Scalars("loss/total")]
    assert [e.step for e in acc.Scalars("loss/total")] == [1, 2, 3, 4]
    assert total == [r["loss/total"] for r in records if "loss/total" in r]
    assert [e.step for e in acc.Scalars("eval/heldout/psnr")] == [0, 2, 4]
    assert [e.value for e in acc.Scalars("mfu")] == pytest.approx([r["mfu"] for r in train])
    assert [e.value for e in acc.Scalars("summary/steps")] == [4]
    assert "samples/recon_heldout" in acc.Tags()["images"]

    # plots from metrics.jsonl
    from unilip_ds.plot import main
    capsys.readouterr()
    assert main(["--run", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    names = sorted(p.rsplit("/", 1)[1] for p in printed)
    assert names == sorted([f"{n}.png" for n in ("losses", "lr", "grad_norm", "throughput", "hardware",
                                                    "memory", "data", "eval", "overview")] + ["summary.txt"])
    text = (out / "plots" / "summary.txt").read_text()
    assert text.startswith("session 1 (ended at step 4):\n  run summary: 4 steps in ")
    # eval.png plots the metrics, not the image counts (eval/images, eval/<source>/images)
    from unilip_ds.plot import GROUPS
    assert not any(GROUPS["eval"](k) for k in last_eval if k.endswith("/images"))
    assert GROUPS["eval"]("eval/heldout/psnr") and GROUPS["eval"]("eval/psnr")
    for p in (p for p in printed if p.endswith(".png")):
        im = Image.open(p)
        assert im.format == "PNG" and im.size[0] > 300
    assert main(["--run", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no metrics file")


def test_peak_tflops_table_override_and_cpu(monkeypatch):
    import torch

    from unilip_ds.tracking import peak_tflops
    cuda = torch.device("cuda", 0)
    for name, precision, peak in (("NVIDIA H200", "bf16", 989.0), ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
                                  ("NVIDIA H100 PCIe", "bf16", 756.0), ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
                                  ("NVIDIA A100-SXM4-80GB", "fp32", 156.0)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d, name=name: name)
        assert peak_tflops(cuda, precision) == (peak, f"{name}, dense {'bf16' if precision == 'bf16' else 'tf32'}")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d: "Some Future GPU")
    value, why = peak_tflops(cuda, "bf16")
    assert value is None and "train.peak_tflops" in why
    assert peak_tflops(cuda, "bf16", 500.0) == (500.0, "train.peak_tflops")
    assert peak_tflops(torch.device("cpu"), "fp32")[0] is None  # CPU: only when given
    assert peak_tflops(torch.device("cpu"), "fp32", 0.5) == (0.5, "train.peak_tflops")
