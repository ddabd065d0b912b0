"""The run folder: what may start or continue in it, and the records a restarted run must trim.

A run folder holds one run: its config.json (the settings it trains with), checkpoints, metrics.jsonl and
TensorBoard events. These checks run before anything in the folder changes, and each refusal names the way
forward.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
from pathlib import Path

from mlm.atomic import write_file
from mlm.config import PretrainConfig, TrainConfig
from mlm.errors import UserError
from mlm.train.checkpoint import (
    STATE_FILE,
    check_checkpoint,
    checkpoint_dirs,
    find_checkpoint,
    newest_good_checkpoint,
)
from mlm.train.optim import decay_start
from mlm.train.run_lock import LOCK_FILE, OWNER_FILE

CONFIG_FILE = "config.json"
SCHEDULE_END = ("train.steps", "train.decay_steps", "train.decay_shape", "train.min_lr")
"""Where and how a wsd run ends: it may change them until its decay begins, for no step before that depends
on them (the run grows in its folder, or a decay branches into a new one)."""
SCHEDULE_KEYS = ("schedule", "decay_steps", "decay_shape", "min_lr")
"""Recipe settings a run recorded before they existed trained with their defaults (the linear schedule)."""


def recipe_differences(config_path: Path, cfg: PretrainConfig) -> list[str]:
    """The recipe settings (model, data, train) in which the run recorded at config_path differs from cfg."""
    try:
        theirs = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path} is not valid JSON ({e}): restore it, or choose another run.out_dir") from None
    if not isinstance(theirs, dict):
        raise UserError(f"{config_path} does not hold a run's settings (a JSON object): restore it, or choose "
                        "another run.out_dir")
    if isinstance(theirs.get("train"), dict):
        theirs["train"] = {**_schedule_defaults(), **theirs["train"]}
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
        if differ and _only_the_end(differ, cfg):
            _check_new_end(run_dir, cfg, differ, checkpoint, checkpoints)
            return
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
    if differ and _only_the_end(differ, cfg):  # a decay (or a longer run) branched from the wsd run in source
        recorded = {**_schedule_defaults(), **recorded_train(source)}
        problem = _end_problem(recorded, cfg, _checkpoint_step(checkpoint))
        if problem:
            stable = _stable_checkpoints(source, recorded)
            raise UserError(
                f"--resume: {checkpoint} cannot start a run of another end (differs in {', '.join(differ)}) from the "
                f"wsd run in {source}: {problem}; branch from a checkpoint before its decay"
                + (f" (the latest: {stable[-1]})" if stable else "")
                + f", or start a new run from its weights with --model.init_from={checkpoint}"
            )
        return
    if differ:
        raise UserError(
            f"--resume: {checkpoint} belongs to the run in {source}, which differs from this one "
            f"(run.out_dir={run_dir}) in {', '.join(differ)}: to continue that run, use its config and "
            f"--run.out_dir={source}; to start this run from its weights, use --model.init_from={checkpoint}"
        )


def _schedule_defaults() -> dict:
    defaults = TrainConfig()
    return {name: getattr(defaults, name) for name in SCHEDULE_KEYS}


def _only_the_end(differ: list[str], cfg: PretrainConfig) -> bool:
    """A wsd run (both recorded and configured: train.schedule is not among the differences) that changes only
    where or how it ends."""
    return cfg.train.schedule == "wsd" and set(differ) <= set(SCHEDULE_END)


def _checkpoint_step(checkpoint: Path) -> int:
    """The steps a checkpoint has trained (its training state's; a folder may have been renamed)."""
    import torch

    return int(torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)["step"])


def _stable_checkpoints(run_dir: Path, recorded: dict) -> list[Path]:
    """The checkpoints of the wsd run in run_dir (train section `recorded`) written before its decay began."""
    start = _recorded_decay_start(recorded)
    return [c for c in checkpoint_dirs(run_dir) if start is not None and _checkpoint_step(c) <= start]


def _recorded_decay_start(recorded: dict) -> int | None:
    """train.steps − train.decay_steps of a recorded train section; None if they are not whole numbers."""
    steps, decay = recorded.get("steps"), recorded.get("decay_steps")
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (steps, decay)):
        return None
    return steps - decay


def _end_problem(recorded: dict, cfg: PretrainConfig, step: int) -> str | None:
    """Why the wsd run recorded with the train section `recorded` cannot go on from its checkpoint of `step`
    towards cfg's end, or None: every step before `step` must come before both decays, so that it was trained
    at the rate the new end gives it."""
    if _recorded_decay_start(recorded) is None:  # an edited config.json: never a traceback
        return "its config.json records no whole train.steps and train.decay_steps"
    steps, decay = recorded["steps"], recorded["decay_steps"]
    if step > steps - decay:
        return (f"its decay began at step {steps - decay:,} (train.steps - train.decay_steps = {steps:,} - {decay:,}), "
                f"before step {step:,}, so the steps since were trained for its own end")
    new_start = decay_start(cfg.train)
    if step > new_start:
        return (f"train.steps={cfg.train.steps:,} with train.decay_steps={cfg.train.decay_steps:,} would begin the "
                f"decay at step {new_start:,}, before step {step:,}: give train.steps of at least "
                f"{step + cfg.train.decay_steps:,}")
    return None


def _check_new_end(run_dir: Path, cfg: PretrainConfig, differ: list[str], checkpoint: Path | None,
                   checkpoints: list[Path]) -> None:
    """The wsd run in run_dir takes another end (a larger train.steps, another decay) from its newest checkpoint
    if that was written before its decay began; otherwise say why not and what to do."""
    changes = ", ".join(differ)
    recorded = {**_schedule_defaults(), **recorded_train(run_dir)}
    if checkpoint is None:
        raise UserError(f"{run_dir} holds this wsd run with another end (differs in {changes}): pass --resume to "
                        "continue it towards the new one (possible until its decay begins)")
    if checkpoint.resolve() != checkpoints[-1].resolve():
        if checkpoint.resolve().parent == run_dir.resolve():
            raise UserError(
                f"--resume: {run_dir} holds checkpoints after {checkpoint.name} (up to {checkpoints[-1].name}), trained "
                f"for the recorded end: give the new end ({changes}) a folder of its own: --resume={checkpoint} "
                "--run.out_dir=NEW_FOLDER"
            )
        raise UserError(f"{run_dir} already holds a different run (differs in {changes}): choose another run.out_dir")
    problem = _end_problem(recorded, cfg, _checkpoint_step(checkpoint))
    if problem:
        stable = _stable_checkpoints(run_dir, recorded)
        branch = (f"branch it into a new folder from a checkpoint before its decay: --resume={stable[-1]} "
                  "--run.out_dir=NEW_FOLDER --train.steps=M; or " if stable else "")
        raise UserError(
            f"--resume: the wsd run in {run_dir} cannot take another end ({changes}) from {checkpoint.name}: "
            f"{problem}. To train longer, {branch}start a new run from its weights with a fresh schedule: "
            f"--model.init_from={checkpoint} --run.out_dir=NEW_FOLDER"
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
        write_file(path, "".join(line + "\n" for line in kept))  # a kill mid-write keeps the records before it


def _record_step(line: str) -> int | None:
    """The step of one metrics.jsonl record; None for a line cut short (a kill or a full disk mid-write)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class RunFinished(Exception):
    """--resume on a run that has reached its last step: nothing to train; the message says so and how to
    train on. Not an error: a requeued job that finds its run finished ends with exit status 0."""

    def __init__(self, message: str, steps: int, checkpoint: Path):
        super().__init__(message)
        self.steps, self.checkpoint = steps, checkpoint


def check_not_finished(run_dir: Path, checkpoint: Path, start_step: int, cfg: PretrainConfig) -> None:
    """Raise RunFinished when the checkpoint to resume from is the run's last step."""
    if start_step >= cfg.train.steps:
        raise RunFinished(
            f"{run_dir} is finished: {checkpoint} holds its last step ({start_step:,} of train.steps="
            f"{cfg.train.steps:,}), so there is nothing to resume. To train on, start a new run from its weights "
            f"with a fresh schedule: --model.init_from={checkpoint} --run.out_dir=NEW_FOLDER",
            cfg.train.steps, checkpoint,
        )


def checkpoint_step(checkpoint: Path) -> int:
    """The step in a checkpoint-<step> folder's name (-1 for a folder named otherwise: its training state
    tells, once loaded)."""
    match = re.fullmatch(r"checkpoint-(\d+)", checkpoint.name)
    return int(match.group(1)) if match else -1


def remove_new_run_dir(run_dir: Path) -> None:
    """A run that fails before it writes anything leaves no folder behind: remove the folder this run made,
    if it still holds only its lock files."""
    for name in (OWNER_FILE, LOCK_FILE):
        (run_dir / name).unlink(missing_ok=True)
    try:
        run_dir.rmdir()  # only if empty: never anything but the lock files
    except OSError:
        pass


def end_of_run_line(summary: dict, start_step: int, seconds: float) -> str:
    """The last line of a finished `mlm pretrain`: the steps, how long it took, the final losses and where the
    final checkpoint is."""
    steps = summary["steps"]
    done = f"{steps:,} step{'s' if steps != 1 else ''}" + (f" (resumed at step {start_step:,})" if start_step else "")
    losses = [f"{name} {summary[key]:.4f}" for name, key in (("train loss", "train_loss"), ("validation loss", "val_loss"))
              if summary.get(key) is not None]
    return (f"finished {done} in {datetime.timedelta(seconds=round(seconds))}"
            + (f": {', '.join(losses)}" if losses else "")
            + (f"; final checkpoint {summary['checkpoint']}" if summary.get("checkpoint") else ""))
