"""Non-finite losses and gradients, and the optimizer settings a run applies after loading.

A step is skipped through DeepSpeed's own overflow path (ZeRO stages 1-3, fp32 and bf16):
when the global gradient norm is not finite, every rank's optimizer drops the step and its
gradients and the engine does not advance the LR schedule. The norm is all-reduced, so all
ranks agree. A rank whose loss is not finite multiplies it by NaN before backward, which
makes its gradients (and through the reduction everyone's) NaN, so a NaN loss always takes
that path, even one whose gradients alone would be finite.

After `train.max_nonfinite_in_a_row` skipped steps in a row, `train.on_nonfinite` decides:
skip (go on), rollback (reload the last checkpoint, LR x `train.rollback_lr_scale`, the
data stream goes on with new batches) or stop (NonFiniteError).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping

import torch

log = logging.getLogger("unilip_ds")

# optimizer settings the config defines; a run re-applies them after loading a checkpoint
# (whose optimizer and scheduler states carry the values of the run that saved it)
GROUP_KEYS = ("betas", "eps", "weight_decay")
SCHEDULE_KEYS = ("optim.lr", "optim.min_lr", "optim.warmup_steps", "optim.betas", "optim.eps",
                 "optim.weight_decay", "train.max_steps")


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row, and train.on_nonfinite does not continue."""


def guard_loss(loss: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(loss to back-propagate, whether it was finite). One host sync per call."""
    finite = bool(torch.isfinite(loss.detach()).all())
    return (loss if finite else loss * float("nan")), finite


class _InfiniteGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def infinite_grads(loss: torch.Tensor) -> torch.Tensor:
    """The same (finite) loss, whose backward gives infinite / NaN gradients (fault injection:
    train.test_inf_grad_batches). The skip must come from the gradient norm, not the loss."""
    return _InfiniteGrads.apply(loss)


def skipped_steps(engine: Any) -> int:
    return int(getattr(engine, "skipped_steps", 0))


def _groups(engine: Any) -> List[dict]:
    """The param groups the LR schedule steps (DeepSpeed builds it on the torch optimizer)."""
    return getattr(engine.lr_scheduler, "optimizer", engine.optimizer).param_groups


def capture_settings(engines: Mapping[str, Any]) -> Dict[str, List[dict]]:
    """This config's optimizer settings per engine and param group (call before loading)."""
    out = {}
    for name, e in engines.items():
        sched = e.lr_scheduler
        bases = getattr(sched, "base_lrs", None) or [g["lr"] for g in _groups(e)]
        out[name] = [{"base_lr": b, **{k: g[k] for k in GROUP_KEYS if k in g}}
                     for b, g in zip(bases, _groups(e))]
    return out


def apply_settings(engines: Mapping[str, Any], settings: Dict[str, List[dict]], lr_scale: float) -> None:
    """Put this config's settings (base LR x lr_scale, betas, eps, weight decay) into the
    loaded optimizers and schedules; the current LR follows the schedule's position."""
    for name, e in engines.items():
        sched, groups = e.lr_scheduler, _groups(e)
        if not hasattr(sched, "lr_lambdas"):
            raise NonFiniteError(f"engine '{name}': the LR schedule of the DeepSpeed JSON cannot be "
                                 "rescaled; remove 'scheduler' from the JSON (the config defines it)")
        sched.base_lrs = [s["base_lr"] * lr_scale for s in settings[name]]
        for g, s, lam, base in zip(groups, settings[name], sched.lr_lambdas, sched.base_lrs):
            g.update({k: s[k] for k in GROUP_KEYS if k in s})
            g["lr"] = base * lam(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in groups]


def changed_settings(saved_cfg: Dict[str, Any], cfg_dict: Dict[str, Any]) -> List[str]:
    """'key old -> new' for each schedule / optimizer setting that differs from the run that
    wrote the checkpoint."""
    out = []
    for key in SCHEDULE_KEYS:
        a, b = saved_cfg, cfg_dict
        for part in key.split("."):
            a, b = (a or {}).get(part), (b or {}).get(part)
        if a != b:
            out.append(f"{key} {a} -> {b}")
    return out


class NonFiniteTracker:
    """Counts skipped steps (total and in a row) and says what to do after one."""

    def __init__(self, cfg):
        self.policy = cfg.train.on_nonfinite
        self.limit = cfg.train.max_nonfinite_in_a_row
        self.total = 0
        self.in_a_row = 0

    def record(self, skipped: bool) -> str:
        """'ok', 'skipped', or the policy's action when the limit is reached."""
        if not skipped:
            self.in_a_row = 0
            return "ok"
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row < self.limit or self.policy == "skip":
            return "skipped"
        return self.policy
