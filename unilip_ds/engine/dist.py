"""Process-group setup for every way a user starts a run.

`python launch/train.py` (no launcher), `torchrun` and the `deepspeed` launcher all end up
here with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* in the environment; we fill them for
the launcher-less case so DeepSpeed never tries MPI discovery.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_env() -> None:
    """World size 1 without a launcher: no env vars needed."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def init(timeout_minutes: int = 30) -> None:
    """NCCL on CUDA, gloo on CPU; idempotent."""
    import deepspeed
    import deepspeed.comm as dscomm

    ensure_env()
    if dscomm.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=datetime.timedelta(minutes=timeout_minutes))


def barrier() -> None:
    import torch.distributed as tdist
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def all_reduce(values: list[float]) -> list[float]:
    """Sum of a few scalars across ranks: logging, counters, agreeing on a stop."""
    import torch.distributed as tdist
    if not (tdist.is_available() and tdist.is_initialized()) or world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device())
    tdist.all_reduce(t)
    return t.tolist()


def set_torch_threads(requested: int, data_workers: int) -> int:
    """Set torch's intra-op thread count the same way under every launcher: `requested` if
    > 0, else the cores available to this process's share of the node (cores / local ranks)
    minus one per data worker (each decodes on a core), at least 1. Returns the count."""
    if requested > 0:
        n = requested
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        n = max(1, cores // local - data_workers)
    torch.set_num_threads(n)
    return n
