"""Data section of the config tree (pure dataclasses: importing this must stay cheap)."""

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class DataSplitConfig:
    # shard spec(s): brace patterns, globs, directories, s3:// prefixes or a manifest file
    urls: List[str] = field(default_factory=list)


@dataclass
class DataConfig:
    train: DataSplitConfig = field(default_factory=DataSplitConfig)
    eval: DataSplitConfig = field(default_factory=DataSplitConfig)
    num_workers: int = 2
    resolution: int = 224
    shuffle_buffer: int = 1000
    log_keys: bool = False
    # stop the run when more than this fraction of read samples were skipped as bad
    max_skip_rate: float = 0.05
    s3_endpoint: Optional[str] = None
