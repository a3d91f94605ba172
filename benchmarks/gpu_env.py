"""The machine a device check ran on, as one JSON line: torch / CUDA / cuDNN / NCCL versions,
the devices (name, memory, capability), the dense bf16 peak the project's table gives the first
one (unilip_ds.tracking.PEAK_TFLOPS), whether flash_attn imports (and its version or error),
transformers / diffusers / deepspeed versions, the driver from nvidia-smi, and the bf16 matrix
rate this card reaches (8192^3 products on random data, median of 10 timed with CUDA events
after 3 warm-ups): the ceiling an MFU against the datasheet peak is to be read beside.

    .venv/bin/python benchmarks/gpu_env.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def version(dist: str):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def matmul_tflops(torch, n: int = 8192, warmup: int = 3, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(warmup):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return round(2 * n ** 3 / times[len(times) // 2] / 1e12, 1)


def main() -> int:
    import torch
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "device_count": 0, "devices": []}
    for dist in ("transformers", "diffusers", "deepspeed", "flash-attn"):
        out[dist.replace("-", "_")] = version(dist)
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_varlen_func  # noqa: F401
        out["flash_attn_import"] = "ok"
    except Exception as exc:  # noqa: BLE001 (any import failure: missing, ABI mismatch, no GPU arch)
        out["flash_attn_import"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    if torch.cuda.is_available():
        out["device_count"] = torch.cuda.device_count()
        out["cudnn"] = torch.backends.cudnn.version()
        try:
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001
            out["nccl"] = None
        for i in range(out["device_count"]):
            p = torch.cuda.get_device_properties(i)
            out["devices"].append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2 ** 30, 1),
                                   "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count})
        from unilip_ds.tracking import peak_tflops
        out["peak_tflops_bf16"], out["peak_source"] = peak_tflops(torch.device("cuda", 0), "bf16")
        out["matmul_bf16_tflops"] = matmul_tflops(torch)
        if shutil.which("nvidia-smi"):
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,power.limit,clocks.max.sm,mig.mode.current",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            out["nvidia_smi"] = q.stdout.strip().splitlines() if q.returncode == 0 else q.stderr.strip()[:200]
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
