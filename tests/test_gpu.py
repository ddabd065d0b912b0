"""On a CUDA GPU: bf16 autocast + torch.compile train, and the checkpoint still matches plain transformers."""

import pytest
import torch
from transformers import AutoModelForMaskedLM

from mlm.train.metrics import read_metrics
from mlm.train.pretrain import pretrain

from conftest import tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_compiled_bf16_training_on_gpu(data_dirs, tmp_path):
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run", steps=40)
    cfg.system.device, cfg.system.compile, cfg.system.precision = "cuda", "on", "bf16"
    pretrain(cfg, log=lambda _: None)
    losses = [m["loss"] for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    # Saved from the unwrapped model: no `_orig_mod.` prefixes, loads as is.
    model = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "run" / "checkpoint-40"))
    assert not any("_orig_mod" in k for k in model.state_dict())
