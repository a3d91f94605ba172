#!/bin/bash
# UniLIP reconstruction stage 1 (224 px): 1 node x 8 GPUs x micro-batch 8 = global batch 64.
# Needs model.internvl_path, model.dcae_path, the perceptual weights and data.train.urls.
#   sbatch slurm/train_recon_stage1.sh [launch/train.py options] [key=value overrides]
# Submit from the repository root; site options (--partition, --account) go on the sbatch line.
# Without GPUs (a CPU cluster or slurm/test_cluster.sh): sbatch --gpus-per-node=0 [--nodes=1], and
# NPROC_PER_NODE=<training processes per node> in the environment (default 1 without GPUs).
#SBATCH --job-name=recon_stage1
#SBATCH --nodes=1 --ntasks-per-node=1 --gpus-per-node=8 --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@120 --requeue --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
exec "${UNILIP_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" recon_stage1 "$@"
