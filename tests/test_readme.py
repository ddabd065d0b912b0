"""The README's commands run as written: every block tagged `<!-- readme-test -->` runs, in order, in a
fresh folder holding the project's configs, with one thread per process and, for pretraining, a few steps
instead of the recipe's hundreds (the only change made to a command)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.dist]

ROOT = Path(__file__).parent.parent
FEWER_STEPS = "--train.steps=4 --train.warmup_steps=1 --run.log_every=2 --run.checkpoint_every=2 --eval.every=2"


def tagged_blocks(readme: str) -> list[list[str]]:
    """The commands of each tagged bash block (continuation lines joined, comments dropped)."""
    blocks = re.findall(r"<!-- readme-test -->\n```bash\n(.*?)```", readme, flags=re.S)
    result = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        result.append([line.split("  #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")])
    return result


def test_readme_blocks_are_found():
    blocks = tagged_blocks((ROOT / "README.md").read_text())
    assert len(blocks) == 3 and all(blocks)
    assert any("--system.strategy=deepspeed" in command for command in blocks[1])
    assert any("--system.strategy=deepspeed" in command for command in blocks[2])


def test_the_readme_commands_run_as_written(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    for block in tagged_blocks((ROOT / "README.md").read_text()):
        for command in block:
            if re.search(r"\bmlm (launch .*)?pretrain\b", command):
                command = f"{command} {FEWER_STEPS}"
            result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                    timeout=600)
            assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    for run in ("tiny", "tiny-2", "modernbert-tiny", "mb-ddp", "mb-fsdp", "mb-ds", "ddp", "fsdp", "ds"):
        assert (tmp_path / "runs" / run / "checkpoint-4" / "model.safetensors").is_file(), run
