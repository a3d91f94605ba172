"""Elastic resume: a run saved on N ranks continues on M ranks (other data.num_workers too).

The stream part in process (every sample of the epochs in flight exactly once, through
two changes of layout); the whole run through launch/train.py: 2 ranks to step k, then
on 1 rank (2 workers, ZeRO-3) and on 3 ranks (ZeRO-2), keys of the epoch and the loss."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Dict, List

import pytest

from tests.launch_util import check, run, start_error, tiny_recon_args
from tests.test_data_stream import all_keys, make_data_cfg, write_shards
from unilip_ds.config import from_dict
from unilip_ds.data.config import SourceConfig
from unilip_ds.data.elastic import redistribute
from unilip_ds.data.skips import SkipStats
from unilip_ds.data.stream import SourceStream
from unilip_ds.engine import checkpoint
from unilip_ds.engine.engines import lr_factor


def _readers(states: List[dict], srcs, urls, cfg, n: int) -> List[List[SourceStream]]:
    """[reader][source] streams loaded from MixtureStream-layout states."""
    out = []
    for g in range(n):
        row = []
        for i, (src, u) in enumerate(zip(srcs, urls)):
            s = SourceStream(i, src, u, cfg, 0, g, n, SkipStats())
            s.load_state_dict(states[g]["sources"][src.name])
            row.append(s)
        out.append(row)
    return out


def _consume(readers: List[List[SourceStream]], counts: List[int], seen: Counter) -> List[dict]:
    """Reader g emits counts[g] samples of every source (its generators restart from its
    state, as in a resumed process); returns the readers' states."""
    states = []
    for g, (row, c) in enumerate(zip(readers, counts)):
        for r in row:
            gen = r.samples()
            for _ in range(c + 3 * r.index):  # the sources at other paces
                sample = next(gen)
                seen[(r.name, r.cursor[0], sample["__key__"])] += 1
        states.append({"sources": {r.name: r.state_dict() for r in row}, "batch_no": 0,
                       "layout": [g, len(readers), 0, 1], "stats": SkipStats().state_dict()})
    return states


def _new_states(states, srcs, urls, cfg, n_new) -> List[dict]:
    return [redistribute(states, srcs, urls, cfg, 0, rank, n_new, 0)[0] for rank in range(n_new)]


@pytest.mark.parametrize("chain", [(4, 3, 1), (4, 1, 6)])
def test_stream_remainder_is_every_sample_once(tmp_path, chain):
    """Two sources (8 shards x 6 samples, 6 x 5), blocks of 7 (partial blocks, blocks across
    shards and epochs), readers far apart (some already in epoch 1); the layout changes twice."""
    urls = [write_shards(tmp_path, "a", 8, 6), write_shards(tmp_path, "b", 6, 5, seed=2)]
    srcs = [SourceConfig(name="a", urls=urls[0]), SourceConfig(name="b", urls=urls[1])]
    cfg = make_data_cfg()
    cfg.shuffle_buffer = 7
    seen: Counter = Counter()
    n0, n1, n2 = chain
    fresh = [{"sources": {s.name: {"start": [0, 0, 0], "block_no": 0, "emitted": 0} for s in srcs}}] * n0
    states = _consume(_readers(fresh, srcs, urls, cfg, n0), [3, 10, 17, 14][:n0], seen)
    states = _consume(_readers(_new_states(states, srcs, urls, cfg, n1), srcs, urls, cfg, n1),
                      [5 + 4 * g for g in range(n1)], seen)
    last = _readers(_new_states(states, srcs, urls, cfg, n2), srcs, urls, cfg, n2)
    hi = max(max(s.plan) for row in last for s in row)
    assert hi >= 1  # the epochs in flight included epoch 1
    _consume(last, [48 * (hi + 2) // n2 + 24] * n2, seen)  # every reader past epoch hi + 1
    for src, u in zip(srcs, urls):
        keys = Counter(all_keys(u))
        for epoch in range(hi + 2):  # the planned epochs and the first one of the new split
            got = Counter({k: c for (name, e, k), c in seen.items() if name == src.name and e == epoch})
            assert got == keys, f"{src.name} epoch {epoch}: {got - keys} twice, {keys - got} missing"


# -- the whole run -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def epoch_shards(tmp_path_factory):
    """One epoch = 10 shards x 3 samples = 5 steps of a global batch of 6."""
    from unilip_ds.data.sample_images import write_caption_tars
    d = tmp_path_factory.mktemp("epoch")
    write_caption_tars(d, count=30, per_tar=3, size=256)
    return str(d)


def _args(out: Path, shards: str, ds: str, accum: int, workers: int, extra=(), buffer=6) -> List[str]:
    """Global batch 6 = ranks x 1 x accum; held-out SSIM (EMA weights)."""
    mine = {"train.micro_batch_size": 1, "train.grad_accum": accum, "data.num_workers": workers,
            "data.shuffle_buffer": buffer, "checkpoint.every_steps": 5, "optim.lr": 2e-3,
            "optim.min_lr": 1e-3, "train.precision": "fp32", "data.log_keys": "true",
            "data.eval.urls": f"[{shards}]", "train.eval_batches": 4, "train.sample_every": 0,
            "wandb.mode": "disabled"}
    base = [a for a in tiny_recon_args(out, shards, steps=5, ds=ds)
            if a.split("=", 1)[0] not in mine]
    return base + [f"{k}={v}" for k, v in mine.items()] + list(extra)


def _metrics(out: Path) -> Dict[int, dict]:
    rows: Dict[int, dict] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.setdefault(r["step"], {}).update(r)
    return rows


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("zero,nproc,accum,workers", [("zero3", 1, 6, 2), ("zero2", 3, 2, 1)])
def test_resume_on_another_world_size(epoch_shards, tmp_path, capsys, zero, nproc, accum, workers):
    """2 ranks train step 1 and stop; the run goes on with `nproc` ranks (x `workers`) to the
    end of the epoch: every sample of the epoch exactly once, the held-out SSIM goes on from
    where it was, the EMA and the LR schedule carry over."""
    out, ds = tmp_path / "run", f"ds_configs/{zero}.json"
    # blocks of 6 (two shards): each old reader stops with 3 samples of its block unemitted
    check(run("launch/train.py", _args(out, epoch_shards, ds, 3, 1, ["train.stop_after=1",
                                                                    "train.eval_every=1"]),
              nproc=2, launcher="torchrun"))
    if nproc == 1:  # another global batch is refused, in one line, before anything starts
        assert "global batch of 6 (2 ranks x train.micro_batch_size 1 x train.grad_accum 3), this run " \
               "has 3 (1 ranks x train.micro_batch_size 1 x train.grad_accum 3): keep the global " \
               "batch, e.g. train.grad_accum=6" in start_error(_args(out, epoch_shards, ds, 3, workers), capsys)

    # blocks of 4: each new reader's 8 or 12 samples end with a block (a block across the
    # end of the epoch would mix in the next epoch's samples)
    proc = check(run("launch/train.py", _args(out, epoch_shards, ds, accum, workers, ["train.eval_every=2"],
                                              buffer=4), nproc=nproc, launcher="torchrun"))
    assert "to DeepSpeed's universal format" in proc.stdout and "continue on" in proc.stdout
    keys = Counter()
    for f in (out / "keys").glob("rank*.jsonl"):
        for line in f.read_text().splitlines():
            keys.update(json.loads(line)["keys"])
    assert sum(keys.values()) == 30 and len(keys) == 30, keys.most_common(3)  # each exactly once
    m = _metrics(out)
    assert sorted(m) == list(range(6))
    ssim = {s: m[s]["eval/ssim"] for s in (0, 1, 2)}
    # held-out SSIM (EMA weights) goes on up from where step 1 left it, not back to the start
    assert ssim[2] > ssim[1] > ssim[0] + 0.04, ssim
    # the LR schedule goes on: warmup 2 steps, then cosine to min_lr at step 5
    factor = lr_factor(from_dict(checkpoint.read_meta(out, "step_00000005")["config"]))
    assert [m[s]["lr/model"] for s in range(1, 6)] == pytest.approx([2e-3 * factor(s) for s in range(5)])
    ema = checkpoint.rank_state(out, "step_00000005", 0)["ema"]
    assert ema["updates"] == 5  # carried over (a restarted EMA would count 4)
