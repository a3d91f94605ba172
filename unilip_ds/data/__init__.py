"""Data layer: shard listing and storage, resumable streams, per-task decoding.

The trainer uses `build_train_loader` (a torchdata StatefulDataLoader whose state_dict()
goes into the checkpoint), `build_eval_batches`, and `SkipTracker` for bad-data metrics.
"""

from unilip_ds.data.config import DataConfig, DataError, SourceConfig
from unilip_ds.data.loader import build_eval_batches, build_train_loader
from unilip_ds.data.skips import REASONS, SkipTracker

__all__ = ["DataConfig", "DataError", "SourceConfig", "REASONS", "SkipTracker",
           "build_eval_batches", "build_train_loader"]
