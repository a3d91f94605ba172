#!/usr/bin/env bash
# Wheels for running benchmarks/gpu_check.sh on a CUDA machine that has its own torch but no
# package index (an offline compute node, a lent GPU box): the project's pinned libraries that
# such images lack, and what they need beyond a typical CUDA + PyTorch image, at the versions
# this checkout's .venv runs its tests with. DeepSpeed publishes only a source archive, so its
# wheel is built here (pure Python: its ops are JIT-built on first use). Run here, carry the
# folder, then on the GPU machine (any torch >= 2.4, the Python version given here):
#
#   bash benchmarks/gpu_wheels.sh [.whl] [3.12]
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site SKIP_FLASH_INSTALL=1 PYTHON=python3 bash benchmarks/gpu_check.sh --out gpu_check_out
#
# About 30 MB. Checked on CPU with a Python 3.12 venv holding torch 2.11 and the H200 image's
# versions of the rest (`gpu_check.sh --device cpu`, every step ok). flash-attn is not among
# them: PyPI has no flash-attn wheels (source only, a 15-30 minute compile), so without
# network the flash steps are skipped and gpu_check's sdpa_vs_fp32 runs in their place.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.whl}
PYVER=${2:-3.12}
PY=.venv/bin/python
[ -x "$PY" ] || { echo "error: $PY missing: run 'make venv' first (its versions are the ones carried)" >&2; exit 2; }

# the pins of requirements.txt, then what they need beyond a CUDA + PyTorch image
PINNED="transformers diffusers huggingface_hub omegaconf webdataset torchdata braceexpand"
NEEDED="tokenizers httpx2 httpcore2 truststore importlib_metadata lazy-importer hjson pydantic pydantic_core
annotated-types typing-inspection typing_extensions platformdirs sniffio distro click regex"
specs=$("$PY" - $PINNED $NEEDED <<'EOF'
import sys
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))
EOF
)
mkdir -p "$OUT"
plat=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    plat="$plat --platform $p"
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp $plat \
    -d "$OUT" $specs
DS=$("$PY" -c "from importlib.metadata import version; print(version('deepspeed'))")
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "deepspeed==$DS"
echo "$(ls "$OUT"/*.whl | wc -l) wheels in $OUT ($(du -sh "$OUT" | cut -f1)) for Python $PYVER"
