"""Data section of the config tree (pure dataclasses: importing this must stay cheap)."""

from dataclasses import dataclass, field
from typing import List, Optional

TASKS = ("recon", "t2i", "edit")
MIXES = ("weight", "samples")


class DataError(ValueError):
    """Bad data settings or unusable data; the message is one line."""


@dataclass
class SourceConfig:
    """One named source of a weighted mixture (e.g. BLIP3o long captions)."""
    name: str = ""
    # shard spec(s): brace patterns, globs, directories, s3:// prefixes or a manifest file
    urls: List[str] = field(default_factory=list)
    task: str = "recon"  # recon | t2i | edit: how its samples are decoded
    # probability mass of this source; batches are task-homogeneous, so a batch first
    # draws its task by the summed weights of that task's sources, then each sample its source
    weight: float = 1.0
    # each shard appears this many times per epoch of this source
    repeats: int = 1
    # mix=samples: this source's sample count; unset: summed from its data_prep manifests
    samples: Optional[int] = None
    # a cache of the generator's frozen outputs for these shards (data_prep/cache_features.py
    # --dst): a directory or s3:// prefix; its records replace those forward passes
    cache: Optional[str] = None


@dataclass
class DataSplitConfig:
    # shard spec(s) of a single source (used when `sources` is empty)
    urls: List[str] = field(default_factory=list)
    task: str = "recon"  # task of `urls`
    cache: Optional[str] = None  # cache of `urls` (see SourceConfig.cache)
    sources: List[SourceConfig] = field(default_factory=list)
    # how sources share the batches: "weight" = each source's `weight` is its probability
    # mass; "samples" = its sample count x repeats, the shares the reference gets by
    # shuffling all per-task batches of its concatenated (repeated) data sets
    mix: str = "weight"


@dataclass
class DataConfig:
    train: DataSplitConfig = field(default_factory=DataSplitConfig)
    eval: DataSplitConfig = field(default_factory=DataSplitConfig)
    num_workers: int = 2
    prefetch_factor: int = 2  # batches queued per worker
    resolution: int = 224
    # raw samples permuted together (a block); resume re-reads at most one block. Each
    # worker holds one block of encoded bytes per source: ~shuffle_buffer x file size
    shuffle_buffer: int = 1000
    random_flip: bool = True  # horizontal flips for recon only (captions name sides)
    # T2I samples whose caption is longer (characters) are skipped and counted
    # (caption_too_long), as the reference drops them; 0: no limit
    max_caption_chars: int = 1000
    log_keys: bool = False
    # stop the run when more than this fraction of read samples were skipped as bad,
    # checked once at least `skip_check_after` samples were read
    max_skip_rate: float = 0.05
    skip_check_after: int = 1000
    # object storage; credentials come only from the standard AWS environment variables
    # (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) so they never enter a saved config
    s3_endpoint: Optional[str] = None  # else AWS_ENDPOINT_URL
    s3_region: Optional[str] = None  # else AWS_REGION / AWS_DEFAULT_REGION
    # transient storage errors are retried with backoff up to this total wait per shard
    io_retry_seconds: float = 60.0
    # caches of frozen outputs: a record is fetched together with the records after it, up
    # to this many KiB per request, kept for the next ones (records lie in the source's
    # order, and a shuffle block is a stretch of consecutive samples): fewer object-store
    # requests; 0 = one ranged request per record
    cache_read_ahead_kib: int = 4096


def split_sources(split: DataSplitConfig, which: str) -> List[SourceConfig]:
    """The sources of a split (`urls` alone makes one source), validated."""
    if split.sources:
        if split.urls:
            raise DataError(f"config key 'data.{which}': set either urls or sources, not both")
        if split.cache:
            raise DataError(f"config key 'data.{which}.cache': with sources, set each source's cache")
        sources = list(split.sources)
    elif split.urls:
        sources = [SourceConfig(name=which, urls=list(split.urls), task=split.task, cache=split.cache)]
    else:
        raise DataError(f"config key 'data.{which}.urls': no shards configured")
    names = set()
    for i, s in enumerate(sources):
        key = f"data.{which}.sources[{i}]"
        if not s.name:
            s.name = f"source{i}"
        if s.name in names:
            raise DataError(f"config key '{key}.name': duplicate source name '{s.name}'")
        names.add(s.name)
        if s.task not in TASKS:
            raise DataError(f"config key '{key}.task': one of {', '.join(TASKS)}, got '{s.task}'")
        if not s.urls:
            raise DataError(f"config key '{key}.urls': source '{s.name}' has no shards")
        if not s.weight > 0:
            raise DataError(f"config key '{key}.weight': must be > 0, got {s.weight}")
        if s.repeats < 1:
            raise DataError(f"config key '{key}.repeats': must be >= 1, got {s.repeats}")
        if s.samples is not None and s.samples < 1:
            raise DataError(f"config key '{key}.samples': must be >= 1, got {s.samples}")
    if split.mix not in MIXES:
        raise DataError(f"config key 'data.{which}.mix': one of {', '.join(MIXES)}, got '{split.mix}'")
    return sources


def check_data_config(cfg: DataConfig) -> None:
    """Checks that types alone cannot express (the sources are checked when built)."""
    if cfg.resolution < 8:
        raise DataError(f"config key 'data.resolution': must be >= 8, got {cfg.resolution}")
    if cfg.max_caption_chars < 0:
        raise DataError(f"config key 'data.max_caption_chars': must be >= 0 (0: no limit), "
                        f"got {cfg.max_caption_chars}")
    if cfg.shuffle_buffer < 1:
        raise DataError(f"config key 'data.shuffle_buffer': must be >= 1, got {cfg.shuffle_buffer}")
    if cfg.num_workers < 0:
        raise DataError(f"config key 'data.num_workers': must be >= 0, got {cfg.num_workers}")
    if cfg.prefetch_factor < 1:
        raise DataError(
            f"config key 'data.prefetch_factor': must be >= 1, got {cfg.prefetch_factor}")
    if not 0 <= cfg.max_skip_rate <= 1:
        raise DataError(
            f"config key 'data.max_skip_rate': must be in [0, 1], got {cfg.max_skip_rate}")
