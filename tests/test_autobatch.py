"""system.micro_batch="auto": on one process the largest divisor that fits (on a CPU, up to CPU_AUTO); on several
ranks, every rank takes the smallest any rank found, under every engine.

The multi-rank test makes the ranks disagree from outside the product: each rank process starts with a
`sitecustomize` (Python runs it at start-up) that lowers rank 1's CPU cap, as a card with less free memory
would lower its finding on a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlm.train.autobatch import CPU_AUTO, agreed_micro_batch, auto_micro_batch
from mlm.dist import DistInfo

SRC = Path(__file__).resolve().parent.parent / "src"
RANK1_CAP = 2
SITECUSTOMIZE = f"""
import os

if os.environ.get("RANK") == "1" and "LOCAL_RANK" in os.environ:  # a rank process started by torchrun
    import mlm.train.autobatch

    mlm.train.autobatch.CPU_AUTO = {RANK1_CAP}
"""


def test_one_process_takes_the_largest_divisor_up_to_the_cpu_cap():
    lines = []
    assert auto_micro_batch(None, 48, 32, 5, torch.device("cpu"), None, lines.append) == 24
    assert auto_micro_batch(None, 3 * CPU_AUTO, 32, 5, torch.device("cpu"), None, lines.append) == CPU_AUTO
    assert lines[0] == f"system.micro_batch=auto: 24 (the largest divisor of 48 up to {CPU_AUTO} on a CPU)"


def test_one_process_agrees_with_itself():
    assert agreed_micro_batch(12, DistInfo()) == 12
    assert agreed_micro_batch(0, DistInfo()) == 0


@pytest.fixture(scope="module")
def fp32_zero2(tmp_path_factory) -> Path:
    config = json.loads(Path("configs/deepspeed/zero2.json").read_text())
    config["bf16"]["enabled"] = False
    path = tmp_path_factory.mktemp("ds") / "zero2-fp32.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("strategy", [
    "ddp", "fsdp",
    pytest.param("deepspeed", marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                                        reason="needs the deepspeed extra")),
])
def test_ranks_that_disagree_all_take_the_smallest(strategy, data_dirs, fp32_zero2, tmp_path):
    """Rank 0 finds 8 (the per-rank batch), rank 1 finds 2: both train with micro-batch 2 × accumulation 4.
    Before the agreement rank 0 reported and ran 8 × 1 while rank 1 ran 2 × 4 (FSDP's per-micro-batch
    collectives then wait on each other until the timeout)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([str(hook), str(SRC), os.environ.get("PYTHONPATH", "")])}
    extra = [f"--system.deepspeed_config={fp32_zero2}"] if strategy == "deepspeed" else []
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mlm", "pretrain",
         f"--data.data_dir={data_dirs['roberta']}", "--model.size=tiny", "--model.max_positions=64",
         "--data.seq_len=32", "--train.steps=2", "--train.global_batch=16", "--train.warmup_steps=1",
         "--system.micro_batch=auto", "--system.device=cpu", "--system.compile=off", "--system.dist_timeout_s=60",
         f"--system.strategy={strategy}", *extra, f"--run.out_dir={run}", "--run.log_every=1",
         "--run.checkpoint_every=1000", "--run.progress=false", "--eval.every=0"],
        capture_output=True, text=True, env=env, timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "the smallest over 2 ranks, this rank found 8)" in result.stdout
    assert f"batch: micro_batch {RANK1_CAP} × accumulation 4 × ranks 2" in result.stdout
    assert json.loads((run / "config.json").read_text())["system"]["micro_batch"] == RANK1_CAP
