#!/bin/bash
# UniLIP generator stage 1 (queries + connector + projector; DiT frozen; DC-AE targets, 512 px).
# 2 nodes x 8 GPUs x micro-batch 32 = global batch 512, as the reference (--nodes to change it).
# Needs model.internvl_path, model.unilip_path (a recon export), model.sana_path,
# model.dcae_path and the T2I shards data.train.urls.
#   sbatch slurm/train_gen_stage1.sh [launch/train.py options] [key=value overrides]
# Submit from the repository root; site options (--partition, --account) go on the sbatch line.
# Without GPUs (a CPU cluster or slurm/test_cluster.sh): sbatch --gpus-per-node=0 [--nodes=1], and
# NPROC_PER_NODE=<training processes per node> in the environment (default 1 without GPUs).
#SBATCH --job-name=gen_stage1
#SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@120 --requeue --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
exec "${UNILIP_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" gen_stage1 "$@"
