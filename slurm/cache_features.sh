#!/bin/bash
# Cache of the generator's frozen outputs (data_prep/cache_features.py) for one source, 1 node x
# 8 GPUs; every rank takes its own shards. The first argument is the gen stage the cache is for:
#   sbatch slurm/cache_features.sh gen_stage2 --task t2i --src 's3://b/blip3o/' --dst s3://b/cache/blip3o \
#       --what latents model.init_from=<gen_stage1 export>
# A re-submission resumes: finished shards are verified and skipped.
# Without GPUs: sbatch --gpus-per-node=0, and NPROC_PER_NODE=<processes per node> in the environment.
#SBATCH --job-name=cache_features
#SBATCH --nodes=1 --ntasks-per-node=1 --gpus-per-node=8 --exclusive
#SBATCH --time=24:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
export UNILIP_ENTRY=data_prep/cache_features.py
exec "${UNILIP_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" "$@"
