#!/usr/bin/env bash
# One GPU, one call: the GPU tests, a short throughput measurement of the medium recipe, then the same short
# run under each engine (ddp, fsdp, deepspeed), one line each: tokens/s and peak memory.
#   scripts/gpu_check.sh [OUT_DIR]
#   GPU_CHECK_CPU=1 scripts/gpu_check.sh [OUT_DIR]   # the same logic on a CPU: tiny model, no GPU tests
# Prints tokens/s for RoBERTa-medium at sequence length 512 (bf16, compiled) on the embedded corpus.
# The GPU machine has no internet: without deepspeed there, it is installed from wheels in ${WHEELS:-.whl},
# made beforehand on a machine with internet (deepspeed's own deps, torch and numpy aside, are small):
#   pip wheel --no-deps deepspeed -w .whl
#   pip wheel hjson ninja py-cpuinfo msgpack psutil pydantic einops packaging tqdm -w .whl
# (with the GPU machine's Python version: pydantic-core, ninja, msgpack and psutil are compiled wheels).
# Without them the deepspeed run is skipped, and the other engines still run.
set -euo pipefail
OUT="${1:-${OUT:-/tmp/mlm-gpu-check}}"
WHEELS="${WHEELS:-.whl}"
mkdir -p "$OUT"
# The shortened run: the recipe's model and data, few steps, no evaluation, nothing but metrics.jsonl.
common=(--run.checkpoint_every=1000 --eval.every=0 --run.progress=false)
if [[ ${GPU_CHECK_CPU:-0} == 1 ]]; then
  # A CPU can't run the medium model in reasonable time; one thread keeps the ranks from oversubscribing.
  export OMP_NUM_THREADS=1
  vocab=2000
  short=(--system.device=cpu --system.precision=fp32 --model.size=tiny --data.seq_len=128 --model.max_positions=128
    --train.steps=4 --train.warmup_steps=1 --train.global_batch=16 --system.micro_batch=8 --run.log_every=2)
  ds_accelerator=cpu
else
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
  vocab=32000
  short=(--system.precision=bf16
    --train.steps=30 --train.warmup_steps=5 --train.global_batch=256 --system.micro_batch=64 --run.log_every=10)
  # DeepSpeed guesses its accelerator at import; say it rather than rely on the guess.
  ds_accelerator=cuda
fi
mlm tokenizer --corpus demo --vocab-size "$vocab" --out "$OUT/tok"
mlm prepare --corpus demo --tokenizer "$OUT/tok" --out "$OUT/data" --overwrite
rm -rf "$OUT/run"
mlm pretrain configs/roberta-medium.toml --data.data_dir="$OUT/data" --run.out_dir="$OUT/run" \
  "${short[@]}" "${common[@]}" 2>&1 | tee "$OUT/pretrain.log"
python - "$OUT/run/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l]
print("tokens/s per logging window (the first includes compilation):", [round(r["tokens_per_s"]) for r in rows])
PY

# Engines: the same short run under torchrun (one rank), each in its own run folder.
have_deepspeed() {
  DS_ACCELERATOR=$ds_accelerator python -c "import deepspeed" >/dev/null 2>&1 && return 0
  compgen -G "$WHEELS/deepspeed-*.whl" >/dev/null || return 1
  python -m pip install --quiet --no-index --find-links "$WHEELS" deepspeed &&
    DS_ACCELERATOR=$ds_accelerator python -c "import deepspeed" >/dev/null 2>&1
}
summary=()
failed=0
for engine in ddp fsdp deepspeed; do
  envs=()
  extra=()
  if [[ $engine == deepspeed ]]; then
    if ! have_deepspeed; then
      if compgen -G "$WHEELS/deepspeed-*.whl" >/dev/null; then
        summary+=("deepspeed: skipped (installing from $WHEELS failed, or deepspeed does not import)")
      else
        summary+=("deepspeed: skipped (not installed, no wheel in $WHEELS)")
      fi
      continue
    fi
    ds_config=configs/deepspeed/zero2.json
    if [[ ${GPU_CHECK_CPU:-0} == 1 ]]; then
      # fp32 on a CPU: the reference file with bf16 turned off.
      ds_config="$OUT/zero2-fp32.json"
      python - configs/deepspeed/zero2.json "$ds_config" <<'PY'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg.setdefault("bf16", {})["enabled"] = False
json.dump(cfg, open(sys.argv[2], "w"), indent=2)
PY
    fi
    envs=(DS_ACCELERATOR="$ds_accelerator")
    extra=(--system.deepspeed_config="$ds_config")
  fi
  rm -rf "$OUT/run-$engine"
  # A failing engine is reported and the others still run; the script then exits 1.
  if ! env "${envs[@]}" torchrun --standalone --nproc_per_node=1 -m mlm pretrain configs/roberta-medium.toml \
    --data.data_dir="$OUT/data" --run.out_dir="$OUT/run-$engine" "${short[@]}" "${common[@]}" \
    --system.strategy="$engine" "${extra[@]}" 2>&1 | tee "$OUT/pretrain-$engine.log"; then
    summary+=("$engine: FAILED (see $OUT/pretrain-$engine.log)")
    failed=1
    continue
  fi
  line=$(python - "$engine" "$OUT/run-$engine/metrics.jsonl" <<'PY'
import json, sys
engine, path = sys.argv[1:]
rows = [json.loads(l) for l in open(path) if '"tokens_per_s"' in l]
peaks = [r["peak_memory_gb"] for r in rows if "peak_memory_gb" in r]
peak = f"{max(peaks):.2f} GB" if peaks else "n/a (not CUDA)"
print(f"{engine}: {rows[-1]['tokens_per_s']:.0f} tokens/s (last logging window), peak memory {peak}")
PY
) || line="$engine: no tokens_per_s in $OUT/run-$engine/metrics.jsonl"
  summary+=("$line")
done
echo "engines (one rank each, the short run above):"
printf '  %s\n' "${summary[@]}"
exit "$failed"
