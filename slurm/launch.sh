#!/usr/bin/env bash
# One launcher for every stage's sbatch template (slurm/train_<stage>.sh):
#
#   exec slurm/launch.sh STAGE [launch/train.py options and key=value overrides...]
#
# It runs twice per job:
#   batch role (the sbatch shell, first node): derives the rendezvous (MASTER_ADDR = first
#     host of the allocation, MASTER_PORT from the job id), starts this script once per node
#     with srun, forwards the time-limit warning (--signal=B:USR1@N) to the training
#     processes and, once they have checkpointed and exited 0, requeues the job; the next
#     run resumes from run.output_dir by itself.
#   node role (UNILIP_SLURM_ROLE=node, under srun on every node): counts this node's GPUs,
#     sets the environment and execs torchrun with a static rendezvous
#     (--nnodes/--node_rank/--master_addr).
#
# Environment knobs (all optional; sbatch exports the submitting shell's environment):
#   UNILIP_ROOT      repository root (default: the directory sbatch was run from)
#   UNILIP_PYTHON    interpreter with torch + unilip_ds (default: $UNILIP_ROOT/.venv/bin/python
#                    if present, else python3)
#   NPROC_PER_NODE   training processes per node; default: GPUs on the node, 1 without GPUs
#                    (a cluster without GPUs: sbatch --gpus-per-node=0 overrides the templates'
#                    --gpus-per-node=8, which such a cluster refuses as an invalid gres request)
#   MASTER_PORT      rendezvous port (default: 20000 + a hash of job id and restart count)
#   OMP_NUM_THREADS  default: CPUs on the node / processes per node
#   UNILIP_ENTRY     the script torchrun starts (default launch/train.py; the cache template
#                    sets data_prep/cache_features.py, which takes the same --config STAGE)
#   UNILIP_MAX_RESTARTS  torchrun --max-restarts (default 0): after a rank dies, restart this
#                    node's workers in place this many times; they resume from the last
#                    checkpoint (on several nodes the others' ranks fail their next
#                    collective, within dist.timeout_s, and restart too)
set -euo pipefail

die() { echo "slurm/launch.sh: error: $*" >&2; exit 2; }
say() { echo "[launch.sh $(date '+%F %T') ${SLURMD_NODENAME:-$(hostname -s)}] $*"; }

[[ -n "${SLURM_JOB_ID:-}" ]] || die "not inside a Slurm job; submit a template: sbatch slurm/train_<stage>.sh"
[[ $# -ge 1 ]] || die "usage: launch.sh STAGE [overrides...]"

ROOT="${UNILIP_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
[[ -f "$ROOT/launch/train.py" ]] ||
    die "no launch/train.py under '$ROOT': run sbatch from the repository root or set UNILIP_ROOT"
cd "$ROOT"
SELF="$ROOT/slurm/launch.sh"
STAGE="$1"
shift

# ------------------------------------------------------------------ node role (under srun)
if [[ "${UNILIP_SLURM_ROLE:-}" == node ]]; then
    if [[ -n "${UNILIP_PYTHON:-}" ]]; then PY="$UNILIP_PYTHON"
    elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
    else PY=python3; fi

    # GPUs Slurm gave this node; without GRES accounting, what the node shows us
    gpus="${SLURM_GPUS_ON_NODE:-}"
    if [[ -z "$gpus" ]]; then
        if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "$CUDA_VISIBLE_DEVICES" != NoDevFiles ]]; then
            gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . || true)
        elif command -v nvidia-smi >/dev/null 2>&1; then
            gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        fi
    fi
    gpus="${gpus:-0}"
    if [[ -n "${NPROC_PER_NODE:-}" ]]; then nproc="$NPROC_PER_NODE"
    elif (( gpus > 0 )); then nproc="$gpus"
    else nproc=1; fi
    [[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE must be a positive integer, got '$nproc'"
    restarts="${UNILIP_MAX_RESTARTS:-0}"
    [[ "$restarts" =~ ^[0-9]+$ ]] || die "UNILIP_MAX_RESTARTS must be an integer >= 0, got '$restarts'"

    cpus="${SLURM_CPUS_ON_NODE:-$(nproc)}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cpus / nproc > 0 ? cpus / nproc : 1 ))}"
    # DeepSpeed JIT-builds ops once; a cache on the shared filesystem saves it on every node
    export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"
    export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
    export PYTHONUNBUFFERED=1
    if (( gpus > 0 )); then
        export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
        # a rank that dies must fail the collective rather than hang the others
        export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    else
        export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
    fi

    say "node ${SLURM_NODEID}/${SLURM_JOB_NUM_NODES}: ${nproc} processes (${gpus} GPUs," \
        "OMP_NUM_THREADS=${OMP_NUM_THREADS}), master ${MASTER_ADDR}:${MASTER_PORT}"
    # Slurm signals every process of the step. torchrun must survive the USR1 that is meant
    # for the trainers (its default action is to exit); an ignored signal stays ignored
    # across exec, and the trainer installs its own handler.
    trap '' USR1
    exec "$PY" -m torch.distributed.run \
        --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$nproc" --node_rank "$SLURM_NODEID" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --max_restarts "$restarts" \
        "${UNILIP_ENTRY:-launch/train.py}" --config "$STAGE" "$@"
fi

# ------------------------------------------------------------------ batch role (sbatch shell)
command -v srun >/dev/null || die "srun not found"
nnodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
# same job id after a requeue: the restart count moves the port off the last run's sockets
MASTER_PORT="${MASTER_PORT:-$(( 20000 + (SLURM_JOB_ID * 7 + ${SLURM_RESTART_COUNT:-0} * 101) % 20000 ))}"
export MASTER_ADDR MASTER_PORT UNILIP_ROOT="$ROOT" UNILIP_SLURM_ROLE=node

say "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-?}) stage ${STAGE}, restart ${SLURM_RESTART_COUNT:-0}," \
    "${nnodes} node(s): ${SLURM_JOB_NODELIST}"

signalled=""
srun_pid=""
on_signal() {
    signalled="$1"
    say "got SIG$1: asking the trainers to checkpoint and stop"
    # srun forwards it to every task on every node (slurmstepd signals the whole step)
    [[ -n "$srun_pid" ]] && kill -s "$1" "$srun_pid" 2>/dev/null || true
}
trap 'on_signal USR1' USR1

srun --nodes "$nnodes" --ntasks "$nnodes" --ntasks-per-node 1 \
    --cpus-per-task "${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1 \
    "$SELF" "$STAGE" "$@" &
srun_pid=$!

# `wait` returns early (status > 128) whenever a trapped signal arrives: wait again
rc=0
wait "$srun_pid" || rc=$?
while (( rc > 128 )) && kill -0 "$srun_pid" 2>/dev/null; do
    rc=0
    wait "$srun_pid" || rc=$?
done

if [[ -n "$signalled" ]]; then
    if (( rc == 0 )); then
        say "trainers checkpointed after SIG${signalled}; requeueing job ${SLURM_JOB_ID}"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    say "trainers exited with ${rc} after SIG${signalled}; not requeueing"
fi
say "training exited with ${rc}"
exit "$rc"
