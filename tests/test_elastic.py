"""Elastic resume: a run saved on N ranks continues on M ranks (other data.num_workers too).

The stream part in process (every sample of the epochs in flight exactly once, through
two changes of layout); the whole run through launch/train.py: 2 ranks to step k, then
on 1 rank (2 workers, ZeRO-3) and on 3 ranks (ZeRO-2), keys of the epoch and the loss."""

from __future__ import annotations

from collections import Counter
from typing import Dict, List, Tuple

import pytest

from tests.test_data_stream import all_keys, make_data_cfg, write_shards
from unilip_ds.data.config import SourceConfig
from unilip_ds.data.elastic import redistribute
from unilip_ds.data.skips import SkipStats
from unilip_ds.data.stream import SourceStream


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
