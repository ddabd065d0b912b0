#!/usr/bin/env bash
# Pretrain on several nodes with torchrun's rendezvous, through `mlm launch` (torchrun with one-line failures). Run the same command on every node:
#   NNODES=4 HEAD=node0.example:29500 scripts/multinode.sh configs/roberta-medium.toml [--key=value …]
# The flags reach `mlm pretrain` unchanged, so an engine is chosen the same way, e.g.
#   NNODES=4 HEAD=node0.example:29500 scripts/multinode.sh configs/roberta-medium.toml \
#     --system.strategy=deepspeed --system.deepspeed_config=configs/deepspeed/zero2.json
# On SLURM use scripts/slurm/pretrain.sbatch instead: it also checkpoints and requeues before the time limit.
# Each node starts one process per GPU (GPUS_PER_NODE, default: the GPUs torch sees, or 1 process on a CPU
# node); the global batch stays train.global_batch whatever the node count. HEAD's port is any free port
# on the first node. data.data_dir and run.out_dir must be on a filesystem every node sees.
set -euo pipefail
: "${NNODES:?set NNODES to the number of nodes}"
: "${HEAD:?set HEAD to host:port of the first node}"
GPUS_PER_NODE="${GPUS_PER_NODE:-$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}"
exec python -m mlm launch --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$HEAD" --rdzv_id="${RDZV_ID:-mlm}" \
  pretrain "$@"
