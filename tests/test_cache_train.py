"""Training from caches of frozen outputs (tiny flavor, fp32, CPU): the real stream attaches
each sample's record; with it the loss and the trainable gradients equal the live ones (T2I
and edit, CFG-null rows and padding included; bf16 records: within bf16 rounding); damaged
records fall back to live per sample, counted;
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


def _damage(src: Path, dst: Path) -> Path:
    """A copy of a cache with the index of its second shard removed and, in every other
    shard, one byte flipped inside the second record."""
    import shutil
    shutil.copytree(src, dst)
    shards = sorted(dst.glob("*.tar"))
    Path(str(shards[1]) + ".index.json").unlink()
    for shard in shards[:1] + shards[2:]:
        start, length, _ = list(json.loads(Path(str(shard) + ".index.json").read_text()).values())[1]
        blob = bytearray(shard.read_bytes())
        blob[start + length // 2] ^= 0xFF
        shard.write_bytes(bytes(blob))
    return dst


def _loss_and_grads(task, model, batch):
    torch.manual_seed(7)  # the same CFG-null rows, sigmas and noise
    model.zero_grad(set_to_none=True)
    loss, logs = task.loss("model", batch, 0, {"model": model})
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, logs


def _assert_same_step(live, hit):
    (loss, grads, _), (loss_c, grads_c, _) = live, hit
    torch.testing.assert_close(loss_c, loss, atol=1e-5, rtol=1e-5)
    assert grads_c.keys() == grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], atol=1e-5, rtol=1e-4)


def _with(cfg, override: str):
    """`cfg` with one dotted override applied (a data-only config for a second loader)."""
    from omegaconf import OmegaConf

    from unilip_ds.config import from_dict, to_dict
    return from_dict(OmegaConf.to_container(OmegaConf.merge(to_dict(cfg), OmegaConf.from_dotlist([override]))))


def _paired(build_gen, sources, n, extra=()):
    """(task, model, [(live batch, cached batch)]): the same samples read without and with
    the caches (a cached sample's images are not decoded, so the live side reads its own)."""
    common = ["gen.cfg_dropout=0.5", "train.micro_batch_size=4", "data.num_workers=0", *extra]
    task, model = build_gen(extra=[sources(True), *common])
    live = _batches(_with(task.cfg, sources(False)), n)
    hit = _batches(task.cfg, n)
    assert [b["__key__"] for b in live] == [b["__key__"] for b in hit]
    return task, model, list(zip(live, hit))


def test_cached_loss_and_gradients_equal_the_live_ones(build_gen, sample_shards, sample_edit_shards, caches):
    task, model, pairs = _paired(build_gen, lambda c: _sources(sample_shards, sample_edit_shards, caches, c), 6)
    model.train()
    task.after_load({"model": model})  # the caches fit these weights
    seen = set()
    for live, hit in pairs:
        assert len(hit["__cache__"]) == 4 and all(r is not None for r in hit["__cache__"])
        a, b = _loss_and_grads(task, model, live), _loss_and_grads(task, model, hit)
        assert b[2]["data/cached_prefix"] == 1 and a[2]["data/cached_latents"] == 0
        _assert_same_step(a, b)
        # a bf16 cache (the default --dtype) holds these values rounded to bf16: the step
        # moves by about that rounding (2^-8 relative), no more
        bf16 = [{k: v.to(torch.bfloat16) for k, v in r.items()} for r in hit["__cache__"]]
        c = _loss_and_grads(task, model, {**hit, "__cache__": bf16})
        torch.testing.assert_close(c[0], a[0], atol=0, rtol=2 ** -6)
        norm = lambda g: torch.linalg.vector_norm(torch.stack([x.norm() for x in g.values()]))  # noqa: E731
        torch.testing.assert_close(norm(c[1]), norm(a[1]), atol=0, rtol=2 ** -5)
        seen.add((hit["__task__"], bool(0 < b[2]["data/cfg_null_frac"] < 1)))
    assert {t for t, _ in seen} == {"t2i", "edit"} and any(mixed for _, mixed in seen)


def test_damaged_records_are_computed_live_per_sample_counted_and_exact(build_gen, sample_shards,
                                                                       sample_edit_shards, caches, tmp_path):
    """Misses fall back per sample: the batch's other rows keep their records, and the mixed
    batch's loss and gradients equal the live ones (T2I and edit)."""
    damaged = {t: _damage(caches[t], tmp_path / t) for t in caches}
    task, model, pairs = _paired(build_gen, lambda c: _sources(sample_shards, sample_edit_shards, damaged, c),
                                 14, ["data.shuffle_buffer=1"])
    model.train()
    from unilip_ds.data import SkipTracker
    tracker = SkipTracker(1.0, cached=True)
    mixed = set()
    for live, hit in pairs:
        tracker.update(hit)
        a, b = _loss_and_grads(task, model, live), _loss_and_grads(task, model, hit)
        _assert_same_step(a, b)
        share = sum(r is not None for r in hit["__cache__"]) / 4
        assert float(b[2]["data/cached_latents"]) == pytest.approx(share)
        if 0 < share < 1:
            mixed.add(hit["__task__"])
    assert mixed == {"t2i", "edit"}
    totals = tracker.totals()
    assert totals["data/cache_miss/corrupt"] >= 2 and totals["data/cache_miss/missing_shard"] >= 2


def test_a_cached_sample_is_not_image_decoded(build_gen, sample_shards, caches, tmp_path):
    """The stream decodes only the text of a sample whose record it has: a source image
    broken after the cache was built is skipped without the cache and trained on with it."""
    import io
    import shutil
    import tarfile
    src = tmp_path / "src"
    shutil.copytree(sample_shards.dir, src)
    shard = sorted(src.glob("*.tar"))[0]
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    broken = members[0][0].name.split(".")[0]
    with tarfile.open(shard, "w") as tf:
        for m, data in members:
            if m.name.startswith(broken + ".") and not m.name.endswith(".txt"):
                data = b"not an image"
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    cfg = build_gen(extra=[f"data.train.urls=[{shard}]", "data.train.task=t2i", "data.num_workers=0",
                           "train.micro_batch_size=2", "data.shuffle_buffer=1"])[0].cfg
    keys = {cached: {k for b in _batches(_with(cfg, f"data.train.cache={caches['t2i'] if cached else ''}"), 4)
                     for k in b["__key__"]} for cached in (False, True)}
    assert broken in keys[True] and broken not in keys[False]


def test_records_are_read_ahead_in_few_requests(caches):
    """Records fetched in a shuffled order come from a few read-ahead requests per shard,
    identical to one request per record."""
    import random

    from unilip_ds.config import DataConfig
    from unilip_ds.data.cache import SourceCache
    shard = sorted(caches["edit"].glob("*.tar"))[0]
    keys = list(json.loads(Path(str(shard) + ".index.json").read_text()))
    random.Random(0).shuffle(keys)
    got = {}
    for kib in (0, 4096):
        cache = SourceCache(str(caches["edit"]), "edit", DataConfig(cache_read_ahead_kib=kib))
        records = [cache.get(str(shard), k) for k in keys]
        assert all(why is None for _, why in records)
        got[kib] = (cache.requests, [r for r, _ in records])
    assert got[0][0] == len(keys) > 1 and got[4096][0] == 1
    for a, b in zip(got[0][1], got[4096][1]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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


def test_runs_on_caches_match_the_live_run_also_across_a_resume(gen_assets, sample_shards, sample_edit_shards,
                                                                caches, tmp_path):
    """2 processes under ZeRO-3: the cached run (stopped after 2 steps and resumed, and with
    a damaged T2I cache: ranks then differ in which rows run live) sees the same samples as
    the live run and its losses equal them step by step (float tolerance). (The caches act
    on the model's inputs, before any ZeRO partitioning; ZeRO-2 gen training: test_gen_stages.)"""
    from tests.test_gen_stages import _metrics
    caches = {**caches, "t2i": _damage(caches["t2i"], tmp_path / "damaged")}

    def train(out, cached, *extra):
        return check(run("launch/train.py", [
            "--config", "gen_stage2", "--ds_config", "ds_configs/zero3.json", f"run.output_dir={out}",
            "data.num_workers=1", "data.shuffle_buffer=8", "train.max_steps=4", "train.micro_batch_size=2",
            "train.log_every=1", "optim.warmup_steps=2", "wandb.mode=disabled", "train.precision=fp32",
            "data.log_keys=true", "run.seed=3", *gen_assets.overrides(),
            _sources(sample_shards, sample_edit_shards, caches, cached), *extra], nproc=2, launcher="torchrun"))

    live, hit = tmp_path / "live", tmp_path / "cached"
    train(live, False)
    train(hit, True, "train.stop_after=2")
    assert "resumed from" in train(hit, True).stdout
    a, b = _metrics(live), _metrics(hit)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert rb["data/cached_prefix"] > 0 and ra["data/cached_latents"] == 0
        assert rb["loss/flow"] == pytest.approx(ra["loss/flow"], rel=1e-4, abs=1e-6)
        assert rb["data/cfg_null_frac"] == ra["data/cfg_null_frac"]
    assert {t for r in b for t in ("t2i", "edit") if f"loss/flow_{t}" in r} == {"t2i", "edit"}  # (seed 3)
    misses = max(r.get("data/cache_miss/corrupt", 0) + r.get("data/cache_miss/missing_shard", 0) for r in b)
    assert misses > 0 and min(r["data/cached_prefix"] for r in b) < 1
    for r in (0, 1):
        assert (live / "keys" / f"rank{r}.jsonl").read_text() == (hit / "keys" / f"rank{r}.jsonl").read_text()
