"""The one interface between the training loop and a parallelism engine.

The loop (train/pretrain.py) owns everything that decides the result: data order, masks, the loss
scaling for accumulation, the learning-rate schedule and the clipping threshold. An engine only decides
where parameters, gradients and optimizer state live and how gradients are reduced, so the same config
trains alike on every engine and any number of ranks (within float tolerance).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class Engine(ABC):
    """Wraps the model and optimizer of one rank. Every method is called by every rank, in the same order."""

    name: str
    """The system.strategy value, e.g. "ddp"."""
    hf_model: nn.Module
    """The Hugging Face model being trained (its parameters may be sharded or low-precision copies)."""

    @abstractmethod
    def forward_backward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor, accum: int, last: bool
    ) -> torch.Tensor:
        """Forward and backward of one micro-batch with the loss divided by `accum`, so the accumulated
        gradient is that of the mean loss. Gradients are reduced across ranks no later than the `last`
        micro-batch. Returns the scaled loss, detached, on the device (no host synchronisation)."""

    @abstractmethod
    def step(self, lr: float, grad_clip: float) -> torch.Tensor:
        """Clip the global gradient norm to grad_clip (0: no clipping), take one optimizer step at
        learning rate `lr`, zero the gradients. Returns the norm before clipping, as a device tensor."""

    @abstractmethod
    def eval_loss(self, input_ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean masked-LM loss of a batch without gradients (every rank calls it with the same batch)."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Model and optimizer state for torch.distributed.checkpoint: sharded where the engine shards,
        keyed by parameter name, so a checkpoint loads on any number of ranks."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` gave (the dict is the one `state_dict` returned, filled in place by DCP)."""

    @abstractmethod
    def export_model(self) -> nn.Module | None:
        """On the main rank, a plain Hugging Face model holding the full fp32 weights, for the HF export;
        None on the other ranks. A collective: every rank calls it."""

    def train(self, mode: bool = True) -> None:
        self.hf_model.train(mode)
