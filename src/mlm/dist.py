"""The only place that reads RANK / WORLD_SIZE: process-group set-up and the few collectives the loop needs.

Launched plainly, the process is rank 0 of 1 and nothing here touches torch.distributed. Launched by
`torchrun` (or `srun`, which sets the same variables through scripts/slurm.sh), it joins the group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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


def init(device_kind: str) -> DistInfo:
    """Join the process group if launched by torchrun; NCCL for CUDA, Gloo for CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    if info.distributed and not torch_dist.is_initialized():
        if device_kind == "cuda":
            torch.cuda.set_device(info.local_rank)
        torch_dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return info


def cleanup() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


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
