"""Parallelism engines behind one interface (base.Engine); `build_engine` picks one from system.strategy."""

from __future__ import annotations

import importlib.metadata

import torch
from torch import nn

from mlm.config import PretrainConfig
from mlm.dist import DistInfo
from mlm.errors import UserError
from mlm.train.engines.base import Engine
from mlm.train.optim import build_optimizer

DEEPSPEED_MIN = (0, 18, 3)  # 0.17.6–0.18.2 compute wrong ZeRO-2 gradients


def check_deepspeed() -> None:
    """Refuse a missing or known-bad deepspeed before anything is written."""
    try:
        version = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        raise UserError('system.strategy=deepspeed needs DeepSpeed: pip install "mlm[deepspeed]"') from None
    numbers = tuple(int(part) for part in version.split("+")[0].split(".")[:3] if part.isdigit())
    if numbers < DEEPSPEED_MIN:
        raise UserError(
            f"deepspeed {version} is installed; mlm needs >= 0.18.3 (0.17.6–0.18.2 compute wrong ZeRO-2 "
            'gradients): pip install -U "mlm[deepspeed]"'
        )


def build_engine(
    strategy: str,
    cfg: PretrainConfig,
    hf_model: nn.Module,
    device: torch.device,
    info: DistInfo,
    compile: bool,
    autocast_dtype: torch.dtype | None,
    ds_config: dict | None = None,
) -> Engine:
    """Wrap a model (already on its device) and its AdamW in the chosen engine; with `compile`, torch.compile
    in system.compile_mode."""
    compile_mode = cfg.system.compile_mode if compile else None

    def optimizer_factory(model: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(model, cfg.train, fused=device.type == "cuda" and cfg.system.fused_optimizer)

    if strategy == "ddp":
        from mlm.train.engines.torch_engines import DDPEngine

        return DDPEngine(hf_model, optimizer_factory, device, info.distributed, compile_mode, autocast_dtype)
    if strategy == "fsdp":
        from mlm.train.engines.torch_engines import FSDPEngine

        return FSDPEngine(hf_model, optimizer_factory, device, compile_mode, autocast_dtype, cfg.system.fsdp_reshard_after_forward)
    if strategy == "deepspeed":
        from mlm.train.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(hf_model, optimizer_factory, ds_config, device, compile_mode)
    raise UserError(f"system.strategy: unknown engine {strategy!r}")
