"""Counting bad data: per worker (inside the stream) and per rank (in the trainer).

Bad data never stops a run by itself: a bad sample or shard is skipped, counted under a
reason and logged. Each batch carries its worker's cumulative counters (`__stats__`);
the trainer feeds batches to a `SkipTracker`, which sums the latest counters of every
worker and stops the run once the skip rate passes `data.max_skip_rate`.
"""

from __future__ import annotations

import logging
from typing import Dict, Mapping, Optional

from unilip_ds.data.config import DataError

log = logging.getLogger(__name__)

# why a sample or shard was skipped
REASONS = (
    "bad_image",        # truncated / non-image bytes, undecodable
    "missing_key",      # a field the task needs is absent (e.g. no jpg, no txt)
    "empty_text",       # caption / instruction empty after stripping
    "bad_text",         # caption / instruction not UTF-8, or without a visible character
    "tar_corrupt",      # a tar member or header is broken: the rest of the shard is lost
    "shard_unreadable", # the shard cannot be opened / read (after storage retries)
    "caption_too_long", # a T2I caption over data.max_caption_chars (left out by design)
)
# why a sample of a cached source was computed live (data.cache)
MISS_REASONS = ("missing_shard", "missing_sample", "unreadable", "corrupt")
# shard-level reasons count shards, the others count samples
SHARD_REASONS = ("tar_corrupt", "shard_unreadable")
# samples a setting leaves out, not bad data: counted and logged, not in the skip rate
FILTER_REASONS = ("caption_too_long",)

_LOG_FIRST = 20  # log every skip up to this many per reason, then every 1000th


class SkipStats:
    """Cumulative counters of one worker; part of the stream's resume state."""

    def __init__(self):
        self.read = 0      # raw samples pulled out of tars
        self.decoded = 0   # samples decoded successfully
        self.skipped: Dict[str, int] = {r: 0 for r in REASONS}
        # samples of a cached source whose record was unusable (computed live instead)
        self.cache_miss: Dict[str, int] = {}

    def miss(self, reason: str, what: str) -> None:
        n = self.cache_miss[reason] = self.cache_miss.get(reason, 0) + 1
        if n <= _LOG_FIRST or n % 1000 == 0:
            log.warning("data: cache miss for %s (%s, #%d): computed live", what, reason, n)

    def skip(self, reason: str, what: str, detail: str = "") -> None:
        n = self.skipped[reason] = self.skipped[reason] + 1
        if n <= _LOG_FIRST or n % 1000 == 0:
            log.warning("data: skipped %s (%s, #%d)%s", what, reason, n,
                        f": {detail}" if detail else "")

    def state_dict(self) -> dict:
        return {"read": self.read, "decoded": self.decoded, "skipped": dict(self.skipped),
                "cache_miss": dict(self.cache_miss)}

    def load_state_dict(self, state: Mapping) -> None:
        self.read = int(state["read"])
        self.decoded = int(state["decoded"])
        self.skipped = {r: int(state["skipped"].get(r, 0)) for r in REASONS}
        self.cache_miss = {r: int(n) for r, n in state.get("cache_miss", {}).items()}


def skip_rate(read: int, skipped: Mapping[str, int]) -> float:
    """Skipped units over read units; an unreadable or cut shard counts as one unit."""
    shard = sum(skipped.get(r, 0) for r in SHARD_REASONS)
    samples = sum(n for r, n in skipped.items() if r not in SHARD_REASONS + FILTER_REASONS)
    denom = read + shard
    return (samples + shard) / denom if denom else 0.0


class SkipTracker:
    """Sums the cumulative counters of every worker of one rank.

    `update(batch)` after every batch; `totals()` for metrics; `check()` raises
    DataError once the skip rate exceeds the limit (after `check_after` reads).
    """

    def __init__(self, max_skip_rate: float, check_after: int = 1000, cached: bool = False):
        self.max_skip_rate = max_skip_rate
        self.check_after = check_after
        self.cached = cached  # some source has a cache: report every miss reason (0 too)
        self._workers: Dict[int, dict] = {}

    @classmethod
    def from_config(cls, cfg) -> "SkipTracker":
        from unilip_ds.data.config import split_sources
        cached = any(s.cache for s in split_sources(cfg.data.train, "train"))
        return cls(cfg.data.max_skip_rate, cfg.data.skip_check_after, cached)

    def update(self, batch: Mapping) -> None:
        stats = batch.get("__stats__")
        if stats is None:
            raise DataError("batch has no '__stats__': not produced by unilip_ds.data")
        self._workers[int(stats["worker"])] = stats

    def totals(self) -> Dict[str, int]:
        # the same names on every rank: the trainer sums them in one collective
        out = {f"data/skipped/{r}": 0 for r in REASONS}
        if self.cached:
            out.update({f"data/cache_miss/{r}": 0 for r in MISS_REASONS})
        read = 0
        for s in self._workers.values():
            read += s["read"]
            for r, n in s["skipped"].items():
                out[f"data/skipped/{r}"] += n
            for r, n in s.get("cache_miss", {}).items():
                out[f"data/cache_miss/{r}"] += n
        out["data/read"] = read
        return out

    def rate(self, totals: Optional[Mapping[str, float]] = None) -> float:
        t = totals if totals is not None else self.totals()
        return skip_rate(t["data/read"], {k.rsplit("/", 1)[1]: v for k, v in t.items()
                                          if k.startswith("data/skipped/")})

    def check(self, totals: Optional[Mapping[str, float]] = None) -> None:
        """`totals`: counters summed over all ranks (so every rank decides alike)."""
        t = totals if totals is not None else self.totals()
        if t["data/read"] < self.check_after:
            return
        rate = self.rate(t)
        if rate > self.max_skip_rate:
            worst = max((r for r in REASONS if r not in FILTER_REASONS), key=lambda r: t[f"data/skipped/{r}"])
            raise DataError(
                f"data: skip rate {rate:.3f} > data.max_skip_rate {self.max_skip_rate} after "
                f"{t['data/read']} samples read (most skipped: {worst} = "
                f"{t[f'data/skipped/{worst}']}); fix the shards or raise the limit")
