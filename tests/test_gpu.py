"""On a CUDA GPU: bf16 + torch.compile train with every engine, and the checkpoint still loads in plain transformers."""

import importlib.util

import pytest
import torch
from transformers import AutoModelForMaskedLM

from mlm.train.metrics import read_metrics
from mlm.train.pretrain import pretrain

from conftest import poison_steps, tiny_config

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


def test_bench_with_baseline_on_gpu():
    """`mlm bench` on the GPU: compiled bf16 path beside the HF path, with the card's MFU when it is known."""
    from mlm.bench import bench, peak_tflops_of
    from mlm.config import load_config

    cfg = load_config("configs/roberta-medium.toml", [
        "--model.size=tiny", "--data.seq_len=128", "--model.max_positions=128", "--train.global_batch=64",
        "--system.micro_batch=auto", "--system.compile=on",
    ])
    result = bench(cfg, steps=3, warmup=2, baseline=True, synthetic=True, log=lambda _: None)
    assert result["device"] != "cpu" and result["precision"] == "bf16" and result["compiled"]
    assert result["tokens_per_s"] > 0 and result["baseline_tokens_per_s"] > 0
    assert 64 % result["micro_batch"] == 0 and result["peak_memory"] > 0
    if peak_tflops_of(torch.device("cuda")) is not None:
        assert 0 < result["mfu"] < 1


def test_no_host_synchronisation_inside_a_training_step(data_dirs, tmp_path):
    """After warm-up (compilation), a training step queues its work without waiting for the GPU: CUDA's sync
    debug mode raises on any synchronising call."""
    from mlm.train.pretrain import setup, train_step

    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run", steps=10)
    cfg.system.device, cfg.system.compile, cfg.system.precision = "cuda", "on", "bf16"
    s = setup(cfg, log=lambda _: None)
    try:
        for step in range(3):
            train_step(s, step)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            train_step(s, 3)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        s.batches.close()
        s.run_lock.release()


def test_compiled_cross_entropy_writes_no_fp32_logits():
    """MaskedLMLoss's cross-entropy (`F.cross_entropy(logits.float(), labels)` on bf16 logits) compiled: the
    fp32 upcast is fused into the loss's reductions, so a forward and backward over 8,192 masked positions ×
    50,265 words allocates bf16 logits and at most a bf16 gradient (2× one bf16 logits tensor, about 2.2× with
    the weight's gradient), never an fp32 copy (an fp32 tensor is 2× by itself, so 3× at least beside the bf16
    logits or an fp32 gradient). Eager PyTorch, measured the same way, does allocate the fp32 copy, so the
    measurement tells the two apart."""
    import torch.nn.functional as F

    positions, width, vocabulary = 8192, 512, 50265
    weight = torch.randn(vocabulary, width, device="cuda", requires_grad=True)
    bias = torch.zeros(vocabulary, device="cuda", requires_grad=True)
    labels = torch.randint(0, vocabulary, (positions,), device="cuda")

    def loss(hidden):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return F.cross_entropy(F.linear(hidden, weight, bias).float(), labels)

    def extra_memory(fn) -> int:
        hidden = torch.randn(positions, width, device="cuda", requires_grad=True)
        fn(hidden).backward()  # warm-up (compilation), then measure a second call
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(hidden).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    bf16_logits = positions * vocabulary * 2
    compiled = extra_memory(torch.compile(loss))
    eager = extra_memory(loss)
    torch._dynamo.reset()
    assert eager > 3 * bf16_logits  # bf16 logits + their fp32 copy + fp32 log-probabilities
    assert compiled < 2.8 * bf16_logits, f"{compiled / bf16_logits:.2f}× a bf16 logits tensor"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed"])
def test_a_nan_step_is_skipped_on_gpu(strategy, data_dirs, tmp_path):
    """bf16 on the GPU, each engine: step 5 gives NaN and is skipped (fused AdamW's found_inf on the device,
    or DeepSpeed's overflow check), so checkpoint-5 holds checkpoint-4's weights; training goes on."""
    from safetensors.torch import load_file

    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    run = tmp_path / "run"
    cfg = tiny_config(data_dirs["roberta"], run, steps=8)
    cfg.system.device, cfg.system.compile, cfg.system.precision, cfg.system.strategy = "cuda", "off", "bf16", strategy
    cfg.run.checkpoint_every, cfg.eval.every = 1, 0
    if strategy == "deepspeed":
        cfg.system.deepspeed_config = "configs/deepspeed/zero2.json"
    with poison_steps({5}):
        pretrain(cfg, log=lambda _: None)
    four, five = (load_file(str(run / f"checkpoint-{n}" / "model.safetensors")) for n in (4, 5))
    assert all(torch.equal(four[k], five[k]) for k in four)
    assert [m["step"] for m in read_metrics(run) if "bad_steps" in m] == [5]


@pytest.mark.parametrize("backend", ["flash", "cudnn"])
def test_the_compiled_training_step_runs_the_chosen_sdpa_kernel(backend):
    """`system.sdpa_backend=flash` (or cudnn) compiled, with dropout 0.1 in bf16: the training step runs, and the
    kernel its profiled step took is that one (a mask in the compiled graph made flash refuse: "No available
    kernel"). Compile caches are off: their key does not hold the SDPA setting, so a cached graph of another
    test could replay another kernel."""
    from mlm.bench import bench
    from mlm.config import load_config
    from mlm.train.kernels import available_sdpa_kernels

    refusal = available_sdpa_kernels(torch.device("cuda"))[backend]
    if refusal != "ok":
        pytest.skip(f"{backend} on this card and these libraries: {refusal}")
    cfg = load_config("configs/roberta-medium.toml", [
        "--model.size=tiny", "--data.seq_len=128", "--model.max_positions=128", "--train.global_batch=32",
        "--system.micro_batch=16", "--system.compile=on", f"--system.sdpa_backend={backend}",
    ])
    torch._dynamo.reset()
    try:
        with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
            result = bench(cfg, steps=1, warmup=1, synthetic=True, log=lambda _: None)
    finally:  # sdpa_backend is process-wide: every kernel allowed again for the tests after this one
        for enable in (torch.backends.cuda.enable_flash_sdp, torch.backends.cuda.enable_mem_efficient_sdp,
                       torch.backends.cuda.enable_cudnn_sdp, torch.backends.cuda.enable_math_sdp):
            enable(True)
        torch._dynamo.reset()
    assert result["compiled"] and result["precision"] == "bf16" and result["dropout"] == 0.1
    assert result["sdpa_kernel"] == backend
