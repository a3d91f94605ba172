#!/usr/bin/env bash
# Every CUDA check of the project in one command: first flash-attn, installed when it
# does not import (the install command is printed before anything else; it is not part of the
# 8-minute budget), then benchmarks/gpu_check.py, whose steps run in <= 8 minutes on one
# H100 / H200 and write <out>/gpu_check.json + <out>/gpu_check.md. Arguments go to gpu_check.py
# (--out DIR, --only STEP, --dry-run, ...). `make gpu-check` runs this.
#
#   bash benchmarks/gpu_check.sh [--out gpu_check_out] [--only gen_step_sdpa] [--dry-run]
#
# flash-attn publishes prebuilt wheels only for the torch versions of its releases (none for
# torch 2.13, the pinned one): `pip install flash-attn --no-build-isolation` then compiles it
# (needs nvcc of torch's CUDA major version and ninja; 15-30 minutes on 8-16 cores, built here
# for the local GPU's architecture only). Environment:
#   FLASH_ATTN_WHEEL=<path or URL>  install this wheel instead (e.g. one built once elsewhere)
#   SKIP_FLASH_INSTALL=1            do not install: the flash steps are skipped, SDPA only
#   FLASH_INSTALL_TIMEOUT=<s>       give up on the install after this long (default 2400)
#   PYTHON=<interpreter>            default .venv/bin/python
# A failed install is recorded in the report (the log's last lines) and the checks run on SDPA.
set -u
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
OUT=gpu_check_out
DRY=0
CPU=0
prev=""
for a in "$@"; do
    [ "$prev" = "--out" ] && OUT=$a
    [ "$prev" = "--device" ] && [ "$a" = cpu ] && CPU=1
    case "$a" in --out=*) OUT=${a#--out=} ;; --dry-run) DRY=1 ;; --device=cpu) CPU=1 ;; esac
    prev=$a
done

export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

JOBS=$(nproc 2>/dev/null || echo 8)
ARCH=""
if command -v nvidia-smi >/dev/null 2>&1; then
    ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')
fi
if [ -n "${FLASH_ATTN_WHEEL:-}" ]; then
    INSTALL="$PY -m pip install --no-deps $FLASH_ATTN_WHEEL"
else
    INSTALL="MAX_JOBS=$JOBS${ARCH:+ FLASH_ATTN_CUDA_ARCHS=$ARCH} $PY -m pip install flash-attn --no-build-isolation"
fi
echo "flash-attn install command: $INSTALL"

if [ "$DRY" = 1 ]; then
    echo "(dry run: nothing installed; it runs only when 'import flash_attn' fails)"
    exec "$PY" benchmarks/gpu_check.py "$@"
fi

mkdir -p "$OUT"
LOG="$OUT/flash_install.log"
: > "$LOG"
if "$PY" -c "import flash_attn" >/dev/null 2>&1; then
    STATUS="already installed ($("$PY" -c 'import flash_attn; print(flash_attn.__version__)' 2>/dev/null)): not run"
elif [ "$CPU" = 1 ]; then
    STATUS="not run (--device cpu: the flash steps use tests/flash_standin.py)"
elif ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    STATUS="not run: no CUDA device (torch.cuda.is_available() is False)"
elif [ "${SKIP_FLASH_INSTALL:-0}" = 1 ]; then
    STATUS="not run (SKIP_FLASH_INSTALL=1): flash steps skipped, SDPA only"
else
    echo "flash-attn does not import: installing (log: $LOG, timeout ${FLASH_INSTALL_TIMEOUT:-2400} s)"
    t0=$(date +%s)
    timeout "${FLASH_INSTALL_TIMEOUT:-2400}" bash -c "$INSTALL" >"$LOG" 2>&1
    rc=$?
    dt=$(( $(date +%s) - t0 ))
    if "$PY" -c "import flash_attn" >>"$LOG" 2>&1; then
        STATUS="installed in ${dt} s ($("$PY" -c 'import flash_attn; print(flash_attn.__version__)' 2>/dev/null))"
    elif [ "$rc" = 124 ]; then
        STATUS="FAILED: timed out after ${dt} s: flash steps skipped, SDPA only"
    else
        STATUS="FAILED (exit $rc after ${dt} s): flash steps skipped, SDPA only"
    fi
fi
echo "flash-attn: $STATUS"

exec "$PY" benchmarks/gpu_check.py "$@" --flash-install-command "$INSTALL" \
    --flash-install-status "$STATUS" --flash-install-log "$LOG"
