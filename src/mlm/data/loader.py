"""This rank's token batch of each training step, on the device, read ahead of time.

While step t computes on the device, a background thread reads step t + 1's windows from the memory-mapped
shards and pins them (on a GPU), so the host-to-device copy at the start of step t + 1 is asynchronous and
the step never waits on disk or on numpy. The batch of a step depends only on the step number (the
sampler), so reading ahead changes nothing about what is trained on.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from mlm.data.stream import Sampler


class BatchLoader:
    def __init__(self, windows, sampler: Sampler, rank: int, world_size: int, device: torch.device, prefetch: bool = True):
        self.windows, self.sampler, self.rank, self.world_size, self.device = windows, sampler, rank, world_size, device
        self.pin = device.type == "cuda"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlm-prefetch") if prefetch else None
        self._ahead: tuple[int, Future] | None = None  # (step, its batch being read)

    def read(self, step: int) -> torch.Tensor:
        """This rank's slice of the global batch of `step`, on the host (pinned for a GPU): (rows, T) int64."""
        ids = self.sampler.rank_batch_ids(step, self.rank, self.world_size)
        batch = torch.from_numpy(self.windows.batch(ids))
        return batch.pin_memory() if self.pin else batch

    def get(self, step: int) -> torch.Tensor:
        """The batch of `step` on the device; starts reading step + 1's."""
        if self._ahead is not None and self._ahead[0] == step:
            batch = self._ahead[1].result()
        else:  # the first step, or a jump (resume, evaluation order): read it now
            batch = self.read(step)
        if self._pool is not None:
            self._ahead = (step + 1, self._pool.submit(self.read, step + 1))
        return batch.to(self.device, non_blocking=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool, self._ahead = None, None
