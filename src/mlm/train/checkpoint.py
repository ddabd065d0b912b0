"""Checkpoints: `checkpoint-<step>/` = a plain HF model (safetensors + config.json) + its tokenizer +
`training_state.pt` (optimizer, schedule, step, RNG) so that a resumed run continues exactly.

Each checkpoint is written under a temporary name and renamed when complete, so a crash never leaves a
folder that looks like a checkpoint but is not one.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from mlm.atomic import atomic_dir
from mlm.errors import UserError

STATE_FILE = "training_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest checkpoint in a run folder."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = checkpoint_dirs(path)
    if not found:
        raise UserError(f"--resume: {path} holds no checkpoint (no checkpoint-<step>/{STATE_FILE})")
    return found[-1]


def save_checkpoint(
    run_dir: Path, step: int, hf_model, tokenizer, optimizer, scheduler, keep: int = 0
) -> Path:
    """Write checkpoint-<step>/ atomically; with keep > 0, delete all but the newest `keep`."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar, the training one
    final = run_dir / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        hf_model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        torch.save(state, tmp / STATE_FILE)
    if keep > 0:
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old)
    return final


def load_training_state(checkpoint: Path, optimizer, scheduler) -> int:
    """Restore optimizer, schedule and RNG from a checkpoint; returns the step to continue from."""
    # weights_only: a checkpoint is data, never code.
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"])
