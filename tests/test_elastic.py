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


def _readers(states: List[dict], src, urls, cfg, n: int) -> List[SourceStream]:
    out = []
    for g in range(n):
        s = SourceStream(0, src, urls, cfg, 0, g, n, SkipStats())
        s.load_state_dict(states[g]["sources"][src.name])
        out.append(s)
    return out


def _consume(readers: List[SourceStream], counts: List[int], seen: Counter) -> List[dict]:
    """Each reader emits counts[g] samples (its generator restarts from its state, as in a
    resumed process); returns the readers' states in MixtureStream's layout."""
    states = []
    for g, (r, c) in enumerate(zip(readers, counts)):
        gen = r.samples()
        for _ in range(c):
            sample = next(gen)
            seen[(r.cursor[0], sample["__key__"])] += 1
        states.append({"sources": {r.name: r.state_dict()}, "batch_no": 0, "layout": [g, len(readers), 0, 1],
                       "stats": SkipStats().state_dict()})
    return states


def _new_states(states, src, urls, cfg, n_new) -> List[dict]:
    return [redistribute(states, [src], [urls], cfg, 0, rank, n_new, 0)[0] for rank in range(n_new)]


@pytest.mark.parametrize("chain", [(4, 3, 1), (4, 1, 6)])
def test_stream_remainder_is_every_sample_once(tmp_path, chain):
    """8 shards x 6 samples, blocks of 7 (partial blocks, blocks across shards and epochs),
    readers far apart (one already in epoch 1); the layout changes twice."""
    urls = write_shards(tmp_path, "a", 8, 6)
    src, cfg = SourceConfig(name="a", urls=urls), make_data_cfg()
    cfg.shuffle_buffer = 7
    keys = all_keys(urls)
    seen: Counter = Counter()
    n0, n1, n2 = chain
    fresh = [{"sources": {"a": SourceStream(0, src, urls, cfg, 0, g, n0, SkipStats()).state_dict()}}
             for g in range(n0)]
    states = _consume(_readers(fresh, src, urls, cfg, n0), [3, 10, 17, 14][:n0], seen)
    states = _consume(_readers(_new_states(states, src, urls, cfg, n1), src, urls, cfg, n1),
                      [5 + 4 * g for g in range(n1)], seen)
    last = _readers(_new_states(states, src, urls, cfg, n2), src, urls, cfg, n2)
    hi = max(max(s.plan) for s in last)
    assert hi >= 1  # the epochs in flight included epoch 1
    _consume(last, [48 * (hi + 2) // n2 + 24] * n2, seen)  # every reader past epoch hi + 1
    for epoch in range(hi + 2):  # the planned epochs and the first one of the new split
        got = Counter({k: c for (e, k), c in seen.items() if e == epoch})
        assert got == Counter(keys), f"epoch {epoch}: {got - Counter(keys)} twice, " \
                                     f"{Counter(keys) - got} missing"
