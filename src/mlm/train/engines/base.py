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


def hf_model_from_full_state(config, full: dict[str, torch.Tensor]) -> nn.Module:
    """A plain Hugging Face masked LM (on the CPU) holding `full`, the gathered weights as MaskedLMLoss names
    them ("hf_model.…"); a tied weight (the MLM decoder is the word embedding) may be listed once."""
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict({k.removeprefix("hf_model."): v for k, v in full.items()}, strict=False)
    assert not unexpected and all(k in _tied_keys(model) for k in missing), (missing, unexpected)
    return model


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that are other names of a parameter already listed under another key."""
    seen, tied = set(), set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(key)
        seen.add(id(tensor))
    return tied


class Engine(ABC):
    """Wraps the model and optimizer of one rank. Every method is called by every rank, in the same order."""

    name: str
    """The system.strategy value, e.g. "ddp"."""
    hf_model: nn.Module
    """The Hugging Face model being trained (its parameters may be sharded or low-precision copies)."""
    skips_non_finite_steps: bool = False
    """Whether `step` leaves the weights and optimizer state unchanged when the gradient norm is NaN or
    infinite; the loop tolerates train.max_bad_steps such steps in a row only then."""

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
        learning rate `lr` (skipped if the norm is not finite and the engine `skips_non_finite_steps`), zero
        the gradients. Returns the norm before clipping, as a device tensor (infinite for a skipped step)."""

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

    def copy_state(self) -> object:
        """An in-memory copy of the model and optimizer state, to take steps back with `restore_state`
        (train.budget times its first steps this way)."""
        return _clone(self.state_dict())

    def restore_state(self, saved: object) -> None:
        """Put back what `copy_state` copied: the next step is the one that followed the copy."""
        self.load_state_dict(saved)

    def train(self, mode: bool = True) -> None:
        self.hf_model.train(mode)


def _clone(value):
    """A deep copy of nested dicts/lists of tensors that shares no storage with the original."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value
