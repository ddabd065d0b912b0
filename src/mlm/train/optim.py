"""AdamW with the reference's settings, and the learning-rate schedules.

A schedule is a plain function of the step: the training loop sets the learning rate before every optimizer
step, on every engine, so there is no scheduler state to save and no second schedule. Every schedule warms
up linearly from 0 to train.lr over train.warmup_steps steps; then

    linear   decays linearly to train.min_lr at train.steps (the reference)
    cosine   follows half a cosine down to train.min_lr at train.steps
    wsd      stays at train.lr, then decays to train.min_lr over the last train.decay_steps steps, linearly
             or as 1 − sqrt (train.decay_shape)

Step k (0-based) trains at the rate of k; the rate "at train.steps", after the last step, would be min_lr.
"""

from __future__ import annotations

import math

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


def decay_start(train: TrainConfig) -> int:
    """The first step whose rate depends on where the run ends: the end of the warm-up (linear, cosine), or
    train.steps − train.decay_steps (wsd). The steps before it train alike whatever the run's length."""
    if train.schedule == "wsd":
        return train.steps - train.decay_steps
    return train.warmup_steps


def decay_factor(step: int, train: TrainConfig) -> float:
    """After the warm-up: the share of (lr − min_lr) that `step` keeps, 1 at the top, falling towards 0."""
    if train.schedule == "linear":  # lr_factor's decay, so that min_lr = 0 gives the reference's rates exactly
        return lr_factor(step, train.warmup_steps, train.steps)
    start = decay_start(train)
    if step < start:  # wsd's stable phase
        return 1.0
    length = train.steps - start  # at least 1 under wsd (decay_steps >= 1)
    if train.schedule == "cosine":
        length = max(1, length)
    done = min(1.0, (step - start) / length)  # the fraction of the decay behind this step
    if train.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * done))
    if train.decay_shape == "1-sqrt":
        return 1.0 - math.sqrt(done)
    return 1.0 - done


def learning_rate(step: int, train: TrainConfig) -> float:
    """The learning rate of 0-based `step` under train.schedule: the one rate every engine is given."""
    if step < train.warmup_steps:
        return train.lr * ((step + 1) / train.warmup_steps)
    return train.min_lr + (train.lr - train.min_lr) * decay_factor(step, train)
