"""AdamW with the reference's settings and a linear warm-up / linear decay schedule.

The schedule is a plain function of the step: the training loop sets the learning rate before every
optimizer step, on every engine, so there is no scheduler state to save and no second schedule."""

from __future__ import annotations

import torch
from torch import nn

from mlm.config import TrainConfig
from mlm.model.build import weight_decay_groups


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW; biases and LayerNorm weights get no weight decay."""
    groups = weight_decay_groups(model, cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak LR at 0-based `step`: linear warm-up to 1, then linear decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
