"""resolve_deepspeed_config: "auto" filled from our config, contradictions refused by name. No process group."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mlm.config import PretrainConfig, load_config
from mlm.errors import UserError
from mlm.train.deepspeed_config import QUIET_STEPS_PER_PRINT, resolve_deepspeed_config
from mlm.train.optim import lr_factor

ZERO2 = Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / "zero2.json"
ACCUM = 2  # 32 sequences = 4 per micro-batch × 2 accumulation steps × 4 ranks


def small_config(*overrides: str) -> PretrainConfig:
    return load_config(
        None,
        [
            "--train.steps=100",
            "--train.warmup_steps=10",
            "--train.global_batch=32",
            "--train.lr=5e-4",
            "--train.grad_clip=0.5",
            "--system.micro_batch=4",
            "--system.precision=bf16",
            *overrides,
        ],
    )


def write(tmp_path: Path, ds: object) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return path


def zero2(**changes: object) -> dict:
    ds = json.loads(ZERO2.read_text())
    ds.update(changes)
    return ds


def refused(tmp_path: Path, ds: object, cfg: PretrainConfig | None = None, device_type: str = "cuda") -> str:
    path = write(tmp_path, ds)
    with pytest.raises(UserError) as e:
        resolve_deepspeed_config(path, cfg or small_config(), ACCUM, device_type)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    return message


def test_shipped_zero2_is_accepted_and_filled():
    ds = resolve_deepspeed_config(ZERO2, small_config(), ACCUM, "cuda")
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == ACCUM
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True}  # a non-finite step is skipped
    assert ds["fp16"] == {"enabled": False}
    assert "scheduler" not in ds and "optimizer" not in ds
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["reduce_bucket_size"] == 2e8
    assert ds["steps_per_print"] == QUIET_STEPS_PER_PRINT and ds["wall_clock_breakdown"] is False
    assert "auto" not in json.dumps(ds)


def test_shipped_zero2_with_auto_precision_keeps_the_file_s_bf16():
    ds = resolve_deepspeed_config(ZERO2, small_config("--system.precision=auto"), ACCUM, "cpu")
    assert ds["bf16"]["enabled"] is True


def test_absent_and_auto_values_follow_our_config(tmp_path):
    path = write(tmp_path, {"zero_optimization": {"stage": 1}, "bf16": {"enabled": "auto"}, "steps_per_print": 5})
    cfg = small_config("--system.precision=auto", "--train.grad_clip=0")
    ds = resolve_deepspeed_config(path, cfg, ACCUM, "cpu")
    assert ds["bf16"]["enabled"] is False  # precision auto on CPU is fp32
    assert ds["gradient_clipping"] == 0.0  # our 0 = no clipping = DeepSpeed's 0.0
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == ACCUM
    assert ds["steps_per_print"] == 5  # an explicit value is left alone
    assert resolve_deepspeed_config(path, cfg, ACCUM, "cuda")["bf16"]["enabled"] is True


def test_bf16_skips_non_finite_steps_unless_the_file_says_otherwise(tmp_path):
    path = write(tmp_path, {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True, "check_grad_overflow": False}})
    assert resolve_deepspeed_config(path, small_config(), ACCUM, "cuda")["bf16"]["check_grad_overflow"] is False


def test_explicit_values_that_agree_are_accepted(tmp_path):
    path = write(tmp_path, zero2(train_batch_size=32.0, train_micro_batch_size_per_gpu=4, gradient_clipping=0.5))
    assert resolve_deepspeed_config(path, small_config(), ACCUM, "cuda")["train_batch_size"] == 32.0


def test_contradicting_micro_batch_is_refused_by_name(tmp_path):
    message = refused(tmp_path, zero2(train_micro_batch_size_per_gpu=16))
    assert "train_micro_batch_size_per_gpu=16 contradicts system.micro_batch=4" in message


def test_contradicting_accumulation_and_clipping_are_refused(tmp_path):
    assert "gradient_accumulation_steps=4 contradicts" in refused(tmp_path, zero2(gradient_accumulation_steps=4))
    assert "gradient_clipping=1.0 contradicts train.grad_clip=0.5" in refused(tmp_path, zero2(gradient_clipping=1.0))


def test_bf16_true_with_fp32_precision_is_refused_naming_both(tmp_path):
    message = refused(tmp_path, zero2(), small_config("--system.precision=fp32"))
    assert "bf16.enabled=true contradicts system.precision=fp32" in message


def test_bf16_false_with_bf16_precision_is_refused(tmp_path):
    message = refused(tmp_path, zero2(bf16={"enabled": False}))
    assert "bf16.enabled=false contradicts system.precision=bf16" in message


def test_fp16_is_refused(tmp_path):
    assert "fp16.enabled=true" in refused(tmp_path, zero2(fp16={"enabled": True}, bf16={"enabled": False}))


def test_leftover_auto_in_an_unknown_key_is_refused_by_name(tmp_path):
    ds = zero2()
    ds["zero_optimization"]["stage3_prefetch_bucket_size"] = "auto"
    message = refused(tmp_path, ds)
    assert 'zero_optimization.stage3_prefetch_bucket_size is "auto" and mlm has no value for it' in message


def test_log_warmup_is_refused(tmp_path):
    ds = zero2()
    del ds["scheduler"]["params"]["warmup_type"]
    assert "logarithmically" in refused(tmp_path, ds)
    ds["scheduler"]["params"]["warmup_type"] = "log"
    assert "scheduler.params.warmup_type" in refused(tmp_path, ds)


def test_scheduler_values_must_match_ours(tmp_path):
    ds = zero2()
    ds["scheduler"]["params"]["total_num_steps"] = 200
    assert "scheduler.params.total_num_steps=200 contradicts train.steps=100" in refused(tmp_path, ds)
    ds = zero2()
    ds["scheduler"]["params"]["warmup_max_lr"] = 5e-4  # explicit but equal: fine
    ds["scheduler"]["params"]["warmup_num_steps"] = 10
    assert "scheduler" not in resolve_deepspeed_config(write(tmp_path, ds), small_config(), ACCUM, "cuda")
    assert "scheduler.type" in refused(tmp_path, zero2(scheduler={"type": "WarmupCosineLR", "params": {}}))


@pytest.mark.parametrize("stage", [0, 3])
def test_zero_stages_other_than_1_and_2_are_refused(tmp_path, stage):
    ds = zero2()
    ds["zero_optimization"]["stage"] = stage
    message = refused(tmp_path, ds)
    assert f"zero_optimization.stage={stage}" in message and "system.strategy=fsdp" in message


def test_missing_zero_section_is_refused(tmp_path):
    ds = zero2()
    del ds["zero_optimization"]
    assert "zero_optimization.stage is missing" in refused(tmp_path, ds)


def test_mapped_optimizer_is_accepted_and_removed(tmp_path):
    optimizer = {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": "auto", "torch_adam": True},
    }
    ds = resolve_deepspeed_config(write(tmp_path, zero2(optimizer=optimizer)), small_config(), ACCUM, "cuda")
    assert "optimizer" not in ds and "scheduler" not in ds


def test_optimizer_that_contradicts_ours_is_refused(tmp_path):
    adam_l2 = {"type": "adam", "params": {"adam_w_mode": False}}
    assert "optimizer.params.adam_w_mode=false" in refused(tmp_path, zero2(optimizer=adam_l2))
    betas = {"type": "Adam", "params": {"betas": [0.9, 0.999]}}
    assert "optimizer.params.betas=[0.9, 0.999] contradicts train.betas" in refused(tmp_path, zero2(optimizer=betas))
    lamb = {"type": "Lamb", "params": {}}
    assert "optimizer.type" in refused(tmp_path, zero2(optimizer=lamb))
    amsgrad = {"type": "AdamW", "params": {"amsgrad": True}}
    assert "optimizer.params.amsgrad" in refused(tmp_path, zero2(optimizer=amsgrad))


def test_missing_file_invalid_json_and_non_object_are_user_errors(tmp_path):
    cfg = small_config()
    with pytest.raises(UserError, match="does not exist"):
        resolve_deepspeed_config(tmp_path / "nope.json", cfg, ACCUM, "cuda")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(UserError, match="not valid JSON"):
        resolve_deepspeed_config(bad, cfg, ACCUM, "cuda")
    with pytest.raises(UserError, match="JSON object"):
        resolve_deepspeed_config(write(tmp_path, [1, 2]), cfg, ACCUM, "cuda")


def test_deepspeed_warmup_decay_lags_our_schedule():
    """DeepSpeed's engine reads the lr for optimizer step k, then calls scheduler.step() after that step.

    Its WarmupDecayLR starts at 0, gives 0 again at step 1, then (k-1)/W: two steps behind our (k+1)/W during
    warm-up, and one step behind ours in the decay. That is why mlm drops the scheduler and sets the lr itself.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    lr_schedules = pytest.importorskip("deepspeed.runtime.lr_schedules")
    import torch

    lr, warmup, total = 0.5, 4, 12
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = lr_schedules.WarmupDecayLR(
        optimizer, total_num_steps=total, warmup_min_lr=0.0, warmup_max_lr=lr, warmup_num_steps=warmup,
        warmup_type="linear",
    )
    theirs = []
    for _ in range(total):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    ours = [lr * lr_factor(k, warmup, total) for k in range(total)]

    assert theirs[0] == theirs[1] == 0.0
    for k in range(2, warmup + 1):  # warm-up: two steps behind
        assert theirs[k] == pytest.approx(ours[k - 2])
        assert theirs[k] == pytest.approx(lr * (k - 1) / warmup)
    for k in range(warmup + 1, total):  # decay: one step behind
        assert theirs[k] == pytest.approx(ours[k - 1])
    assert max(theirs) == pytest.approx(lr) and theirs.index(max(theirs)) == warmup + 1  # ours peaks at W-1
    assert ours.index(max(ours)) == warmup - 1


# ---- the file as DeepSpeed reads it, before anything is built ------------------------------------------------

needs_deepspeed = pytest.mark.skipif(
    __import__("importlib").util.find_spec("deepspeed") is None, reason="DeepSpeed's own config models are needed"
)


@needs_deepspeed
def test_a_misspelt_top_level_key_is_refused_naming_the_closest(tmp_path):
    # DeepSpeed ignores a key it does not know: clipping would stay at its default 1.0 in silence.
    message = refused(tmp_path, zero2(gradient_clippin=0.5))
    assert "gradient_clippin is not a DeepSpeed setting (did you mean gradient_clipping?)" in message
    assert "is not a DeepSpeed setting" in refused(tmp_path, zero2(my_own_notes="hi"))


@needs_deepspeed
def test_every_key_deepspeed_reads_is_known():
    from mlm.train.deepspeed_config import deepspeed_keys

    known = deepspeed_keys()  # what DeepSpeed's own config code asks a file for
    assert {"train_batch_size", "gradient_clipping", "zero_optimization", "bf16", "fp16", "optimizer", "scheduler",
            "steps_per_print", "wall_clock_breakdown", "tensorboard", "activation_checkpointing"} <= known
    assert set(json.loads(ZERO2.read_text())) <= known


@needs_deepspeed
def test_unknown_and_wrong_zero_settings_are_refused_by_name(tmp_path):
    ds = zero2()
    ds["zero_optimization"]["reduce_bucket_sise"] = 5e8
    assert ("zero_optimization.reduce_bucket_sise is not a DeepSpeed setting (did you mean reduce_bucket_size?)"
            in refused(tmp_path, ds))
    ds = zero2()
    ds["zero_optimization"]["overlap_comm"] = {"yes": 1}
    assert "zero_optimization.overlap_comm: Input should be a valid boolean" in refused(tmp_path, ds)
    ds = zero2()
    ds["bf16"]["enabeld"] = True
    assert "bf16.enabeld is not a DeepSpeed setting (did you mean enabled?)" in refused(tmp_path, ds)
    assert "zero_optimization must be an object, got 2" in refused(tmp_path, zero2(zero_optimization=2))


@needs_deepspeed
@pytest.mark.parametrize("offload", [{"offload_optimizer": {"device": "cpu"}}, {"cpu_offload": True}])
def test_zero_offload_with_our_adamw_is_refused(tmp_path, offload):
    ds = zero2()
    ds["zero_optimization"].update(offload)
    message = refused(tmp_path, ds)
    assert "zero_optimization.offload_optimizer (device cpu) is not supported" in message and "AdamW" in message
    ds["zero_optimization"].pop("cpu_offload", None)
    ds["zero_optimization"]["offload_optimizer"] = {"device": "none"}  # DeepSpeed's "no offload": fine
    resolve_deepspeed_config(write(tmp_path, ds), small_config(), ACCUM, "cuda")


@needs_deepspeed
def test_pretrain_refuses_a_bad_file_before_reading_data_or_building_the_model(tmp_path):
    from mlm.train.pretrain import pretrain

    ds = zero2()
    ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    cfg = small_config("--system.strategy=deepspeed", f"--system.deepspeed_config={write(tmp_path, ds)}",
                       "--system.device=cpu", f"--data.data_dir={tmp_path / 'no-data-here'}",
                       f"--run.out_dir={tmp_path / 'run'}")
    with pytest.raises(UserError, match=r"offload_optimizer \(device cpu\) is not supported"):
        pretrain(cfg, log=lambda _: None)  # not "no-data-here does not exist": the file is checked first
    assert not (tmp_path / "run").exists()


def test_check_deepspeed_config_leaves_only_the_micro_batch_for_later(tmp_path):
    from mlm.train.deepspeed_config import check_deepspeed_config

    check_deepspeed_config(ZERO2, small_config("--system.micro_batch=auto"), "cuda")
    ds = zero2()
    ds["zero_optimization"]["stage"] = 3
    with pytest.raises(UserError, match=r"zero_optimization.stage=3"):
        check_deepspeed_config(write(tmp_path, ds), small_config("--system.micro_batch=auto"), "cuda")
    with pytest.raises(UserError, match=r"gradient_clipping=0.25 contradicts train.grad_clip=0.5"):
        check_deepspeed_config(write(tmp_path, zero2(gradient_clipping=0.25)), small_config(), "cuda")
