"""Suite-wide setup. The one-time costs (library imports, DeepSpeed's JIT build of its CPU
comm op, cached in TORCH_EXTENSIONS_DIR) are paid here, once, and printed in the header.

`make test` runs the suite on 2 pytest-xdist workers, a whole file per worker (`--dist
loadfile`: a file's module fixtures, e.g. a trained chain, are built once): most tests wait on
subprocesses (launcher start-up, gloo, the Slurm scheduler) for a large part of their time,
which the other worker fills. Files that share one system resource stay in one file (the
Slurm cluster: tests/test_slurm.py)."""

import os
import time
from pathlib import Path

pytest_plugins = ["tests.fixtures_data", "tests.fixtures_gen"]

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# the files that take longest, first: under loadfile a worker takes the next file in
# collection order, so a long file collected last would run alone at the end
# (measured one by one; the rest take < 35 s each)
LONG_FILES_FIRST = ("test_fault_tolerance", "test_gen_stages", "test_recon_stages", "test_slurm",
                    "test_training", "test_elastic", "test_cache_train", "test_eval_recon", "test_cache_build",
                    "test_lean_checkpoints", "test_tracking", "test_convert_gen", "test_edit_learns")


def pytest_collection_modifyitems(config, items):
    first = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: first.get(Path(str(item.fspath)).stem, len(first)))  # stable


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # in-process tests take this worker's share of the cores, as ranks do
        import torch
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


def pytest_report_header(config):
    t0 = time.time()
    import deepspeed  # noqa: F401
    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    t1 = time.time()
    from deepspeed.accelerator import get_accelerator
    line = ""
    if get_accelerator().device_name() == "cpu":
        cached = any(Path(os.environ["TORCH_EXTENSIONS_DIR"]).glob("**/deepspeed_shm_comm*.so"))
        get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)
        line = (f"; DeepSpeed CPU comm op {'loaded from cache' if cached else 'built'} in "
                f"{time.time() - t1:.1f}s ({os.environ['TORCH_EXTENSIONS_DIR']})")
    return f"startup: deepspeed + transformers + diffusers imports {t1 - t0:.1f}s{line}"
