"""Suite-wide setup. The one-time costs (library imports, DeepSpeed's JIT build of its CPU
comm op, cached in TORCH_EXTENSIONS_DIR) are paid here, once, and printed in the header."""

import os
import time
from pathlib import Path

pytest_plugins = ["tests.fixtures_data", "tests.fixtures_gen"]

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
