"""Entry points the trainer uses: the resumable train loader and held-out batches."""

from __future__ import annotations

import dataclasses
import warnings
from typing import List, Optional, Sequence

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from unilip_ds.data.config import (DataConfig, DataError, DataSplitConfig, SourceConfig, check_data_config,
                                   split_sources)
from unilip_ds.data import storage
from unilip_ds.data.shards import MANIFEST_NAME, list_shards, read_manifest
from unilip_ds.data.stream import MixtureStream, eval_batches


def _sources_and_shards(cfg: DataConfig, split: DataSplitConfig, which: str):
    sources = mix_sources(cfg, split, which)
    return sources, [list_shards(list(s.urls), cfg) for s in sources]


def mix_sources(cfg: DataConfig, split: DataSplitConfig, which: str) -> List[SourceConfig]:
    """The split's sources, each `weight` its effective probability mass: as configured
    (mix=weight), or sample count x repeats (mix=samples), the count from `samples` or else
    the source's data_prep manifests (every url a manifest, else an error naming the key)."""
    sources = split_sources(split, which)
    if split.mix != "samples" or len(sources) == 1:  # one source has every batch anyway
        return sources
    out = []
    for i, s in enumerate(sources):
        count = s.samples if s.samples is not None else _manifest_count(list(s.urls), cfg)
        if count is None:
            raise DataError(f"config key 'data.{which}.sources[{i}].samples': data.{which}.mix=samples needs "
                            f"source '{s.name}'s sample count: give it, or name data_prep's manifest.json "
                            "(or the folder holding it) in urls")
        out.append(dataclasses.replace(s, weight=float(count * s.repeats), samples=count))
    return out


def _manifest_count(specs: List[str], cfg: DataConfig) -> Optional[int]:
    """Samples in the data_prep manifests the specs name (a manifest, or a folder / prefix
    holding manifest.json); None when a spec has none (globs, brace patterns, bare shards)."""
    total = 0
    for spec in specs:
        url = spec if spec.endswith(".json") else storage.join(spec, MANIFEST_NAME)
        if not storage.exists(url, cfg):
            return None
        total += read_manifest(url, cfg).samples
    return total


def describe_mix(sources: Sequence[SourceConfig], mix: str) -> List[str]:
    """One line per source: its share of the samples (and of its task's batches)."""
    total = sum(s.weight for s in sources)
    task_total = {t: sum(s.weight for s in sources if s.task == t) for t in {s.task for s in sources}}
    lines = []
    for s in sources:
        basis = f"{s.samples:,} samples x{s.repeats}" if mix == "samples" and s.samples else f"weight {s.weight:g}"
        lines.append(f"{s.name} ({s.task}, {basis}): {100 * s.weight / total:.1f}% of samples, "
                     f"{s.task} batches {100 * task_total[s.task] / total:.1f}%")
    return lines


def _ignore_stop_signals(_worker_id: int) -> None:
    """In each data worker, after torch installed its own handlers: Ctrl-C and Slurm's
    scancel reach every process, and the trainer checkpoints before it stops; a worker
    killed by them would end the run first. Workers still exit with their loader."""
    import signal
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def close_workers(loader: StatefulDataLoader) -> None:
    """Stop the loader's workers now. torchdata keeps the live iterator on the loader (for
    state_dict), so it outlives the loop; at interpreter exit the loader does nothing and
    multiprocessing terminates its daemonic children with SIGTERM, which they ignore, then
    joins them: it would wait for ever. The workers leave on the loader's sentinel; one that
    does not within its join timeout is killed."""
    it = getattr(loader, "_iterator", None)
    if it is None or not hasattr(it, "_shutdown_workers"):
        return
    it._shutdown_workers()
    for w in getattr(it, "_workers", []):
        if w.is_alive():
            w.kill()
            w.join()


def build_train_loader(cfg, rank: int = 0, world_size: int = 1,
                       batch_size: Optional[int] = None) -> StatefulDataLoader:
    """The rank's infinite stream of task-homogeneous micro-batches.

    Images come as uint8 (B,3,H,W) tensors ("image", and "input_image" for edit); the
    trainer converts them to float in [0,1] on the device (4x less to move, no float work
    in the workers). See decode.BatchBuilder for the batch layout.

    `loader.state_dict()` after k batches, given to `load_state_dict()` of a loader built
    the same way, continues with batch k+1 exactly (same keys, same pixels).
    """
    data: DataConfig = cfg.data
    check_data_config(data)
    sources, shards = _sources_and_shards(data, data.train, "train")
    dataset = MixtureStream(sources, shards, data, batch_size or cfg.train.micro_batch_size,
                            seed=cfg.run.seed, rank=rank, world_size=world_size)
    workers = data.num_workers
    with warnings.catch_warnings():  # torchdata calls a deprecated torch API at init
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(
            dataset,
            batch_size=None,  # the stream batches itself (task-homogeneous)
            num_workers=workers,
            prefetch_factor=data.prefetch_factor if workers else None,
            # the state travels with every batch: resuming never replays (decodes) batches
            snapshot_every_n_steps=1,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            worker_init_fn=_ignore_stop_signals if workers else None,
        )


def load_elastic(loader: StatefulDataLoader, rank_states: Sequence[dict], cfg, rank: int,
                 world_size: int) -> None:
    """Continue the epochs of a run saved with another number of ranks or workers:
    `rank_states` are the loader states of all old ranks (rank order); see data/elastic.py."""
    from unilip_ds.data.elastic import loader_worker_states, redistribute
    states = [s for st in rank_states for s in loader_worker_states(st)]
    sources, shards = _sources_and_shards(cfg.data, cfg.data.train, "train")
    loader.dataset.load_state_dict({"by_worker": redistribute(
        states, sources, shards, cfg.data, cfg.run.seed, rank, world_size, cfg.data.num_workers)})


def build_eval_batches(cfg, rank: int = 0, world_size: int = 1,
                       max_batches: int = 8, batch_size: Optional[int] = None) -> List[dict]:
    """Deterministic held-out batches from data.eval (no shuffle, centred crops, no flips);
    images as uint8 (B,3,H,W), as in the train batches."""
    data: DataConfig = cfg.data
    check_data_config(data)
    sources, shards = _sources_and_shards(data, data.eval, "eval")
    return eval_batches(sources, shards, data, batch_size or cfg.train.micro_batch_size,
                        rank, world_size, max_batches)
