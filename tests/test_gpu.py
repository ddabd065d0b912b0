"""On a CUDA GPU: bf16 + torch.compile train with every engine, and the checkpoint still loads in plain transformers."""

import importlib.util

import pytest
import torch
from transformers import AutoModelForMaskedLM

from mlm.train.metrics import read_metrics
from mlm.train.pretrain import pretrain

from conftest import tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed"])
def test_compiled_bf16_training_on_gpu(strategy, data_dirs, tmp_path):
    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run", steps=40)
    cfg.system.device, cfg.system.compile, cfg.system.precision = "cuda", "on", "bf16"
    cfg.system.strategy = strategy
    if strategy == "deepspeed":  # the reference file as is: bf16 on
        cfg.system.precision, cfg.system.deepspeed_config = "auto", "configs/deepspeed/zero2.json"
    pretrain(cfg, log=lambda _: None)
    losses = [m["loss"] for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    # Saved from the unwrapped model: no `_orig_mod.` prefixes, loads as is.
    model = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "run" / "checkpoint-40"))
    assert not any("_orig_mod" in k for k in model.state_dict())
