"""Model section of the config tree (pure dataclasses: importing this must stay cheap)."""

from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelConfig:
    # tiny (random, for tests and the demo), 1b, 2b (real dimensions)
    flavor: str = "tiny"
    # weights-only start from a previous stage's export (launch/export.py layout) or run dir
    init_from: Optional[str] = None
    # local paths to real pretrained weights (transformers / diffusers layouts)
    internvl_path: Optional[str] = None
    dcae_path: Optional[str] = None
    # activation checkpointing in encoder and decoder
    grad_checkpointing: bool = False
