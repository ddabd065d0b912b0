#!/usr/bin/env bash
# Pretrain on several nodes with torchrun's rendezvous. Run the same command on every node:
#   NNODES=4 HEAD=node0.example:29500 scripts/multinode.sh configs/roberta-medium.toml [--key=value …]
# The flags reach `mlm pretrain` unchanged, so an engine is chosen the same way, e.g.
#   NNODES=4 HEAD=node0.example:29500 scripts/multinode.sh configs/roberta-medium.toml \
#     --system.strategy=deepspeed --system.deepspeed_config=configs/deepspeed/zero2.json
# On SLURM use scripts/slurm/pretrain.sbatch instead: it also checkpoints and requeues before the time limit.
# Each node starts one process per GPU; the global batch stays train.global_batch whatever the node count.
set -euo pipefail
: "${NNODES:?set NNODES to the number of nodes}"
: "${HEAD:?set HEAD to host:port of the first node}"
GPUS_PER_NODE="${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}"
exec torchrun --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$HEAD" --rdzv_id="${RDZV_ID:-mlm}" \
  -m mlm pretrain "$@"
