"""Process-group setup for every way a user starts a run.

`python launch/train.py` (no launcher), `torchrun` and the `deepspeed` launcher all end up
here with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* in the environment; we fill them for
the launcher-less case so DeepSpeed never tries MPI discovery.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time

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


class CollectiveError(RuntimeError):
    """A collective failed: a peer died, or it did not answer within dist.timeout_s."""


def init(timeout_s: float = 1800) -> None:
    """NCCL on CUDA, gloo on CPU; idempotent. Every collective (ours and DeepSpeed's) fails
    after `timeout_s` instead of waiting forever for a stalled rank."""
    import deepspeed
    import deepspeed.comm as dscomm

    ensure_env()
    if dscomm.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _attempt_store(timeout)
    if store is not None:  # DeepSpeed takes over a process group that exists
        import torch.distributed as tdist
        extra = {"device_id": torch.device("cuda", local_rank())} \
            if torch.cuda.is_available() and world_size() > 1 else {}
        tdist.init_process_group(backend, store=store, rank=rank(), world_size=world_size(),
                                 timeout=timeout, **extra)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)


def _attempt_store(timeout: datetime.timedelta):
    """Under torchrun the workers share the agent's store, which outlives a restart
    (--max-restarts): the restarted workers would read the dead ones' keys (addresses of
    sub-groups) and wait on them forever. A prefix per attempt keeps each attempt's apart."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed import PrefixStore, TCPStore
    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size(),
                     is_master=False, timeout=timeout)
    return PrefixStore(f"unilip/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


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



def is_collective_failure(exc: BaseException) -> bool:
    """The backends' errors for a dead or stalled peer (gloo raises RuntimeError with its
    source path in the message, NCCL a DistBackendError)."""
    import torch.distributed as tdist
    if isinstance(exc, getattr(tdist, "DistError", ())):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("gloo/transport" in msg or "Timed out" in msg)


class Watchdog:
    """Ends this process (exit 3) when the loop makes no progress for `timeout_s` (plus a
    margin): covers hangs no process-group timeout reports (DeepSpeed's shared-memory
    all-reduce on CPU has none; NCCL's watchdog aborts without naming our step; a stuck
    read). `beat(where)` marks progress; the message names the last `where`."""

    def __init__(self, timeout_s: float, exit_code: int = 3):
        self.timeout_s, self.exit_code = timeout_s, exit_code
        self.where, self.last = "start", time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="unilip-watchdog", daemon=True)
        self._thread.start()

    def beat(self, where: str) -> None:
        self.where, self.last = where, time.monotonic()

    def _run(self) -> None:
        # a margin past the collective timeout, so a backend's own error (which names the
        # failed call) is reported first where it can be
        limit = self.timeout_s + max(5.0, 0.1 * self.timeout_s)
        while not self._stop.wait(1.0):
            if time.monotonic() - self.last > limit:
                logging.getLogger("unilip_ds").error(
                    f"error: rank {rank()}: {self.where}: no progress for {limit:.0f}s (dist.timeout_s="
                    f"{self.timeout_s:g}: a rank died or stalled, or a collective hangs); exiting")
                logging.shutdown()
                os._exit(self.exit_code)

    def close(self) -> None:
        self._stop.set()


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
