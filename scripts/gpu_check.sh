#!/usr/bin/env bash
# One GPU, one call: the GPU tests, then a short throughput measurement of the medium recipe.
#   scripts/gpu_check.sh [OUT_DIR]
# Prints tokens/s for RoBERTa-medium at sequence length 512 (bf16, compiled) on the embedded corpus.
set -euo pipefail
OUT="${1:-${OUT:-/tmp/mlm-gpu-check}}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
mlm tokenizer --corpus demo --vocab-size 32000 --out "$OUT/tok"
mlm prepare --corpus demo --tokenizer "$OUT/tok" --out "$OUT/data" --overwrite
rm -rf "$OUT/run"
mlm pretrain configs/roberta-medium.toml --data.data_dir="$OUT/data" --run.out_dir="$OUT/run" \
  --train.steps=30 --train.warmup_steps=5 --train.global_batch=256 --system.micro_batch=64 \
  --run.log_every=10 --run.checkpoint_every=1000 --eval.every=0 --run.progress=false 2>&1 | tee "$OUT/pretrain.log"
python - "$OUT/run/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l]
print("tokens/s per logging window (the first includes compilation):", [round(r["tokens_per_s"]) for r in rows])
PY
