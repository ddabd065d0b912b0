"""Small words a user reads: what a number means, and its plural."""

from mlm.tokenizer import build_tokenizer
from mlm.train.pretrain import pretrain

from conftest import tiny_config


def test_a_tokenizer_smaller_than_asked_says_the_corpus_supports_no_more(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(f"the cat sat on mat number {i % 7}" for i in range(200)) + "\n")
    lines = []
    tokenizer = build_tokenizer(tmp_path / "tok", [str(tmp_path / "c.txt")], "roberta", vocab_size=4000,
                                log=lines.append)
    assert len(tokenizer) < 4000
    assert lines[-1] == (f"note: 4,000 tokens were asked; this corpus supports no more than {len(tokenizer):,} at "
                         "--min-frequency 2 (a larger corpus, or a lower --min-frequency, gives more)")


def test_one_step_is_one_step(data_dirs, tmp_path):
    lines = []
    pretrain(tiny_config(data_dirs["roberta"], tmp_path / "run", steps=1), log=lines.append)
    assert any(line.startswith("data: ") and "; 1 step = " in line for line in lines)
    assert lines[-1].startswith("finished 1 step in ")


def test_a_command_without_deepspeed_prints_nothing_of_deepspeed_on_a_cpu(data_dirs, tmp_path):
    """With the deepspeed extra installed, saving a checkpoint imports deepspeed (through transformers and
    accelerate); on a machine without a GPU it warned "Setting accelerator to CPU" in every command."""
    import importlib.util
    import os
    import subprocess
    import sys

    import pytest
    import torch

    if importlib.util.find_spec("deepspeed") is None or torch.cuda.is_available():
        pytest.skip("needs the deepspeed extra on a machine without a GPU")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mlm", "pretrain", f"--data.data_dir={data_dirs['roberta']}", "--model.size=tiny",
         "--model.max_positions=64", "--data.seq_len=32", "--train.steps=1", "--train.warmup_steps=0",
         "--train.global_batch=8", "--system.micro_batch=8", f"--run.out_dir={tmp_path / 'run'}", "--eval.every=0"],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "checkpoint-1").is_dir()
    assert "accelerator" not in done.stdout + done.stderr.lower()


def test_the_first_deepspeed_run_on_a_cpu_announces_its_op_compile(tmp_path, monkeypatch):
    import importlib.util

    import pytest
    import torch

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs the deepspeed extra")
    from mlm.train.engines.deepspeed_engine import op_build_notice

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # a machine that never built it
    assert op_build_notice(torch.device("cpu")) == (
        f"deepspeed: compiling its CPU communication op deepspeed_shm_comm once (about 2 minutes); later runs load "
        f"it from {tmp_path / 'deepspeed_shm_comm'}")
    assert op_build_notice(torch.device("cuda")) is None  # no such op on a GPU


def test_the_quickstart_installs_pytorch_s_cpu_build_first():
    """On Linux a plain `pip install torch` is the CUDA build (GBs of CUDA libraries on a machine with no GPU)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Quickstart", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    setup, tests = [line.split("#", 1)[0].strip() for line in block.splitlines()]  # two commands: set-up + demo, tests
    steps = setup.split(" && ")
    assert steps[0] == "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    assert steps[1] == 'pip install -e ".[test,deepspeed]"' and steps[2] == "mlm demo"
    assert tests == 'python -m pytest -m "not gpu"'
