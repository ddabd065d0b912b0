"""PyTorch's own engines: one plain process or DDP (`ddp`), and FSDP2 (`fsdp`).

Both hand torch.distributed.checkpoint the state dicts of `get_state_dict`, which name every tensor by
its parameter name whatever the wrapping (DDP's `module.` prefix, FSDP2's DTensor shards), so a
checkpoint of either engine loads on any number of ranks and under the other one.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from mlm.model.build import MaskedLMLoss
from mlm.train.engines.base import Engine, hf_model_from_full_state


class _TorchEngine(Engine):
    """What ddp and fsdp share: torch's AdamW stepped at the loop's learning rate, clipping with
    clip_grad_norm_, autocast, and state dicts by parameter name."""

    loss_model: MaskedLMLoss
    optimizer: torch.optim.Optimizer
    device: torch.device
    autocast_dtype: torch.dtype | None

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    skips_non_finite_steps = True

    def step(self, lr, grad_clip):
        grad_norm = torch.nn.utils.clip_grad_norm_(self.hf_model.parameters(), grad_clip if grad_clip > 0 else math.inf)
        # Over sharded (DTensor) parameters the norm is a DTensor, the same on every rank: the loop wants a plain tensor.
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.optimizer.defaults.get("fused"):
            # AdamW's fused kernel skips the whole update (weights, moments, step count) on the device when
            # found_inf is 1: the input torch's GradScaler uses. No host sync.
            self.optimizer.found_inf = (~torch.isfinite(grad_norm)).float()
            self.optimizer.step()
        elif torch.isfinite(grad_norm).item():  # foreach AdamW has no such input: one host sync per step
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @torch.no_grad()
    def eval_loss(self, input_ids, positions, labels):
        # The uncompiled module (evaluation shapes would recompile a compiled one); under fsdp every rank
        # takes part in its gathers.
        with self._autocast():
            return self.loss_model(input_ids, positions, labels)

    def state_dict(self):
        model, optimizer = get_state_dict(self.loss_model, self.optimizer)
        return {"model": model, "optimizer": optimizer}

    def copy_state(self):
        # Not through state_dict: get_state_dict gives a fresh optimizer its state by taking a step with
        # zero gradients, which would count one step more in AdamW's bias correction.
        return [p.detach().clone() for p in self.loss_model.parameters()], copy.deepcopy(self.optimizer.state_dict())

    @torch.no_grad()
    def restore_state(self, saved):
        params, optimizer = saved
        for param, value in zip(self.loss_model.parameters(), params):
            param.copy_(value)
        self.optimizer.load_state_dict(optimizer)

    def load_state_dict(self, state):
        set_state_dict(self.loss_model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


class DDPEngine(_TorchEngine):
    """Replicated weights; with several ranks, DistributedDataParallel all-reduces the gradients once per
    optimizer step (accumulation micro-batches run under no_sync)."""

    name = "ddp"

    def __init__(self, hf_model: nn.Module, optimizer_factory, device: torch.device, distributed: bool,
                 compile_mode: str | None, autocast_dtype: torch.dtype | None):
        self.hf_model, self.device, self.autocast_dtype = hf_model, device, autocast_dtype
        self.optimizer = optimizer_factory(hf_model)
        self.loss_model = MaskedLMLoss(hf_model)
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        train_module: nn.Module = self.loss_model
        if distributed:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.loss_model, device_ids=[device.index] if device.type == "cuda" else None
            )
            train_module = self.ddp
        # Compile after wrapping: DDP then splits the graph at its gradient buckets, so the all-reduce of
        # one bucket overlaps the backward of the next (compiling first would hide the hooks from DDP).
        self.train_module = torch.compile(train_module, mode=compile_mode) if compile_mode else train_module

    def forward_backward(self, input_ids, positions, labels, accum, last):
        sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()
        with sync:
            with self._autocast():
                loss = self.train_module(input_ids, positions, labels) / accum
            loss.backward()
        return loss.detach()

    def export_model(self):
        return self.hf_model  # every rank holds the full fp32 weights; only the main rank writes them


class FSDPEngine(_TorchEngine):
    """FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the ranks; each
    encoder layer is one shard group (gathered just before it runs), the rest (embeddings, the tied
    MLM decoder, the head) is the root group, so the tied word-embedding / decoder weight stays whole in
    one group. reshard_after_forward=False keeps gathered layers until their backward (ZeRO-2-like)."""

    name = "fsdp"

    def __init__(self, hf_model: nn.Module, optimizer_factory, device: torch.device, compile_mode: str | None,
                 autocast_dtype: torch.dtype | None, reshard_after_forward: bool):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.hf_model, self.device = hf_model, device
        self.loss_model = MaskedLMLoss(hf_model)
        # On a GPU, bf16 runs as FSDP's mixed precision (bf16 compute copies of fp32 shards, gradients
        # reduced in fp32) rather than autocast; on the CPU autocast remains.
        use_policy = autocast_dtype is not None and device.type == "cuda"
        self.autocast_dtype = None if use_policy else autocast_dtype
        policy = MixedPrecisionPolicy(param_dtype=autocast_dtype, reduce_dtype=torch.float32) if use_policy else MixedPrecisionPolicy()
        for layer in self.loss_model.family.encoder_layers(hf_model):
            if compile_mode:  # per layer, in place (names unchanged), before sharding: hooks stay outside the graphs
                layer.compile(mode=compile_mode)
            fully_shard(layer, reshard_after_forward=reshard_after_forward, mp_policy=policy)
        fully_shard(self.loss_model, reshard_after_forward=reshard_after_forward, mp_policy=policy)
        # The optimizer is built on the sharded (DTensor) parameters, so its state is sharded too.
        self.optimizer = optimizer_factory(hf_model)

    def forward_backward(self, input_ids, positions, labels, accum, last):
        # Accumulate unsharded gradients locally; reduce-scatter once, in the last micro-batch's backward.
        self.loss_model.set_requires_gradient_sync(last)
        with self._autocast():
            loss = self.loss_model(input_ids, positions, labels) / accum
        loss.backward()
        return loss.detach()

    def export_model(self):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(self.loss_model, options=options)  # gathered on the main rank only
        return hf_model_from_full_state(self.hf_model.config, full) if full else None
