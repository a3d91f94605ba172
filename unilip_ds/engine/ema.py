"""EMA of trainable weights, held in fp32, that works under ZeRO-3.

Under ZeRO-3 each rank keeps the EMA of its own partition (`p.ds_tensor`), so the EMA
costs 4 bytes x trainable params / world size per GPU; otherwise every rank holds the full
shadow. `consolidate` reassembles full tensors from the per-rank states offline (export).
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, List

import torch
from torch import nn

from unilip_ds.engine import dist
from unilip_ds.engine.weights import is_partitioned


def _local(p: nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if is_partitioned(p) else p.data


class EMA:
    def __init__(self, module: nn.Module, max_decay: float = 0.999):
        self.max_decay = max_decay
        self.updates = 0
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.partitioned = any(is_partitioned(p) for p in self.params.values())
        self.shadow = {n: _local(p).detach().float().clone() for n, p in self.params.items()}

    def decay(self) -> float:
        """0 at the first update (the shadow becomes a copy), then min(max_decay,
        (1 + t) / (10 + t)): the reference's EMAModel (open-muse / diffusers schedule)."""
        t = self.updates
        return 0.0 if t == 0 else min(self.max_decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self) -> None:
        d = self.decay()
        for n, p in self.params.items():
            self.shadow[n].lerp_(_local(p).float(), 1.0 - d)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self):
        """Temporarily put the EMA weights into the live module (evaluation)."""
        backup = {n: _local(p).detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                _local(p).copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    _local(p).copy_(backup[n])

    def state_dict(self) -> dict:
        return {"updates": self.updates, "max_decay": self.max_decay,
                "partitioned": self.partitioned,
                "shapes": {n: tuple(p.ds_shape) if is_partitioned(p) else tuple(p.shape)
                           for n, p in self.params.items()},
                "shadow": {n: t.cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("EMA state does not match the trainable parameters of the model")
        self.updates = state["updates"]
        for n, t in state["shadow"].items():
            if t.shape != self.shadow[n].shape:
                raise ValueError(f"EMA state: shape of '{n}' is {tuple(t.shape)}, "
                                 f"expected {tuple(self.shadow[n].shape)}")
            self.shadow[n].copy_(t)


    def load_from_ranks(self, states: List[dict]) -> None:
        """Load the EMA of a run with another world size or ZeRO stage: `states` of all its
        ranks in rank order (one, unpartitioned, or one partition each). Parameter by
        parameter, so memory-mapped states never come in whole."""
        first = states[0]
        if set(first["shadow"]) != set(self.shadow):
            raise ValueError("EMA state does not match the trainable parameters of the model")
        rank = dist.rank()
        for n, t in self.shadow.items():
            full = first["shadow"][n].reshape(-1) if not first["partitioned"] else \
                torch.cat([s["shadow"][n].reshape(-1) for s in states])
            numel = math.prod(first["shapes"][n])
            if full.numel() < numel:
                raise ValueError(f"EMA state: '{n}' has {full.numel()} of {numel} elements")
            full = full[:numel]
            if is_partitioned(self.params[n]):  # this rank's slice, zero-padded (ZeRO-3 layout)
                part = full[rank * t.numel():(rank + 1) * t.numel()]
                t.zero_()
                t[:part.numel()].copy_(part)
            else:
                t.copy_(full.reshape(t.shape))
        self.updates = first["updates"]


def consolidate(states: List[dict]) -> Dict[str, torch.Tensor]:
    """Full EMA tensors from the states of all ranks (in rank order)."""
    first = states[0]
    if not first["partitioned"]:
        return {n: t.clone() for n, t in first["shadow"].items()}
    out = {}
    for n, shape in first["shapes"].items():
        flat = torch.cat([s["shadow"][n].reshape(-1) for s in states])
        numel = 1
        for d in shape:
            numel *= d
        out[n] = flat[:numel].reshape(shape).clone()
    return out
