"""Elastic resume of the train stream: the states of all readers of a run on N ranks x W
workers become states for M ranks x W' workers, so that no sample of the epochs in flight is
trained on twice or skipped (the order of the remainder differs).

Per source, every old reader's state says exactly what it consumed: everything before its
block start, plus the emitted part of its current block (the block's samples are the
readable samples of its `spans`; the emitted ones are the first `emitted` of the block's
permutation, stream.SourceStream.samples). The rest of the epochs in flight becomes:
- leftovers: unemitted samples of the blocks, known one by one, dealt out sample by
  sample over the new readers;
- items: shards not started and the tails of started ones, dealt out shard by shard
  (like a normal epoch's split), starting after the reader that took the last leftover.
Each new reader reads its part of those epochs (SourceStream.plan), then continues with
the normal split of the new layout. Worker skip counters are summed into the first reader.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from unilip_ds.data.config import DataConfig, DataError, SourceConfig
from unilip_ds.data.skips import SkipStats
from unilip_ds.data.stream import Item, SourceStream

Leftover = Tuple[int, str, int]  # (entry, url, sample)


def loader_worker_states(loader_state: dict) -> List[Optional[dict]]:
    """The stream states of one rank's workers (StatefulDataLoader's layout), worker order."""
    snap = loader_state.get("_snapshot")
    if snap is None:  # num_workers=0: the stream runs in the main process
        return [loader_state.get("dataset_state")]
    workers = snap["_worker_snapshots"]
    return [(workers.get(f"worker_{w}") or {}).get("dataset_state")
            for w in range(snap["_main_snapshot"]["_num_workers"])]


def _remainder(stream: SourceStream, last_epoch: int) -> Tuple[Dict[int, List[Leftover]],
                                                               Dict[int, List[Item]]]:
    """What one old reader has not trained on, epoch by epoch up to `last_epoch`: the
    unemitted samples of its block, and its items from the sample after the block on."""
    block: List[Tuple[int, int, int]] = []  # cursors of the current block, in read order
    for e, p, a, b in stream.spans if stream.emitted else []:
        _, _, first, skip, only = stream.items(e)[p]
        block += [(e, p, i) for i in range(a, b + 1)
                  if i >= first and i not in skip and (only is None or i in only)]
    order = np.random.default_rng(
        [stream.seed, stream.index, stream.g, stream.block_no]).permutation(len(block))
    leftovers: Dict[int, List[Leftover]] = {}
    for k in order[stream.emitted:]:
        e, p, i = block[k]
        j, url = stream.items(e)[p][:2]
        leftovers.setdefault(e, []).append((j, url, i))
    E, P, O = stream.next if stream.emitted else stream.start
    items: Dict[int, List[Item]] = {}
    for e in range(E, last_epoch + 1):
        for p, (j, url, first, skip, only) in enumerate(stream.items(e)):
            if (e, p) < (E, P):
                continue
            if (e, p) == (E, P):
                first = max(first, O)
            if only is not None:
                only = frozenset(i for i in only if i >= first and i not in skip)
                if not only:
                    continue
            items.setdefault(e, []).append((j, url, first, skip, only))
    return leftovers, items


def redistribute(states: Sequence[Optional[dict]], sources: Sequence[SourceConfig],
                 shards: Sequence[Sequence[str]], cfg: DataConfig, seed: int,
                 rank: int, world_size: int, num_workers: int) -> Dict[int, dict]:
    """Stream states for this rank's workers from the states of all old readers (global
    reader order: old rank x old workers + worker). None stands for a reader that never
    started."""
    names = [s.name for s in sources]
    for st in states:
        if st is not None and sorted(st["sources"]) != sorted(names):
            raise DataError(f"data: resume state has sources {sorted(st['sources'])}, "
                            f"config has {sorted(names)}")
    n_old, readers = len(states), max(1, num_workers)
    n_new = world_size * readers
    new_plans: List[Dict[str, dict]] = [dict() for _ in range(readers)]
    for index, (src, urls) in enumerate(zip(sources, shards)):
        old = []
        for g, st in enumerate(states):
            stream = SourceStream(index, src, urls, cfg, seed, g, n_old, SkipStats())
            if st is not None:
                stream.load_state_dict(st["sources"][src.name])
            old.append(stream)
        lo = min(s.start[0] for s in old)
        # up to the last epoch any reader started, or has a plan for (an earlier elastic resume)
        hi = max([s.start[0] for s in old] + [s.next[0] for s in old if s.emitted]
                 + [e for s in old for e in s.plan])
        leftovers: Dict[int, List[Leftover]] = {}
        items: Dict[int, List[Item]] = {}
        for stream in old:
            lefts, its = _remainder(stream, hi)
            for e, v in lefts.items():
                leftovers.setdefault(e, []).extend(v)
            for e, v in its.items():
                items.setdefault(e, []).extend(v)
        for w in range(readers):
            g = rank * readers + w
            plan: Dict[int, List[Item]] = {}
            for e in range(lo, hi + 1):
                lefts = sorted(leftovers.get(e, []))
                mine: Dict[Tuple[int, str], set] = {}
                for j, url, i in lefts[g::n_new]:
                    mine.setdefault((j, url), set()).add(i)
                plan[e] = [(j, url, 0, frozenset(), frozenset(ix)) for (j, url), ix in sorted(mine.items())]
                its = sorted(items.get(e, []), key=lambda it: (it[0], it[2]))
                plan[e] += [it for m, it in enumerate(its) if (len(lefts) + m) % n_new == g]
            stream = SourceStream(index, src, urls, cfg, seed, g, n_new, SkipStats())
            stream.start, stream.plan = (lo, 0, 0), plan
            new_plans[w][src.name] = stream.state_dict()
    # the rank-level batch count T goes on: worker w's batches are T' + b*W' + w, so every
    # rank draws the same task at the same step (stream.MixtureStream._batches)
    old_workers = _workers_of_rank0(states)
    done = sum(int(st["batch_no"]) for st in states[:old_workers] if st is not None)
    batch_no = math.ceil(done / readers)
    out = {}
    for w in range(readers):
        stats = SkipStats()
        if rank == 0 and w == 0:
            _sum_stats(stats, [st["stats"] for st in states if st is not None])
        out[w] = {"layout": [rank, world_size, w, readers], "batch_no": batch_no,
                  "sources": new_plans[w], "stats": stats.state_dict()}
    return out


def _workers_of_rank0(states: Sequence[Optional[dict]]) -> int:
    for st in states:
        if st is not None:
            return max(1, int(st["layout"][3]))
    return 1


def _sum_stats(into: SkipStats, states: Sequence[dict]) -> None:
    for st in states:
        into.read += int(st["read"])
        into.decoded += int(st["decoded"])
        for k, v in st["skipped"].items():
            into.skipped[k] = into.skipped.get(k, 0) + int(v)
        for k, v in st.get("cache_miss", {}).items():
            into.cache_miss[k] = into.cache_miss.get(k, 0) + int(v)
