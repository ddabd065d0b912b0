"""The run folder: what may start or continue in it, and the records a restarted run must trim.

A run folder holds one run: its config.json (the settings it trains with), checkpoints, metrics.jsonl and
TensorBoard events. These checks run before anything in the folder changes, and each refusal names the way
forward.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mlm.config import PretrainConfig
from mlm.errors import UserError
from mlm.train.checkpoint import check_checkpoint, checkpoint_dirs, find_checkpoint, newest_good_checkpoint
from mlm.train.run_lock import LOCK_FILE, OWNER_FILE

CONFIG_FILE = "config.json"


def recipe_differences(config_path: Path, cfg: PretrainConfig) -> list[str]:
    """The recipe settings (model, data, train) in which the run recorded at config_path differs from cfg."""
    try:
        theirs = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path} is not valid JSON ({e}): restore it, or choose another run.out_dir") from None
    if not isinstance(theirs, dict):
        raise UserError(f"{config_path} does not hold a run's settings (a JSON object): restore it, or choose "
                        "another run.out_dir")
    ours = cfg.recipe()
    return [
        f"{section}.{key}"
        for section in ours
        for key in ours[section]
        if not isinstance(theirs.get(section), dict) or theirs[section].get(key) != ours[section][key]
    ]


def check_run_dir(run_dir: Path, cfg: PretrainConfig, checkpoint: Path | None) -> None:
    """Refuse to mix two runs in one folder, or to silently restart one that has checkpoints; every refusal
    names the way forward."""
    config_path = run_dir / CONFIG_FILE
    checkpoints = checkpoint_dirs(run_dir)
    if config_path.is_file():
        differ = recipe_differences(config_path, cfg)
        if differ and not checkpoints:
            raise UserError(
                f"{run_dir} holds a different run (differs in {', '.join(differ)}) that stopped before its first "
                f"checkpoint: delete that folder (rm -r {run_dir}) or choose another run.out_dir"
            )
        if differ:
            from_weights = f"--model.init_from={checkpoints[-1]} --run.out_dir=NEW_FOLDER"
            if set(differ) <= {"train.steps", "train.warmup_steps"}:
                raise UserError(
                    f"{run_dir} is a run of another length (differs in {', '.join(differ)}); its schedule ends at its "
                    f"own last step. To train on, start a new run from its weights with a fresh schedule: {from_weights}"
                )
            raise UserError(
                f"{run_dir} already holds a different run (differs in {', '.join(differ)}): choose another "
                f"run.out_dir, or start a new run from its weights with {from_weights}"
            )
        if checkpoints and checkpoint is None:
            raise UserError(
                f"{run_dir} already holds checkpoints of this run: pass --resume to continue it, or choose another "
                "run.out_dir to start over"
            )
    elif run_dir.is_dir() and any(p.name not in (LOCK_FILE, OWNER_FILE) for p in run_dir.iterdir()):
        raise UserError(f"{run_dir} is not empty and holds no mlm run: choose another run.out_dir")


def check_foreign_checkpoint(checkpoint: Path, run_dir: Path, cfg: PretrainConfig) -> None:
    """--resume PATH from another run folder: only a run of the same recipe continues here."""
    source = checkpoint.resolve().parent
    if source == run_dir.resolve() or not (source / CONFIG_FILE).is_file():
        return
    differ = recipe_differences(source / CONFIG_FILE, cfg)
    if differ:
        raise UserError(
            f"--resume: {checkpoint} belongs to the run in {source}, which differs from this one "
            f"(run.out_dir={run_dir}) in {', '.join(differ)}: to continue that run, use its config and "
            f"--run.out_dir={source}; to start this run from its weights, use --model.init_from={checkpoint}"
        )


def recorded_train(run_dir: Path) -> dict:
    """The train section recorded in the run folder's config.json ({} if there is none)."""
    try:
        train = json.loads((run_dir / CONFIG_FILE).read_text())["train"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return train if isinstance(train, dict) else {}


def checkpoint_to_resume(run_dir: Path, resume: str | None, log) -> Path | UserError | None:
    """The checkpoint that --resume asks for, after checking it is sound; or why none can be used."""
    try:
        if resume is not None and not resume.strip():  # --resume= : a variable that came out empty, never "no resume"
            raise UserError("--resume= is empty: give a checkpoint folder, latest (a bare --resume) or auto")
        if resume == "auto":  # for jobs that may be requeued: continue if there is a checkpoint, else start
            checkpoint = newest_good_checkpoint(run_dir, log)
            if checkpoint is None and checkpoint_dirs(run_dir, complete=False):
                raise UserError(f"every checkpoint in {run_dir} is damaged: restore one, or choose another run.out_dir")
            return checkpoint
        return check_checkpoint(find_checkpoint(run_dir if resume == "latest" else resume)) if resume else None
    except UserError as e:
        return e


def truncate_metrics(run_dir: Path, start_step: int) -> None:
    """On resume, drop records a crashed run logged after its last checkpoint, so the log has no repeats;
    on a fresh start (a run that stopped before its first checkpoint), drop them all."""
    path = run_dir / "metrics.jsonl"
    if start_step == 0:
        path.unlink(missing_ok=True)
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    elif path.is_file():
        steps = [(line, _record_step(line)) for line in path.read_text().splitlines()]
        kept = [line for line, step in steps if step is not None and step <= start_step]
        tmp = path.with_name(path.name + ".tmp")  # a kill mid-write must not lose the records before the checkpoint
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def _record_step(line: str) -> int | None:
    """The step of one metrics.jsonl record; None for a line cut short (a kill or a full disk mid-write)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
