"""Checkpoints: `checkpoint-<step>/` holds everything a resume needs, so a copied or moved folder resumes.

    checkpoint-<step>/
      config.json, model.safetensors, tokenizer files   a plain Hugging Face model (full fp32 weights)
      engine/                                           model + optimizer state of the engine, by name,
                                                        sharded by torch.distributed.checkpoint (DCP)
      training_state.pt                                 step, engine, world size, each rank's RNG state,
                                                        the loss window since the last logged step
      checksums.json                                    SHA-256 of every other file, checked before a resume

DCP reshards at load time, so a run saved on N ranks resumes on M. Every rank writes its shards into
`.checkpoint-<step>.tmp/`; the main rank adds the rest, then the checksums, flushes everything to disk and
renames the folder, so a crash never leaves a folder under the final name that looks whole but is not.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from mlm import dist
from mlm.atomic import os_error_behind
from mlm.errors import UserError
from mlm.model.families import positions_of

STATE_FILE = "training_state.pt"
ENGINE_DIR = "engine"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(run_dir: str | Path, complete: bool = True) -> list[Path]:
    """The checkpoints of a run, oldest first: with `complete`, those holding a training state; otherwise every
    checkpoint-<step> folder (one is written under a temporary name and renamed whole, so a folder of that
    name without its training state is a damaged checkpoint, and a resume names it instead of passing it by)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if (m := _NAME.match(p.name)) and p.is_dir() and (not complete or (p / STATE_FILE).is_file())]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest checkpoint in a run folder."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = checkpoint_dirs(path, complete=False)
    if not found:
        raise UserError(
            f"--resume: {path} holds no checkpoint yet (no checkpoint-<step>/{STATE_FILE}): start without --resume, "
            "or use --resume=auto, which continues from a checkpoint when there is one and starts otherwise"
        )
    return found[-1]


CHECKSUMS = "checksums.json"
"""SHA-256 of every other file of a checkpoint, written last, checked before a resume."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _write_checksums(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    sums = {str(p.relative_to(folder)): _sha256(p) for p in files}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1) + "\n")


def _checksum_problem(checkpoint: Path) -> str | None:
    """The first file whose bytes changed since the checkpoint was written (a disk or copy error), or None."""
    sums = json.loads((checkpoint / CHECKSUMS).read_text())
    if not isinstance(sums, dict):
        return f"{CHECKSUMS} is damaged (not a JSON object)"
    for name, expected in sums.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != expected:
            return f"{name} does not match its checksum (changed after it was written)"
    return None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a missing, unreadable, truncated or altered file), or None.
    Headers and sizes first, then every file's checksum (which reads the whole checkpoint)."""
    from safetensors import safe_open
    from torch.distributed.checkpoint import FileSystemReader

    for name in ("config.json", "model.safetensors", STATE_FILE, f"{ENGINE_DIR}/.metadata", CHECKSUMS):
        if not (checkpoint / name).is_file():
            return f"{name} is missing"
    try:
        json.loads((checkpoint / "config.json").read_text())
        with safe_open(str(checkpoint / "model.safetensors"), "pt"):
            pass  # the header is checked against the file's size: a truncated file fails here
        state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
        named = _NAME.match(checkpoint.name)
        if named and state.get("step") != int(named.group(1)):  # renamed or swapped folders
            return f"it holds step {state.get('step')}, not {named.group(1)} as its name says"
        metadata = FileSystemReader(str(checkpoint / ENGINE_DIR)).read_metadata()
        for item in metadata.storage_data.values():
            shard = checkpoint / ENGINE_DIR / item.relative_path
            if shard.stat().st_size < item.offset + item.length:
                return f"{shard.name} is truncated"
        return _checksum_problem(checkpoint)
    except pickle.UnpicklingError:  # weights_only refused it: never advise otherwise
        return f"{STATE_FILE} holds objects other than tensors and numbers (refused: a checkpoint is data, never code)"
    except EOFError:  # what torch.load says of an empty or cut-short file
        return f"{STATE_FILE} is empty or cut short"
    except FileNotFoundError as e:  # a shard named in the engine's metadata
        return f"{Path(e.filename).name if e.filename else 'a file'} is missing"
    except Exception as e:  # json, safetensors, pickle and DCP each raise their own types for a damaged file
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
    return None


def newest_good_checkpoint(run_dir: Path, log) -> Path | None:
    """The newest checkpoint of a run that can be resumed from, naming each damaged one it passes over."""
    for checkpoint in reversed(checkpoint_dirs(run_dir, complete=False)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        log(f"warning: {checkpoint} is damaged ({problem}): skipping it")
    return None


def check_checkpoint(checkpoint: Path) -> Path:
    """The checkpoint itself, or a one-line error naming what is wrong with it and the way out."""
    problem = checkpoint_problem(checkpoint)
    if problem is not None:
        raise UserError(
            f"--resume: {checkpoint} is damaged ({problem}): give an earlier checkpoint, or use --resume=auto, "
            "which resumes from the newest sound one"
        )
    return checkpoint


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder to disk, so a power cut after the rename cannot leave a hollow checkpoint."""
    for path in [*sorted(p for p in folder.rglob("*") if p.is_file()), *sorted(p for p in folder.rglob("*") if p.is_dir()), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Drop the temporary folders of checkpoints that a killed run did not finish (main rank only)."""
    for partial in run_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(partial, ignore_errors=True)


@contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """DCP warns when there is no process group; one plain process is a normal case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def rng_state(device: torch.device) -> dict:
    """This rank's random state: the CPU generator and its own GPU's (dropout draws from them)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Put back what `rng_state` took."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(run_dir: Path, step: int, engine, tokenizer, info: dist.DistInfo, device: torch.device,
                    keep: int = 0, keep_also: set[int] = frozenset(), tally: dict | None = None) -> Path:
    """Write checkpoint-<step>/ with every rank; with keep > 0, delete all but the newest `keep`, and but
    the steps in `keep_also` (checkpoints a GLUE job still has to read). `tally` (StepTally.state(): the
    losses and bad steps since the last logged step) lets a resumed run log and stop as an unbroken one."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar, the training one
    final, tmp = run_dir / f"checkpoint-{step}", run_dir / f".checkpoint-{step}.tmp"
    try:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier(info)
        with _one_process_is_fine():
            dcp.save(engine.state_dict(), checkpoint_id=str(tmp / ENGINE_DIR))
        model = engine.export_model()  # full weights gathered on the main rank
        rng = dist.gather_to_main(rng_state(device), info)
        if info.is_main:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.model_max_length = positions_of(model.config)  # so truncation=True fits the model
            tokenizer.save_pretrained(str(tmp))
            state = {"step": step, "strategy": engine.name, "world_size": info.world_size, "rng": rng,
                     "tally": dict(tally or {})}
            with open(tmp / STATE_FILE, "wb") as f:  # a file object: a failed write keeps its OSError as context
                torch.save(state, f)
            _write_checksums(tmp)
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
        # A full disk or a file size limit: say so in one line, free what the attempt took; earlier checkpoints stay.
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        error = os_error_behind(e, tmp)
        if error is not None:
            raise error from e
        inner = next(iter(e.failures.values()), (None,))[0] if isinstance(e, CheckpointException) else None
        # The rank's own error (a lost peer stays one; a second Ctrl-C during the write stays a KeyboardInterrupt),
        # not DCP's wrapper.
        if isinstance(inner, (Exception, KeyboardInterrupt)):
            raise inner from e
        raise
    if info.is_main:
        if keep > 0:
            for old in checkpoint_dirs(run_dir)[:-keep]:
                if int(_NAME.match(old.name).group(1)) not in keep_also:
                    shutil.rmtree(old)
    dist.barrier(info)
    return final


def load_training_state(checkpoint: Path, engine, info: dist.DistInfo, device: torch.device) -> tuple[int, dict]:
    """Restore the engine's model and optimizer state (resharded to this world size) and, on the same
    number of ranks, each rank's RNG state; returns the step to continue from and the loop's tally."""
    # weights_only: a checkpoint is data, never code.
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    if not (checkpoint / ENGINE_DIR).is_dir():
        raise UserError(f"{checkpoint} has no {ENGINE_DIR}/ state (written by an older mlm): start a new run "
                        f"from its weights with --model.init_from={checkpoint}")
    saved_by = state["strategy"]
    if (saved_by == "deepspeed") != (engine.name == "deepspeed"):
        raise UserError(
            f"{checkpoint} was written by the {saved_by} engine and cannot resume under {engine.name} "
            f"(ddp and fsdp share a format; deepspeed has its own): resume with --system.strategy={saved_by}, "
            f"or start a new run from its weights with --model.init_from={checkpoint}"
        )
    engine_state = engine.state_dict()
    with _one_process_is_fine():
        dcp.load(engine_state, checkpoint_id=str(checkpoint / ENGINE_DIR))
    engine.load_state_dict(engine_state)
    # Dropout streams continue exactly only where each rank finds its own state: the same world size.
    if state["world_size"] == info.world_size:
        set_rng_state(state["rng"][info.rank], device)
    if "tally" not in state:  # older checkpoints carried only the losses' sum and count
        loss_sum, losses = state.get("loss_window", (0.0, 0))
        state["tally"] = {"loss_sum": loss_sum, "losses": losses}
    return int(state["step"]), state["tally"]
