"""Training from caches of frozen outputs (tiny flavor, fp32, CPU): the real stream attaches
each sample's record; with it the loss and the trainable gradients equal the live ones (T2I
and edit, CFG-null rows and padding included); damaged records fall back to live, counted;
a cache built for other settings is refused; a 2-process ZeRO-3 run on caches matches the live
run step by step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.launch_util import check, run


@pytest.fixture(scope="module")
def caches(gen_assets, sample_shards, sample_edit_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    out = {}
    for task, shards in (("t2i", sample_shards), ("edit", sample_edit_shards)):
        out[task] = root / task
        check(run("data_prep/cache_features.py", [
            "--config", "gen_stage2", "--task", task, "--src", shards.dir, "--dst", str(out[task]),
            "--what", "prefix", "--dtype", "fp32", "--batch-size", "3", "--no-progress", *gen_assets.overrides()]))
    return out


def _sources(sample_shards, sample_edit_shards, caches, cached=True):
    c = {t: f", cache: {caches[t]}" if cached else "" for t in caches}
    return ("data.train.sources=[{name: t2i, task: t2i, weight: 0.5, urls: [%s]%s}, "
            "{name: edit, task: edit, weight: 0.5, urls: [%s]%s}]"
            % (sample_shards.dir, c["t2i"], sample_edit_shards.dir, c["edit"]))


def _batches(cfg, n):
    from unilip_ds.data import build_train_loader
    from unilip_ds.trainer import to_device
    it = iter(build_train_loader(cfg, 0, 1))
    return [to_device(next(it), torch.device("cpu")) for _ in range(n)]


def test_cached_loss_and_gradients_equal_the_live_ones(build_gen, sample_shards, sample_edit_shards, caches):
    task, model = build_gen(extra=[_sources(sample_shards, sample_edit_shards, caches), "gen.cfg_dropout=0.5",
                                   "train.micro_batch_size=4", "data.num_workers=0"])
    model.train()
    task.after_load({"model": model})  # the caches fit these weights
    seen = set()
    for batch in _batches(task.cfg, 6):
        assert len(batch["__cache__"]) == 4 and all(r is not None for r in batch["__cache__"])
        results = []
        for cached in (False, True):
            b = dict(batch) if cached else {k: v for k, v in batch.items() if k != "__cache__"}
            torch.manual_seed(7)  # the same CFG-null rows, sigmas and noise
            model.zero_grad(set_to_none=True)
            loss, logs = task.loss("model", b, 0, {"model": model})
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None}, logs))
        (live, g_live, _), (hit, g_hit, logs) = results
        assert logs["data/cached_prefix"] == 1
        torch.testing.assert_close(hit, live, atol=1e-5, rtol=1e-5)
        assert g_hit.keys() == g_live.keys() and g_hit
        for n in g_live:
            torch.testing.assert_close(g_hit[n], g_live[n], atol=1e-5, rtol=1e-4)
        seen.add((batch["__task__"], bool(0 < logs["data/cfg_null_frac"] < 1)))
    assert {t for t, _ in seen} == {"t2i", "edit"} and any(mixed for _, mixed in seen)


def test_damaged_records_fall_back_to_live_and_are_counted(build_gen, sample_shards, caches, tmp_path):
    import shutil
    damaged = tmp_path / "t2i"
    shutil.copytree(caches["t2i"], damaged)
    first = sorted(p for p in damaged.glob("*.tar"))[0]
    index = json.loads(Path(str(first) + ".index.json").read_text())
    blob = bytearray(first.read_bytes())
    for start, length, _ in list(index.values())[:2]:
        blob[start + length // 2] ^= 0xFF  # flip one byte inside two records
    first.write_bytes(bytes(blob))
    (damaged / (sorted(damaged.glob("*.tar"))[1].name + ".index.json")).unlink()  # a shard without index
    task, model = build_gen(extra=[f"data.train.urls=[{sample_shards.dir}]", "data.train.task=t2i",
                                   f"data.train.cache={damaged}", "train.micro_batch_size=4",
                                   "data.num_workers=0", "data.shuffle_buffer=1"])
    from unilip_ds.data import SkipTracker
    tracker = SkipTracker(1.0)
    batches = _batches(task.cfg, 15)  # every sample once (no shuffle block across epochs)
    for b in batches:
        tracker.update(b)
        torch.manual_seed(0)
        loss, logs = task.loss("model", b, 0, {"model": model})
        assert torch.isfinite(loss)
        if any(r is None for r in b["__cache__"]):
            assert logs["data/cached_latents"] == 0  # the batch was computed live
    totals = tracker.totals()
    assert totals["data/cache_miss/corrupt"] == 2
    assert totals["data/cache_miss/missing_shard"] == 6  # the shard's samples


def test_a_cache_for_other_settings_is_refused(build_gen, sample_shards, caches):
    from unilip_ds.config import ConfigError
    task, model = build_gen(extra=[f"data.train.urls=[{sample_shards.dir}]", "data.train.task=t2i",
                                   f"data.train.cache={caches['t2i']}", "data.resolution=196"])
    with pytest.raises(ConfigError, match=r"data.train.cache.*other settings: differs: .*resolution"):
        task.after_load({"model": model})
    task, model = build_gen(extra=[f"data.train.urls=[{sample_shards.dir}]", "data.train.task=t2i",
                                   f"data.train.cache={caches['edit']}"])
    with pytest.raises(ConfigError, match="task edit, the source is t2i"):
        task.after_load({"model": model})


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_runs_on_caches_match_the_live_run_also_across_a_resume(gen_assets, sample_shards, sample_edit_shards,
                                                                caches, tmp_path, zero):
    """2 processes: the cached run (under ZeRO-3 stopped after 2 steps and resumed) sees the
    same samples as the live run and its losses equal them step by step (float tolerance)."""
    from tests.test_gen_stages import _metrics

    def train(out, cached, *extra):
        return check(run("launch/train.py", [
            "--config", "gen_stage2", "--ds_config", f"ds_configs/{zero}.json", f"run.output_dir={out}",
            "data.num_workers=1", "data.shuffle_buffer=8", "train.max_steps=4", "train.micro_batch_size=2",
            "train.log_every=1", "optim.warmup_steps=2", "wandb.mode=offline", "train.precision=fp32",
            "data.log_keys=true", "run.seed=3", *gen_assets.overrides(),
            _sources(sample_shards, sample_edit_shards, caches, cached), *extra], nproc=2, launcher="torchrun"))

    live, hit = tmp_path / "live", tmp_path / "cached"
    train(live, False)
    if zero == "zero3":
        train(hit, True, "train.stop_after=2")
        assert "resumed from" in train(hit, True).stdout
    else:
        train(hit, True)
    a, b = _metrics(live), _metrics(hit)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert rb["data/cached_prefix"] == 1 and ra["data/cached_latents"] == 0
        assert rb["loss/flow"] == pytest.approx(ra["loss/flow"], rel=1e-4, abs=1e-6)
        assert rb["data/cfg_null_frac"] == ra["data/cfg_null_frac"]
    assert {t for r in b for t in ("t2i", "edit") if f"loss/flow_{t}" in r} == {"t2i", "edit"}  # (seed 3)
    for r in (0, 1):
        assert (live / "keys" / f"rank{r}.jsonl").read_text() == (hit / "keys" / f"rank{r}.jsonl").read_text()
