"""The resumable training stream: a stateful IterableDataset of ready batches.

Served by torchdata's StatefulDataLoader (batch_size=None), which calls state_dict() /
load_state_dict() inside each worker. Layout of the stream of one worker:

- Every source has its own shard order per epoch: a permutation seeded by
  (seed, source, epoch) of its shards x repeats, split across ranks x workers by
  striding (global worker g of N takes entries g, g+N, ...). Every sample of an epoch
  goes to exactly one worker.
- Shuffle: a source reads `shuffle_buffer` raw samples (bytes, never decoded) as a
  block and emits them in an order seeded by (seed, source, rank, worker, block). The
  block's content is a pure function of its start position, so the resume state is
  positions only: (epoch, shard, sample offset) of the block start, the block number and
  the index inside the block. Resuming re-reads one block's bytes (at most about one shard
  plus the block) and decodes nothing that was already emitted.
- Mixing: batch b of worker w first draws its task from an RNG seeded by
  (seed, b*W + w) alone, so that every rank trains the same task at the same step; then
  each sample draws its source among that task's sources by weight.
- Augmentation randomness (crops, flips) comes from an RNG seeded by the batch position,
  so a resumed run produces the same pixels too.
"""

from __future__ import annotations

import itertools
import logging
import os
import tarfile
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys

from unilip_ds.data.config import DataConfig, DataError, SourceConfig
from unilip_ds.data.decode import BatchBuilder, Decoder, SampleError
from unilip_ds.data.skips import SkipStats
from unilip_ds.data.storage import StorageError, open_shard

log = logging.getLogger(__name__)

Cursor = Tuple[int, int, int]  # (epoch, index in this worker's item list, sample offset)
# one shard of a worker's epoch: (entry in the epoch's permutation, url, first sample,
# samples to leave out, only these samples or None); see SourceStream.items
Item = Tuple[int, str, int, frozenset, Optional[frozenset]]


SkipFn = Callable[[str, str], None]  # (reason, detail)
_BLOCK = tarfile.BLOCKSIZE
_ZERO = bytes(_BLOCK)
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)  # not sparse, links, dirs


class TarMembers:
    """Regular members of a plain tar stream, read with one `read` per header and one per
    member's data.

    Headers are parsed (and checksum-verified) by `tarfile.TarInfo.frombuf`; pax ('x',
    'g') and GNU long-name headers are applied to the member that follows. tarfile's own
    stream mode costs about twice as much per member (its buffering re-slices and
    re-joins every read) and ends silently at a corrupt header; here a break, data after
    the end or a missing end marker raises tarfile.ReadError. `members` counts the
    regular members read.
    """

    def __init__(self, stream, url: str):
        self.stream = stream
        self.url = url
        self.members = 0
        self.offset = 0  # bytes consumed

    def _read(self, n: int) -> bytes:
        data = self.stream.read(n)  # a buffered reader returns n bytes unless at the end
        self.offset += len(data)
        return data

    def __iter__(self) -> Iterator[dict]:
        glob: dict = {}  # 'g' pax records: every later member
        pax: dict = {}  # 'x' pax records: the next member only
        long_name: Optional[str] = None
        while True:
            at = self.offset
            header = self._read(_BLOCK)
            if header == _ZERO:
                # the end: a second zero block, then nothing but zeros
                tail = 0
                while chunk := self.stream.read(1 << 20):
                    if chunk.strip(b"\0"):
                        raise tarfile.ReadError(f"data after the end of the archive at byte {at}")
                    tail += len(chunk)
                if tail < _BLOCK:
                    raise tarfile.ReadError(f"archive ends without its end marker at byte {at}")
                return
            if len(header) < _BLOCK:
                raise tarfile.ReadError("empty file" if at == 0 else
                                        f"archive ends without its end marker at byte {at}")
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            size = int(pax.get("size", glob.get("size", info.size)))
            data = self._read(size)
            name = long_name or pax.get("path") or glob.get("path") or info.name
            if len(data) < size:
                raise tarfile.ReadError(f"member {name} is cut short")
            self._read(-size % _BLOCK)  # padding; a short one shows at the next header
            if info.type == tarfile.XHDTYPE:
                pax = _pax_records(data)
                continue
            if info.type == tarfile.XGLTYPE:
                glob.update(_pax_records(data))
                continue
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
                continue
            if info.type == tarfile.GNUTYPE_LONGLINK:
                continue
            pax, long_name = {}, None
            if info.type not in _FILE_TYPES or name.rsplit("/", 1)[-1].startswith("__"):
                continue
            self.members += 1
            yield {"fname": name, "data": data, "__url__": self.url}


def _pax_records(data: bytes) -> dict:
    """'<length> <key>=<value>\\n' records of a pax header."""
    out, pos = {}, 0
    while pos < len(data) and data[pos]:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= space - pos:
            raise tarfile.ReadError("invalid pax header record")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _tar_files(reader: TarMembers) -> Iterator[dict]:
    try:
        yield from reader
    except Exception:
        yield {}  # group_by_keys: hand out the last complete sample before the break
        raise


def iter_shard(url: str, cfg: Optional[DataConfig], on_skip: Optional[SkipFn]) -> Iterator[dict]:
    """Raw samples (dicts of bytes by extension, plus __key__/__url__) of one tar shard.

    An unreadable shard or a broken tar ends the shard; it is reported to `on_skip` and
    never raised (samples before the break are kept).
    """
    def skip(reason: str, detail: str) -> None:
        if on_skip is not None:
            on_skip(reason, detail)

    try:
        stream = open_shard(url, cfg)
    except StorageError as exc:
        skip("shard_unreadable", str(exc))
        return
    n = 0
    reader = TarMembers(stream, url)
    try:
        for sample in group_by_keys(_tar_files(reader), handler=_reraise):
            n += 1
            yield sample
    except StorageError as exc:
        skip("shard_unreadable", str(exc))
    except (tarfile.TarError, ValueError, EOFError, OSError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        # no member readable: not a tar (or empty); else it broke mid-way
        skip("shard_unreadable" if reader.members == 0 and "end marker" not in first
             else "tar_corrupt", f"after {n} samples: {first}")
    finally:
        stream.close()


def _reraise(exc: Exception) -> bool:
    raise exc


class SourceStream:
    """Shuffled raw samples of one source for one worker, resumable by position."""

    def __init__(self, index: int, src: SourceConfig, shards: Sequence[str], cfg: DataConfig,
                 seed: int, global_worker: int, num_global_workers: int,
                 stats: SkipStats):
        self.index = index
        self.name = src.name
        self.shards = list(shards)
        self.repeats = src.repeats
        self.cfg = cfg
        self.seed = seed
        self.g = global_worker
        self.n = num_global_workers
        self.block_size = cfg.shuffle_buffer
        self.stats = stats
        if len(self.shards) * self.repeats < self.n:
            raise DataError(
                f"data: source '{self.name}' has {len(self.shards)} shard(s) x {self.repeats} "
                f"repeat(s) for {self.n} readers (ranks x data.num_workers); write more, "
                f"smaller shards or use fewer workers")
        # position: start of the current block, its number, samples emitted from it
        self.start: Cursor = (0, 0, 0)
        self.block_no = 0
        self.emitted = 0
        self.reread = 0  # raw samples re-read to get back into position (this process)
        self._counting = True
        # (epoch, item, first, last sample) runs of the current block: with the emitted
        # count they say which samples are trained on (elastic resume, data/elastic.py)
        self.spans: List[List[int]] = []
        self.next: Cursor = self.start  # the sample after the current block (read ahead)
        self.plan: dict = {}  # epoch -> items, set by an elastic resume for epochs in flight

    def _on_skip(self, url: str) -> SkipFn:
        def report(reason: str, detail: str) -> None:
            # a block re-read on resume was counted when it was first read
            if self._counting:
                self.stats.skip(reason, f"shard {url} of source '{self.name}'", detail)
        return report

    # -- shard order -------------------------------------------------------------------
    def items(self, epoch: int) -> List[Item]:
        """This reader's shards of an epoch; an elastic resume plans the epochs that were in
        flight (the remainder of the old readers' items, see data/elastic.py)."""
        if epoch in self.plan:
            return self.plan[epoch]
        order = np.random.default_rng([self.seed, self.index, epoch]).permutation(
            len(self.shards) * self.repeats)
        return [(int(j), self.shards[j % len(self.shards)], 0, frozenset(), None)
                for j in order[self.g::self.n]]

    def worker_shards(self, epoch: int) -> List[str]:
        return [item[1] for item in self.items(epoch)]

    def _raw(self, cursor: Cursor) -> Iterator[Tuple[Cursor, dict]]:
        """(cursor, sample) from `cursor` on, across epochs, forever."""
        epoch, pos, offset = cursor
        while True:
            items = self.items(epoch)
            full_epoch, found = pos == 0 and offset == 0 and epoch not in self.plan, 0
            for p in range(pos, len(items)):
                _, url, first, skip, only = items[p]
                last = max(only) if only else -1
                for i, sample in enumerate(iter_shard(url, self.cfg, self._on_skip(url))):
                    if i < offset or i < first:  # getting back into position: bytes only
                        self.reread += 1
                        continue
                    if i in skip or (only is not None and i not in only):
                        continue
                    found += 1
                    yield (epoch, p, i), sample
                    if i == last:
                        break
                offset = 0
            if full_epoch and not found:
                raise DataError(f"data: source '{self.name}': no readable sample in any of "
                                f"the {len(items)} shard(s) of worker {self.g} in epoch {epoch}")
            epoch, pos = epoch + 1, 0

    # -- shuffled samples --------------------------------------------------------------
    def samples(self) -> Iterator[dict]:
        raw = self._raw(self.start)
        ahead: list = []  # the next block's first sample, read to know where this block ends
        while True:
            resuming = self.emitted > 0
            self._counting = not resuming  # counted when this block was first read
            block: List[dict] = []
            cursors: List[Cursor] = []
            self.spans = []
            for cur, sample in itertools.islice(itertools.chain(ahead, raw), self.block_size):
                if not block:
                    self.start = cur
                block.append(sample)
                cursors.append(cur)
                if self.spans and self.spans[-1][:2] == [cur[0], cur[1]]:
                    self.spans[-1][3] = cur[2]
                else:
                    self.spans.append([cur[0], cur[1], cur[2], cur[2]])
                if resuming:
                    self.reread += 1
                else:
                    self.stats.read += 1
            self._counting = True
            ahead = [next(raw)]
            self.next = ahead[0][0]  # the shards before it are read to the end
            if resuming:
                log.info("data: source '%s' of worker %d back at block %d, sample %d, after "
                         "re-reading %d raw samples (nothing decoded)", self.name, self.g,
                         self.block_no, self.emitted, self.reread)
            order = np.random.default_rng(
                [self.seed, self.index, self.g, self.block_no]).permutation(len(block))
            for j in range(self.emitted, len(block)):
                if j == len(block) - 1:
                    self.start = self.next  # block done
                    self.block_no += 1
                    self.emitted = 0
                else:
                    self.emitted = j + 1
                self.cursor = cursors[order[j]]  # where the sample came from
                yield block[order[j]]

    def state_dict(self) -> dict:
        state = {"start": list(self.start), "block_no": self.block_no, "emitted": self.emitted,
                 "spans": [list(s) for s in self.spans] if self.emitted else []}
        if self.emitted:
            state["next"] = list(self.next)
        plan = {e: items for e, items in self.plan.items() if e >= self.start[0]}
        if plan:  # only after an elastic resume, until its epochs are read
            state["plan"] = {e: [[j, url, first, sorted(skip), None if only is None else sorted(only)]
                                 for j, url, first, skip, only in items] for e, items in plan.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.start = tuple(int(x) for x in state["start"])  # type: ignore[assignment]
        self.block_no = int(state["block_no"])
        self.emitted = int(state["emitted"])
        self.spans = [list(s) for s in state.get("spans", [])]
        # a state without `next` (older runs): maybe more samples after the block's last
        self.next = tuple(state["next"]) if "next" in state else \
            tuple(self.spans[-1][:2] + [self.spans[-1][3] + 1]) if self.spans else self.start
        self.plan = {int(e): [(int(j), url, int(first), frozenset(skip),
                               None if only is None else frozenset(only))
                              for j, url, first, skip, only in items]
                     for e, items in state.get("plan", {}).items()}


class MixtureStream(IterableDataset):
    """Task-homogeneous batches from weighted sources, for one rank.

    Iterating yields dicts: decoded fields (uint8 image tensors and text lists, see
    decode.BatchBuilder), "__key__", "__task__", "__source__" (per sample) and "__stats__"
    (the worker's cumulative counters).
    """

    def __init__(self, sources: Sequence[SourceConfig], shards: Sequence[Sequence[str]],
                 cfg: DataConfig, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.sources = list(sources)
        self.shards = [list(s) for s in shards]
        self.cfg = cfg
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.tasks = sorted({s.task for s in self.sources})
        self.task_weight = np.array([sum(s.weight for s in self.sources if s.task == t)
                                     for t in self.tasks])
        self.decoders = {t: Decoder(t, cfg.resolution, train=True, random_flip=cfg.random_flip,
                                    max_caption_chars=cfg.max_caption_chars)
                         for t in self.tasks}
        self._pending: Optional[dict] = None
        self._owner: Optional[Tuple[int, int]] = None  # (pid, worker) the streams belong to

    # -- per-worker setup --------------------------------------------------------------
    def _ensure_built(self) -> None:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if self._owner == (os.getpid(), worker):
            return
        self.worker, self.num_workers = worker, num_workers
        n = self.world_size * self.num_workers
        g = self.rank * self.num_workers + self.worker
        self.stats = SkipStats()
        self.streams = [SourceStream(i, s, sh, self.cfg, self.seed, g, n, self.stats)
                        for i, (s, sh) in enumerate(zip(self.sources, self.shards))]
        from unilip_ds.data.cache import SourceCache
        self.caches = [SourceCache(s.cache, s.task, self.cfg) if s.cache else None for s in self.sources]
        self.batch_no = 0
        self._owner = (os.getpid(), worker)
        if self._pending is not None:
            # an elastic resume gives every worker its own state (data/elastic.py)
            pending = self._pending.get("by_worker", {}).get(worker, self._pending)
            self._restore(pending)
            self._pending = None

    def _restore(self, state: dict) -> None:
        layout = (self.rank, self.world_size, self.worker, self.num_workers)
        saved = tuple(state["layout"])
        if saved != layout:
            raise DataError(f"data: resume state is for (rank, world_size, worker, num_workers) "
                            f"= {saved}, this run has {layout}; resume with the same layout")
        names = [s.name for s in self.sources]
        if sorted(state["sources"]) != sorted(names):
            raise DataError(f"data: resume state has sources {sorted(state['sources'])}, "
                            f"config has {sorted(names)}")
        self.batch_no = int(state["batch_no"])
        self.stats.load_state_dict(state["stats"])
        for s in self.streams:
            s.load_state_dict(state["sources"][s.name])

    def state_dict(self) -> dict:
        self._ensure_built()
        return {
            "layout": [self.rank, self.world_size, self.worker, self.num_workers],
            "batch_no": self.batch_no,
            "sources": {s.name: s.state_dict() for s in self.streams},
            "stats": self.stats.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        # applied when the worker builds its streams (worker info is known only there)
        self._pending = state
        self._owner = None

    # -- iteration ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        self._ensure_built()
        return self._batches()

    def _cached(self, i: int, raw: dict) -> Optional[dict]:
        """The sample's cache record (tensors), or None (no cache, or a miss: counted)."""
        cache = self.caches[i]
        if cache is None:
            return None
        rec, why = cache.get(raw["__url__"], raw["__key__"])
        if why is not None:
            self.stats.miss(why, f"sample {raw['__key__']} of {raw['__url__']}")
        return rec

    def _batches(self) -> Iterator[dict]:
        gens = [s.samples() for s in self.streams]
        by_task = {t: [i for i, s in enumerate(self.sources) if s.task == t] for t in self.tasks}
        probs = {t: np.array([self.sources[i].weight for i in idx]) for t, idx in by_task.items()}
        probs = {t: p / p.sum() for t, p in probs.items()}
        task_p = self.task_weight / self.task_weight.sum()
        while True:
            b = self.batch_no
            # same task on every rank at the same step (ranks step in lockstep)
            task_rng = np.random.default_rng([self.seed, 1, b * self.num_workers + self.worker])
            task = self.tasks[int(task_rng.choice(len(self.tasks), p=task_p))]
            rng = np.random.default_rng([self.seed, 2, self.rank, self.worker, b])
            builder = self.decoders[task].new_batch(self.batch_size)
            candidates, p = by_task[task], probs[task]
            names, records = [], []
            while not builder.full:
                # a single source needs no draw (and keeps the rng for the crops)
                i = candidates[int(rng.choice(len(candidates), p=p))] \
                    if len(candidates) > 1 else candidates[0]
                raw = next(gens[i])
                record = self._cached(i, raw)
                try:  # a sample with its record needs no image decode (squash tasks: no rng)
                    builder.add(raw, rng, images=record is None)
                except SampleError as exc:
                    self.stats.skip(exc.reason, f"sample {raw['__key__']} of {raw['__url__']}",
                                    exc.detail)
                    continue
                self.stats.decoded += 1
                names.append(self.sources[i].name)
                records.append(record)
            self.batch_no = b + 1
            batch = builder.finish()
            batch["__source__"] = names
            if any(c is not None for c in self.caches):
                batch["__cache__"] = records  # per sample: its cache record, or None
            batch["__stats__"] = {
                "worker": self.worker, **self.stats.state_dict(),
                "reread": sum(s.reread for s in self.streams)}
            yield batch


def eval_batches(sources: Sequence[SourceConfig], shards: Sequence[Sequence[str]],
                 cfg: DataConfig, batch_size: int, rank: int, world_size: int,
                 max_batches: int) -> List[dict]:
    """Deterministic held-out batches: rank r reads shards r, r+world, ... in order,
    centred crops, no flips; bad samples are skipped (and counted in __stats__)."""
    out: List[dict] = []
    stats = SkipStats()

    def finish(builder: BatchBuilder, src: SourceConfig) -> bool:
        """Appends the batch; True once max_batches are out."""
        batch = builder.finish()
        batch["__source__"] = [src.name] * len(builder)
        batch["__stats__"] = {"worker": 0, **stats.state_dict(), "reread": 0}
        out.append(batch)
        return len(out) >= max_batches

    for src, urls in zip(sources, shards):
        decoder = Decoder(src.task, cfg.resolution, train=False, max_caption_chars=cfg.max_caption_chars)
        builder = decoder.new_batch(batch_size)
        for url in urls[rank::world_size]:
            on_skip = (lambda reason, detail, url=url: stats.skip(reason, f"shard {url}", detail))
            for raw in iter_shard(url, cfg, on_skip):
                stats.read += 1
                try:
                    builder.add(raw)
                except SampleError as exc:
                    stats.skip(exc.reason, f"sample {raw['__key__']} of {url}", exc.detail)
                    continue
                stats.decoded += 1
                if builder.full:
                    if finish(builder, src):
                        return out
                    builder = decoder.new_batch(batch_size)
        if len(builder) and finish(builder, src):  # a short last batch of the source
            return out
    return out
