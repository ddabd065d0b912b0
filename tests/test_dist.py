"""Two processes under torchrun (DDP over Gloo on the CPU) train exactly like one process."""

import os
import subprocess
import sys

import pytest

from mlm.train.metrics import read_metrics
from mlm.train.pretrain import pretrain

from conftest import tiny_config


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_match_one_process(data_dirs, tmp_path):
    single = tiny_config(data_dirs["roberta"], tmp_path / "single", steps=6)
    single.model.dropout = 0.0  # dropout draws differ between one and two processes; nothing else may
    pretrain(single, log=lambda _: None)

    overrides = [
        f"--data.data_dir={data_dirs['roberta']}", "--model.size=tiny", "--model.max_positions=64", "--model.dropout=0.0",
        "--data.seq_len=32", "--train.steps=6", "--train.global_batch=16", "--train.lr=2e-3", "--train.warmup_steps=3",
        "--system.micro_batch=8", "--system.device=cpu", "--system.compile=off", f"--run.out_dir={tmp_path / 'ddp'}",
        "--run.log_every=1", "--run.checkpoint_every=10", "--run.progress=false", "--eval.every=10", "--eval.sequences=32",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mlm", "pretrain", *overrides],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "micro_batch 8 × accumulation 1 × ranks 2 = global batch 16" in result.stdout

    def losses(run):
        return [m["loss"] for m in read_metrics(tmp_path / run) if "loss" in m]

    assert len(losses("ddp")) == 6
    assert losses("ddp") == pytest.approx(losses("single"), abs=1e-4)
