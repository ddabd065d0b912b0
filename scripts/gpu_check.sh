#!/usr/bin/env bash
# One GPU, one call, well inside 8 minutes: the GPU tests, then `mlm bench` rows — the RoBERTa-medium recipe
# (seq 512, dropout 0.1) beside the Hugging Face path (--baseline), BERT-base at seq 128 beside it, and the
# lever table of docs/performance.md (one change from the recipe row each) — and a summary table, last.
#   scripts/gpu_check.sh [--cpu-smoke] [--engines] [OUT_DIR]
#   --cpu-smoke    the same steps on a CPU with a tiny model, to test this script (GPU_CHECK_CPU=1 is the same)
#   --engines      also a short bf16 training run under each engine (ddp, fsdp, deepspeed): tokens/s, memory
# Rows run most important first, each stopped at GPU_CHECK_BUDGET_S seconds (default 450) after the start; a
# row with less than a minute left is listed as skipped, so the whole check stays inside 8 minutes (raise the
# budget for the full lever table: GPU_CHECK_BUDGET_S=1200). No max-autotune compilation.
# The GPU machine has no internet: for --engines without deepspeed there, it is installed from wheels in
# ${WHEELS:-.whl}, made beforehand on a machine with internet (deepspeed's own deps, torch and numpy aside):
#   pip wheel --no-deps deepspeed -w .whl
#   pip wheel hjson ninja py-cpuinfo msgpack psutil pydantic einops packaging tqdm -w .whl
# (with the GPU machine's Python version: pydantic-core, ninja, msgpack and psutil are compiled wheels).
set -euo pipefail
cpu=${GPU_CHECK_CPU:-0}
engines=0
OUT=""
for arg in "$@"; do
  case $arg in
    --cpu-smoke) cpu=1 ;;
    --engines) engines=1 ;;
    -*) echo "error: unknown option $arg (use --cpu-smoke, --engines, OUT_DIR)" >&2; exit 2 ;;
    *) OUT=$arg ;;
  esac
done
OUT="${OUT:-${OUT_DIR:-/tmp/mlm-gpu-check}}"
WHEELS="${WHEELS:-.whl}"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, installed or not
mkdir -p "$OUT"
rm -f "$OUT"/bench-*.json "$OUT"/bench-*.log "$OUT/rows.tsv"
SECONDS=0
failed=0

if [[ $cpu == 1 ]]; then
  # A CPU can't run the medium model in reasonable time: every row shrunk alike (these come last, so they win).
  export OMP_NUM_THREADS=1
  shrink=(--model.size=tiny --data.seq_len=32 --model.max_positions=64 --train.global_batch=64 --system.device=cpu
    --system.compile=off --system.precision=fp32 --steps=1 --warmup=1)
else
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  if ! timeout 240 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py; then
    echo "GPU tests FAILED"
    failed=1
  fi
  shrink=()
fi

# bench_row NAME "WHAT CHANGES" ARGS…: one `mlm bench` run, its JSON in $OUT/bench-NAME.json.
bench_row() {
  local name=$1 what=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if ((left < 60)); then
    printf '%s\t%s\tskipped (GPU_CHECK_BUDGET_S=%s spent)\n' "$name" "$what" "$BUDGET" >>"$OUT/rows.tsv"
    return
  fi
  echo "== bench $name: $what"
  if timeout "$left" python -m mlm bench "$@" "${shrink[@]}" --json 2>&1 | tee "$OUT/bench-$name.log"; then
    grep '^{' "$OUT/bench-$name.log" | tail -n 1 >"$OUT/bench-$name.json"
    printf '%s\t%s\tok\n' "$name" "$what" >>"$OUT/rows.tsv"
  else
    printf '%s\t%s\tFAILED (see %s)\n' "$name" "$what" "$OUT/bench-$name.log" >>"$OUT/rows.tsv"
    failed=1
  fi
}

recipe=(configs/roberta-medium.toml --synthetic --steps=5 --warmup=2 --train.global_batch=512 --system.micro_batch=auto)
bench_row recipe "RoBERTa-medium seq 512, dropout 0.1: all levers (compiled, micro_batch auto)" "${recipe[@]}" --baseline
bench_row bert-base-128 "BERT-base seq 128, dropout 0.1, all levers" configs/bert-medium.toml --synthetic --steps=10 \
  --warmup=2 --model.size=base --data.seq_len=128 --train.global_batch=1024 --system.micro_batch=auto --baseline
bench_row eager "recipe, not compiled (eager SDPA)" "${recipe[@]}" --system.compile=off
bench_row mb16 "recipe, micro_batch 16 (the reference's)" "${recipe[@]}" --system.micro_batch=16
bench_row dropout0 "recipe, dropout 0 (changes the recipe: for reference only)" "${recipe[@]}" --model.dropout=0
bench_row separate-qkv "recipe, three Q/K/V matmuls (HF's attention forward) instead of one fused" "${recipe[@]}" \
  --system.fused_qkv=false
bench_row cudagraphs "recipe, compile mode reduce-overhead (CUDA graphs)" "${recipe[@]}" --system.compile_mode=reduce-overhead
bench_row flash "recipe, SDPA flash kernel only" "${recipe[@]}" --system.sdpa_backend=flash
bench_row efficient "recipe, SDPA memory-efficient kernel only" "${recipe[@]}" --system.sdpa_backend=efficient
bench_row cudnn "recipe, SDPA cuDNN kernel only" "${recipe[@]}" --system.sdpa_backend=cudnn
bench_row no-prefetch "recipe, batch read in the step (no read-ahead thread)" "${recipe[@]}" --system.prefetch=false
bench_row foreach-adamw "recipe, foreach AdamW instead of fused" "${recipe[@]}" --system.fused_optimizer=false
bench_row mb64 "recipe, micro_batch 64" "${recipe[@]}" --system.micro_batch=64

engine_summary=()
if [[ $engines == 1 ]]; then
  # A short pretraining run of the recipe's model on the embedded corpus under each engine (one rank each).
  if [[ $cpu == 1 ]]; then
    vocab=2000
    short=(--system.device=cpu --system.precision=fp32 --model.size=tiny --data.seq_len=128 --model.max_positions=128
      --train.steps=4 --train.warmup_steps=1 --train.global_batch=16 --system.micro_batch=8 --run.log_every=2)
    ds_accelerator=cpu
  else
    vocab=32000
    short=(--system.precision=bf16
      --train.steps=30 --train.warmup_steps=5 --train.global_batch=256 --system.micro_batch=64 --run.log_every=10)
    ds_accelerator=cuda  # DeepSpeed guesses its accelerator at import; say it rather than rely on the guess
  fi
  common=(--run.checkpoint_every=1000 --eval.every=0 --run.progress=false)
  python -m mlm tokenizer --corpus demo --vocab-size "$vocab" --out "$OUT/tok"
  python -m mlm prepare --corpus demo --tokenizer "$OUT/tok" --out "$OUT/data" --overwrite
  have_deepspeed() {
    DS_ACCELERATOR=$ds_accelerator python -c "import deepspeed" >/dev/null 2>&1 && return 0
    compgen -G "$WHEELS/deepspeed-*.whl" >/dev/null || return 1
    python -m pip install --quiet --no-index --find-links "$WHEELS" deepspeed &&
      DS_ACCELERATOR=$ds_accelerator python -c "import deepspeed" >/dev/null 2>&1
  }
  for engine in ddp fsdp deepspeed; do
    envs=(MLM_ENGINE="$engine")
    extra=()
    if [[ $engine == deepspeed ]]; then
      if ! have_deepspeed; then
        engine_summary+=("deepspeed: skipped (not installed, and no working wheel in $WHEELS)")
        continue
      fi
      ds_config=configs/deepspeed/zero2.json
      if [[ $cpu == 1 ]]; then  # fp32 on a CPU: the reference file with bf16 turned off
        ds_config="$OUT/zero2-fp32.json"
        python -c 'import json, sys; c = json.load(open(sys.argv[1])); c.setdefault("bf16", {})["enabled"] = False; json.dump(c, open(sys.argv[2], "w"))' \
          configs/deepspeed/zero2.json "$ds_config"
      fi
      envs+=(DS_ACCELERATOR="$ds_accelerator")
      extra=(--system.deepspeed_config="$ds_config")
    fi
    rm -rf "$OUT/run-$engine"
    if ! env "${envs[@]}" python -m mlm launch --standalone --nproc_per_node=1 pretrain configs/roberta-medium.toml \
      --data.data_dir="$OUT/data" --run.out_dir="$OUT/run-$engine" "${short[@]}" "${common[@]}" \
      --system.strategy="$engine" "${extra[@]}" >"$OUT/pretrain-$engine.log" 2>&1; then
      engine_summary+=("$engine: FAILED (see $OUT/pretrain-$engine.log)")
      failed=1
      continue
    fi
    engine_summary+=("$(python - "$engine" "$OUT/run-$engine/metrics.jsonl" <<'PY'
import json, sys
engine, path = sys.argv[1:]
rows = [json.loads(l) for l in open(path) if '"tokens_per_s"' in l]
peaks = [r["peak_memory_gb"] for r in rows if "peak_memory_gb" in r]
peak = f"{max(peaks):.2f} GB" if peaks else "n/a (not CUDA)"
print(f"{engine}: {rows[-1]['tokens_per_s']:.0f} tokens/s (last logging window), peak memory {peak}")
PY
)")
  done
fi

echo
echo "== summary ($([[ $cpu == 1 ]] && echo 'CPU smoke: tiny model, figures say nothing about a GPU' || nvidia-smi --query-gpu=name --format=csv,noheader | head -n1), ${SECONDS}s)"
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = [line.split("\t") for line in (out / "rows.tsv").read_text().splitlines()]
results = {name: json.loads((out / f"bench-{name}.json").read_text()) for name, _, status in rows if status == "ok"}
# Lever rows are compared with the recipe row's HF path: the same card, the same script run.
recipe = results.get("recipe", {})
hf = recipe.get("baseline_tokens_per_s")
print("| row | what changes | tokens/s | × HF path | step s | peak GiB | MFU | micro_batch |")
print("|---|---|---|---|---|---|---|---|")
for name, what, status in rows:
    r = results.get(name)
    if r is None:
        print(f"| {name} | {what} | {status} | | | | | |")
        continue
    base = r["baseline_tokens_per_s"] or (hf if (r["model"], r["seq_len"]) == (recipe.get("model"), recipe.get("seq_len")) else None)
    times = f"{r['tokens_per_s'] / base:.2f}×" if base else "n/a"
    if r["baseline_tokens_per_s"]:
        times += f" (HF path {r['baseline_tokens_per_s']:,.0f} tokens/s)"
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    print(f"| {name} | {what} | {r['tokens_per_s']:,.0f} | {times} | {r['step_time_s']:.3f} | "
          f"{r['peak_memory'] / 2**30:.2f} | {mfu} | {r['micro_batch']} |")
PY
if ((${#engine_summary[@]})); then
  echo "engines (one rank each, a short pretraining run):"
  printf '  %s\n' "${engine_summary[@]}"
fi
exit "$failed"
