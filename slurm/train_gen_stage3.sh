#!/bin/bash
# UniLIP generator stage 3 (SFT: as stage 2 on the SFT sets, T2I x1, edit x3).
# 2 nodes x 8 GPUs x micro-batch 32 = global batch 512, as the reference (--nodes to change it).
# Start from stage 2: model.init_from=<export of gen_stage2>, and give the SFT sources' shards:
#   'data.train.sources=[{name: blip3o_60k, task: t2i, urls: [s3://b/blip3o_60k/manifest.json]},
#                        {name: sharegpt4o_t2i, task: t2i, urls: [s3://b/sharegpt4o_t2i/manifest.json]},
#                        {name: sharegpt4o_edit, task: edit, repeats: 3, urls: [s3://b/sharegpt4o_edit/manifest.json]}]'
#   (the preset's data.train.mix=samples: shares = sample count x repeats, from the data_prep manifests)
#   sbatch slurm/train_gen_stage3.sh [launch/train.py options] [key=value overrides]
# Submit from the repository root; site options (--partition, --account) go on the sbatch line.
# Without GPUs (a CPU cluster or slurm/test_cluster.sh): sbatch --gpus-per-node=0 [--nodes=1], and
# NPROC_PER_NODE=<training processes per node> in the environment (default 1 without GPUs).
#SBATCH --job-name=gen_stage3
#SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@120 --requeue --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
exec "${UNILIP_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" gen_stage3 "$@"
