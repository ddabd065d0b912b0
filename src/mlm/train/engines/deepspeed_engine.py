"""DeepSpeed (`deepspeed`): the user's DeepSpeed JSON (ZeRO stage 1 or 2), e.g. the reference's zero2.json.

DeepSpeed keeps fp32 master weights and Adam state partitioned over the ranks and, with bf16 on, trains
a bf16 copy of the model. Its checkpoints are tied to the world size, so this engine saves the full fp32
weights and Adam moments by parameter name instead (gathered with DeepSpeed's own safe_get_full_*
functions) and scatters them back at load time with safe_set_full_*: a run resumes on any number of
ranks with its optimizer state intact. Imported only when chosen: deepspeed is an optional extra.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from mlm.model.build import MaskedLMLoss
from mlm.train.engines.base import Engine, hf_model_from_full_state

MOMENTS = ("exp_avg", "exp_avg_sq")  # the Adam state DeepSpeed partitions (besides the step count)


def op_build_notice(device: torch.device) -> str | None:
    """On a CPU, DeepSpeed compiles a C++ communication op (deepspeed_shm_comm) the first time it starts its
    process group, minutes of silence; later runs load it from torch's extensions cache. The line that says so
    before it starts, or None when it is built already (or not used: on a GPU)."""
    if device.type != "cpu":
        return None
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return None
    built = Path(_get_build_directory(builder.name, verbose=False)) / f"{builder.name}.so"
    if built.is_file():
        return None
    return (f"deepspeed: compiling its CPU communication op {builder.name} once (about 2 minutes); later runs "
            f"load it from {built.parent}")


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, hf_model: nn.Module, optimizer_factory, ds_config: dict, device: torch.device, compile_mode: str | None):
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
        import deepspeed

        self.hf_model, self.device = hf_model, device
        self.loss_model = MaskedLMLoss(hf_model)
        # Our AdamW (no decay on biases/LayerNorm) and our schedule, never ones from the JSON
        # (resolve_deepspeed_config removed them after checking they map onto ours).
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.loss_model, optimizer=optimizer_factory(hf_model), config=ds_config, dist_init_required=False
        )
        if compile_mode:
            self.engine.compile(compile_kwargs={"mode": compile_mode})
        self.parameters = list(self.loss_model.named_parameters())  # shared (tied) weights listed once
        # DeepSpeed's ZeRO optimizer skips a step with non-finite gradients when it checks for overflow: with
        # bf16, bf16.check_grad_overflow (resolve_deepspeed_config sets it unless the JSON says otherwise).
        self.skips_non_finite_steps = bool(getattr(self.optimizer, "check_grad_overflow", False))

    def forward_backward(self, input_ids, positions, labels, accum, last):
        loss = self.engine(input_ids, positions, labels)
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps (= accum) itself
        if not last:
            self.engine.step()  # counts the micro-batch; DeepSpeed updates only at the accumulation boundary
        return loss.detach() / accum

    def step(self, lr, grad_clip):
        # Clipping to grad_clip happens inside DeepSpeed's optimizer: the JSON's gradient_clipping is ours.
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        if getattr(self.optimizer, "overflow", False):  # DeepSpeed skipped the step (its own host-side flag)
            return torch.tensor(float("inf"), device=self.device)
        norm = self.engine.get_global_grad_norm()  # before clipping; a device tensor: no host sync here
        if norm is None:
            return torch.tensor(float("nan"))
        return norm.detach() if torch.is_tensor(norm) else torch.tensor(float(norm))

    @torch.no_grad()
    def eval_loss(self, input_ids, positions, labels):
        return self.engine(input_ids, positions, labels).float()

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    # ---- checkpoints: full fp32 tensors by name, any world size -----------------------------------
    def _base_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer.optimizer  # our AdamW inside DeepSpeed's ZeRO optimizer, on flat fp32 partitions

    def _link_optimizer_state(self) -> None:
        """Point every parameter's fragment at the Adam state of its flat partition. DeepSpeed links them
        after its first step, but only for the groups stepped by then: with two parameter groups (decay,
        no decay) the second stays unlinked, so link all of them here."""
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        zero = self.optimizer
        for lp_params, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(lp_params, flat, zero.optimizer.state)

    def state_dict(self) -> dict:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        started = bool(self._base_optimizer().state)  # torch's AdamW creates its state at the first step
        if started:
            self._link_optimizer_state()
        model, moments = {}, {key: {} for key in MOMENTS}
        for name, param in self.parameters:  # collectives: every rank walks the same list
            model[name] = safe_get_full_fp32_param(param).cpu()
            for key in MOMENTS:
                value = safe_get_full_optimizer_state(param, key) if started else None
                moments[key][name] = value.cpu() if value is not None else torch.zeros_like(model[name])
        step = next(iter(self._base_optimizer().state.values()))["step"] if started else torch.tensor(0.0)
        return {"model": model, "optimizer": {**moments, "step": step.detach().cpu().float()}}

    def load_state_dict(self, state: dict) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        base = self._base_optimizer()
        for group in base.param_groups:  # create the state torch's AdamW would create at its first step
            for flat in group["params"]:
                on_device = group.get("fused") or group.get("capturable")
                step = state["optimizer"]["step"].to(flat.device if on_device else "cpu")
                base.state[flat] = {"step": step.clone(), **{key: torch.zeros_like(flat) for key in MOMENTS}}
        self._link_optimizer_state()
        for name, param in self.parameters:
            safe_set_full_fp32_param(param, state["model"][name].to(self.device))
            for key in MOMENTS:
                safe_set_full_optimizer_state(param, state["optimizer"][key][name].to(self.device), key)
        self.optimizer.update_lp_params()  # the (bf16) model copy from the restored fp32 masters

    def export_model(self):
        from deepspeed.utils import safe_get_full_fp32_param

        full = {name: safe_get_full_fp32_param(param).cpu() for name, param in self.parameters}
        if torch.distributed.get_rank() != 0:
            return None
        return hf_model_from_full_state(self.hf_model.config, full)
