"""Watching a run: the console line (step N/max, elapsed, ETA, eval metrics), TensorBoard
event files, the recon grids written at each evaluation (one per eval source, with per-source
metrics), the demo echoing its progress, and `python -m unilip_ds.plot` on metrics.jsonl."""

import importlib.util
import json
import re

from PIL import Image

from tests.launch_util import REPO, check, run, tiny_recon_args


def test_console_tensorboard_grids_and_plots(sample_shards, tmp_path, capsys):
    out = tmp_path / "run"
    urls = sample_shards.urls
    sources = (f"data.eval.sources=[{{name: train_view, urls: [{urls[0]}]}}, "
               f"{{name: heldout, urls: [{urls[-1]}]}}]")
    proc = check(run("launch/train.py", tiny_recon_args(out, urls[0].rsplit("/", 1)[0], steps=4, extra=[
        sources, "train.eval_every=2", "train.eval_batches=4", "tensorboard.enabled=true",
        "wandb.mode=disabled"])))
    lines = proc.stdout.splitlines()
    # training lines: progress, then the loss terms
    assert any(re.search(r"\] step 2/4 \d+m\d\ds ETA \d+m\d\ds loss/", x) for x in lines), proc.stdout
    assert any(re.search(r"\] step 4/4 \d+m\d\ds loss/", x) for x in lines)
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
    last_eval = [r for r in records if "eval/psnr" in r][-1]
    # eval_batches (4 of 2 images) spans both sources: a shard of 6, then the next source
    assert last_eval["eval/train_view/images"] == 6 and last_eval["eval/heldout/images"] == 2

    # the recon grid at each evaluation (train.sample_every follows train.eval_every in the
    # presets): originals over reconstructions, one grid per eval source
    for step in (2, 4):
        for source in ("train_view", "heldout"):
            grid = Image.open(out / "samples" / f"step{step:07d}_recon_{source}.png")
            assert grid.size == (2 * 224, 2 * 224)
            top, bottom = grid.crop((0, 0, 448, 224)), grid.crop((0, 224, 448, 448))
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
    assert "samples/recon_heldout" in acc.Tags()["images"]

    # plots from metrics.jsonl
    from unilip_ds.plot import main
    capsys.readouterr()
    assert main(["--run", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    names = sorted(p.rsplit("/", 1)[1] for p in printed)
    assert names == sorted(f"{n}.png" for n in ("losses", "lr", "grad_norm", "throughput", "data", "eval",
                                                   "overview"))
    for p in printed:
        im = Image.open(p)
        assert im.format == "PNG" and im.size[0] > 300
    assert main(["--run", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no metrics file")
