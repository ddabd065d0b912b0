#!/usr/bin/env bash
# SLURM: one torchrun per node, the first node of the allocation as rendezvous host.
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=1 scripts/slurm.sh configs/roberta-medium.toml
#SBATCH --job-name=mlm-pretrain
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
GPUS_PER_NODE="${SLURM_GPUS_ON_NODE:-8}"
srun torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$HEAD_NODE:29500" --rdzv_id="$SLURM_JOB_ID" \
  -m mlm pretrain "$@" --resume=auto
