"""The only place that reads RANK / WORLD_SIZE: process-group set-up and the few collectives the loop needs.

Launched plainly, the process is rank 0 of 1 and nothing here touches torch.distributed, unless the engine
needs a process group (fsdp, deepspeed): then it forms a group of one. Launched by `torchrun` (or `srun`
through scripts/slurm/pretrain.sbatch, which sets the same variables), it joins the job's group.
"""

from __future__ import annotations

import datetime
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_control_group = None  # a Gloo group for small host-side collectives (the stop flag) beside NCCL


LAUNCHED_BY_MLM = "MLM_LAUNCH"
"""Set for the ranks that `mlm launch` starts: each rank leaves its error line in torchrun's error file, and
the launcher prints the line of the rank that failed first (rank 0 prints its own)."""
LOST_PEER_EXIT = 3
"""Exit code of a rank whose collective failed because another rank is gone, so that a launcher can tell the
rank that failed first from the ranks that only lost it."""


def is_lost_peer(error: BaseException) -> bool:
    """A collective failed because another rank died, was stopped or stopped answering (in a multi-rank job)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    text = str(error)
    return isinstance(error, torch_dist.DistError) or (
        isinstance(error, RuntimeError) and any(s in text for s in ("Connection reset by peer", "Connection closed by peer"))
    )


def launched_rank() -> int:
    """This process's rank as its launcher set it (0 when launched plainly), readable before any group exists."""
    return int(os.environ.get("RANK", "0"))


_variables_set_here: set[str] = set()
"""Launcher variables that init() set for a group of one, for cleanup() to remove."""


def init(device_kind: str, timeout_s: int = 1800, need_group: bool = False) -> DistInfo:
    """Join the process group if launched by torchrun (NCCL for CUDA, Gloo for CPU); with need_group, form
    a group of one when launched plainly. A collective that waits longer than timeout_s fails the job
    instead of hanging (a rank that died)."""
    global _control_group
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    if (info.distributed or need_group) and not torch_dist.is_initialized():
        if device_kind == "cuda":
            torch.cuda.set_device(info.local_rank)
        backend = "nccl" if device_kind == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        if info.distributed:
            torch_dist.init_process_group(backend=backend, timeout=timeout)
        else:  # one process, no launcher: an in-memory store, no network port
            # and the variables a launcher would set, for libraries that read them (DeepSpeed); cleanup() takes
            # them away again, or a later library in this process (transformers' Trainer) would look for a launcher
            launcher_variables = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
            _variables_set_here.update(key for key in launcher_variables if key not in os.environ)
            os.environ.update(launcher_variables)
            torch_dist.init_process_group(backend=backend, store=torch_dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        _control_group = torch_dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    return info


def cleanup() -> None:
    global _control_group
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    _control_group = None
    for key in _variables_set_here:
        os.environ.pop(key, None)
    _variables_set_here.clear()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        torch_dist.barrier()


def mean_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a tensor over all ranks (a no-op on one process)."""
    if info.distributed:
        value = value.clone()
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def max_across_ranks(values: list[float], info: DistInfo) -> list[float]:
    """Each value's maximum over all ranks, on every rank (on the host, through the control group)."""
    if not info.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX, group=_control_group)
    return tensor.tolist()


def gather_to_main(obj: object, info: DistInfo) -> list[object]:
    """Every rank's object, in rank order, on the main rank (other ranks get [])."""
    if not info.distributed:
        return [obj]
    gathered = [None] * info.world_size if info.is_main else None
    torch_dist.gather_object(obj, gathered, dst=0, group=_control_group)
    return gathered or []


def broadcast_from_main(obj: object, info: DistInfo) -> object:
    """The main rank's object, on every rank."""
    if not info.distributed:
        return obj
    box = [obj if info.is_main else None]
    torch_dist.broadcast_object_list(box, src=0, group=_control_group)
    return box[0]


# ---- stopping on a signal: SIGTERM / SIGUSR1 (pre-emption, SLURM's --signal), SIGINT (Ctrl-C) and SIGHUP
# (the terminal or ssh session closed) ----
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


class StopFlag:
    """Set by a signal handler; read at a step boundary so that all ranks stop after the same step."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def handle(self, signum, frame) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.signal = self.signal or signum

    def agreed(self, info: DistInfo) -> int | None:
        """The signal that stops the job, if any rank got one (one tiny all-reduce on the host)."""
        if not info.distributed:
            return self.signal
        flag = torch.tensor([self.signal or 0], dtype=torch.int64)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX, group=_control_group)
        return int(flag.item()) or None


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Install the handlers for the duration of training; the previous ones come back afterwards."""
    flag = StopFlag()
    previous = {sig: signal.signal(sig, flag.handle) for sig in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
