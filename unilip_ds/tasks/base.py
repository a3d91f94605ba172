"""What a task is: a small object that builds its modules, names what trains (and at
which LR), and turns a batch into losses. The one training loop (trainer.py) owns
everything else: engines, backward/step, accumulation, EMA, checkpoints, logging.

Per optimizer step the trainer does, for every micro-batch:

    for phase in task.phases(step):              # e.g. ["model"] or ["model", "disc"]
        loss, logs = task.loss(phase, batch, step, engines)
        engines[phase].backward(loss); engines[phase].step()

`engines[name]` is the DeepSpeed engine wrapping `modules[name]`; calling it runs that
module's forward. Modules are plain single-device PyTorch code.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

# the engine that is EMA'd, exported and handed to the next stage
MAIN = "model"


@dataclass
class ParamGroup:
    """Parameters that share an LR multiplier and a weight decay."""
    name: str
    params: List[nn.Parameter] = field(default_factory=list)
    lr_scale: float = 1.0
    weight_decay: float = 0.0


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms and embeddings are not decayed. (Under ZeRO-3 the parameter is already
    partitioned to shape (0,) here: its full shape is `ds_shape`.)"""
    lname = name.lower()
    return len(getattr(param, "ds_shape", param.shape)) < 2 or "norm" in lname or "embed" in lname or lname.endswith("bias") \
        or "position" in lname or "query_tokens" in lname or ".ln" in lname


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """`module` in eval mode for the block; every submodule's own mode restored after."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes.items():
            m.training = mode


def split_decay(module: nn.Module, prefix: str, weight_decay: float, lr_scale: float = 1.0,
                exclude: Optional[set] = None) -> List[ParamGroup]:
    """Trainable params of `module` as [decay, no-decay] groups (empty groups dropped)."""
    decay = ParamGroup(f"{prefix}", lr_scale=lr_scale, weight_decay=weight_decay)
    nodecay = ParamGroup(f"{prefix}.no_decay", lr_scale=lr_scale, weight_decay=0.0)
    for name, p in module.named_parameters():
        if not p.requires_grad or (exclude and id(p) in exclude):
            continue
        (nodecay if no_decay(name, p) else decay).params.append(p)
    return [g for g in (decay, nodecay) if g.params]


class Task(ABC):
    """Base class of the training tasks (recon, gen, ...)."""

    name: str = ""

    def __init__(self, cfg):
        self.cfg = cfg

    # -- building -------------------------------------------------------------------
    @abstractmethod
    def build_modules(self) -> Dict[str, nn.Module]:
        """One module per engine, in phase order; `MAIN` first. Built from config only
        (it may run on the meta device or under deepspeed.zero.Init). Frozen parts live
        inside these modules with requires_grad=False (they get no optimizer state)."""

    def check_inputs(self) -> None:
        """Check the files the config names (pretrained weights...) before any process
        group exists; raise ConfigError with one line. Not called for a dry run."""

    def load_pretrained(self, modules: Mapping[str, nn.Module]) -> None:
        """Load real weights from the paths in the config (not called for a dry run)."""

    def frozen_sources(self) -> Dict[str, Optional[List[str]]]:
        """Where the frozen weights come from, from the config alone: {label (the config key):
        the files or weight directories `load_pretrained` / `init_from` read them from}. A
        checkpoint holds only what trains; resume and export read these again, and every
        checkpoint records their digests (engine/sources.py), so a changed file is refused.
        None for a frozen part of an engine that has no file (random weights, the tiny flavor
        only): such a run's checkpoints hold every parameter. Frozen networks outside the
        engines (never checkpointed) may be listed too, to have their files checked."""
        return {}

    def after_load(self, modules: Mapping[str, nn.Module]) -> None:
        """Once the weights are in place (fresh, init_from or resumed), on every rank, before
        the first step: checks that need the loaded model (e.g. cache fingerprints)."""

    def param_groups(self, name: str, module: nn.Module) -> List[ParamGroup]:
        """Trainable parameters of engine `name`, grouped by LR multiplier / decay."""
        return split_decay(module, name, self.cfg.optim.weight_decay)

    def engine_lr(self, name: str) -> float:
        return self.cfg.optim.lr

    def engine_first_step(self, name: str) -> int:
        """The first optimizer step at which engine `name` is stepped (see `phases`)."""
        return 0

    def set_train_mode(self, modules: Mapping[str, nn.Module]) -> None:
        """Frozen parts that must stay in eval mode (no dropout / stochastic depth)."""
        for m in modules.values():
            m.train()

    # -- stepping -------------------------------------------------------------------
    def phases(self, step: int) -> List[str]:
        """Engines stepped at optimizer step `step`, in order."""
        return [MAIN]

    @abstractmethod
    def loss(self, phase: str, batch: dict, step: int,
             engines: Mapping[str, nn.Module]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Scalar loss to backpropagate for `phase`, plus the terms to log (detached)."""

    def evaluate(self, engines: Mapping[str, nn.Module], batches) -> Dict[str, float]:
        """Periodic evaluation on held-out batches (the same on every rank); returns the
        metrics to log, named as logged (e.g. "eval/psnr")."""
        return {}

    # -- export ---------------------------------------------------------------------
    def export_components(self, module: nn.Module) -> Dict[str, nn.Module]:
        """Components of the `MAIN` module written by launch/export.py, by name.
        Library classes (transformers / diffusers) are written with save_pretrained."""
        return {MAIN: module}

    def write_export(self, module: nn.Module, out) -> List[str]:
        """Write the `MAIN` module's export into the (new, empty) directory `out`; returns
        the component names written."""
        from unilip_ds.engine.weights import save_component
        comps = self.export_components(module)
        for name, comp in comps.items():
            save_component(comp, out / name)
        return sorted(comps)

    def samples(self, engines: Mapping[str, nn.Module], step: int, eval_batches) -> Dict[str, object]:
        """Images to write and log every train.sample_every steps ({name: PIL image}); runs
        on every rank (the same forwards, for ZeRO-3)."""
        return {}

    def init_from(self, modules: Mapping[str, nn.Module], path: str) -> None:
        """Weights-only start from a previous stage's export (`model.init_from`)."""
        from pathlib import Path
        from unilip_ds.engine.weights import load_component
        for name, comp in self.export_components(modules[MAIN]).items():
            load_component(comp, Path(path) / name)

    def components(self, modules: Mapping[str, nn.Module]) -> Dict[str, nn.Module]:
        """Named components for parameter counts (dry run)."""
        return dict(modules)

    def outside_engines(self, modules: Mapping[str, nn.Module]) -> Dict[str, nn.Module]:
        """Frozen networks the task holds outside every engine, in fp32 on every GPU (dry run)."""
        return {}


_REGISTRY: Dict[str, type] = {}


def register(cls):
    _REGISTRY[cls.name] = cls
    return cls


def build_task(cfg) -> Task:
    # import here so the registry fills without import cycles
    from unilip_ds import tasks as _  # noqa: F401
    if cfg.run.task not in _REGISTRY:
        from unilip_ds.config import ConfigError
        raise ConfigError(f"config key 'run.task': unknown task '{cfg.run.task}' "
                          f"(known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[cfg.run.task](cfg)
