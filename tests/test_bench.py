"""`mlm bench` and the speed levers: the figures it prints, and that nothing about speed changes the
mathematics (the fast path against the plain Hugging Face model, on the same batch and masks)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForMaskedLM

from mlm.bench import PEAK_BF16_TFLOPS, REFERENCE_VOCABULARIES, bench, flops_per_token, peak_tflops_of
from mlm.cli import main
from mlm.config import SystemConfig, load_config
from mlm.data.loader import BatchLoader
from mlm.data.masking import IGNORE_INDEX
from mlm.data.stream import Sampler, SyntheticWindows, TokenStream, Windows
from mlm.errors import UserError
from mlm.model.build import MaskedLMLoss, build_model, install_training_attention
from mlm.tokenizer import load_tokenizer
from mlm.train.autobatch import auto_micro_batch
from mlm.train.pretrain import masked_batch, setup

from conftest import eager_copy, hf_config, moved_off_init, tiny_config

ROOT = Path(__file__).parent.parent
TINY_BENCH = ["--train.global_batch=16", "--system.micro_batch=8", "--data.seq_len=32", "--model.max_positions=64",
              "--model.size=tiny", "--system.device=cpu"]


# ---- the figures -----------------------------------------------------------------------------------

def test_bench_cli_prints_the_figures_and_json_last(capsys):
    main(["bench", "configs/tiny.toml", "--synthetic", "--baseline", "--steps=2", "--warmup=1", "--json",
          "--peak-tflops=2", *TINY_BENCH])
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert {"tokens_per_s", "baseline_tokens_per_s", "ratio", "mfu", "peak_memory", "device"} <= set(result)
    assert result["device"] == "cpu" and result["micro_batch"] == 8 and result["synthetic"]
    assert result["ratio"] == pytest.approx(result["tokens_per_s"] / result["baseline_tokens_per_s"])
    # MFU = FLOPs per token × tokens/s / peak, against the peak given.
    assert result["mfu"] == pytest.approx(result["flops_per_token"] * result["tokens_per_s"] / 2e12)
    assert result["tokens_per_s"] == pytest.approx(16 * 32 / result["step_time_s"])
    assert result["peak_memory"] > 0
    assert any(line.startswith("mlm path:") for line in out) and any(line.startswith("ratio:") for line in out)


def test_bench_on_prepared_data(data_dirs):
    cfg = tiny_config(data_dirs["bert"], "unused", "bert")
    result = bench(cfg, steps=2, warmup=1, log=lambda _: None)
    assert result["tokens_per_s"] > 0 and result["baseline_tokens_per_s"] is None and result["mfu"] is None


def test_flops_per_token_is_the_formula():
    """6·N + 12·L·d·s + 6·m·(d·V + d²), N the encoder's parameters: 12d² + 13d per layer (Q, K, V, output
    and the two FFN matrices with their biases, two LayerNorms)."""
    vocab = REFERENCE_VOCABULARIES["roberta"]
    config = hf_config("roberta", "medium", vocab)
    with torch.device("meta"):
        model = AutoModelForMaskedLM.from_config(config)
    L, d, V, s, m = 8, 512, 50_265, 512, 77 / 512
    expected = 6 * L * (12 * d * d + 13 * d) + 12 * L * d * s + 6 * m * (d * V + d * d)
    assert flops_per_token(model, s, m) == pytest.approx(expected, rel=1e-12)
    assert flops_per_token(model, s, m) == pytest.approx(2.0e8, rel=0.02)  # ~200 MFLOP per token for the recipe


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.1), ("NVIDIA GeForce GTX 1080", None),
])
def test_peak_table_picks_the_most_specific_card(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops_of(torch.device("cuda")) == peak
    assert peak_tflops_of(torch.device("cpu")) is None
    assert all(value > 0 for value in PEAK_BF16_TFLOPS.values())


def test_bench_synthetic_needs_no_datasets_package(tmp_path):
    """The GPU image has no `datasets`: `mlm bench --synthetic` must not import it."""
    code = ("import sys; sys.modules['datasets'] = None; from mlm.cli import main; "
            f"main(['bench', 'configs/tiny.toml', '--synthetic', '--steps=1', '--warmup=0', *{TINY_BENCH!r}])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mlm path:" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--steps=0"], "--steps must be positive"),
    (["--baseline", "--train.global_batch=24"], "not a multiple of it"),
    (["--peak-tflops=-1"], "--peak-tflops must be positive"),
    (["--system.strategy=fsdp"], "one-process path"),
])
def test_bench_bad_input_is_one_line(args, message):
    command = [sys.executable, "-m", "mlm", "bench", "configs/tiny.toml", "--synthetic", *TINY_BENCH, *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1


# ---- data levers: vectorised reads, read-ahead ------------------------------------------------------

def test_vectorised_windows_equal_reads_across_shard_boundaries(tmp_path):
    """Windows that straddle two shards come out as the stream holds them."""
    tokens = np.arange(1000, dtype=np.uint16) + 10
    cuts = [0, 333, 334, 700, 1000]  # a 1-token shard, and windows crossing every boundary
    shards = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        tokens[a:b].tofile(tmp_path / f"train-{i}.bin")
        shards.append({"file": f"train-{i}.bin", "tokens": b - a})
    manifest = {"dtype": "uint16", "splits": {"train": {"shards": shards}}}
    windows = Windows(TokenStream(tmp_path, "train", manifest), 50, 1, 2)
    ids = np.random.default_rng(0).permutation(windows.count)
    expected = [[1, *windows.stream.read(int(w) * 48, 48).tolist(), 2] for w in ids]
    assert windows.batch(ids).tolist() == expected


def test_synthetic_windows_are_fixed_and_never_special():
    vocab = REFERENCE_VOCABULARIES["bert"]
    windows = SyntheticWindows(1000, 64, len(vocab), vocab.cls_token_id, vocab.sep_token_id, tuple(vocab.all_special_ids))
    batch = windows.batch(np.arange(100))
    assert np.array_equal(batch[7:9], windows.batch(np.array([7, 8])))
    body = batch[:, 1:-1]
    assert not np.isin(body, vocab.all_special_ids).any() and body.max() < len(vocab) and body.min() >= 0
    assert len(np.unique(body)) > 1000


def test_read_ahead_gives_the_batches_of_direct_reads(data_dirs):
    tokenizer = load_tokenizer(data_dirs["roberta"] / "tokenizer")
    windows = Windows(TokenStream(data_dirs["roberta"], "train"), 32, tokenizer.cls_token_id, tokenizer.sep_token_id)
    sampler = Sampler(windows.count, 16, seed=3)
    ahead = BatchLoader(windows, sampler, rank=1, world_size=2, device=torch.device("cpu"), prefetch=True)
    plain = BatchLoader(windows, sampler, rank=1, world_size=2, device=torch.device("cpu"), prefetch=False)
    for step in [0, 1, 2, 7, 8, 3]:  # in order, and jumps
        assert torch.equal(ahead.get(step), plain.get(step))
    ahead.close()


# ---- micro_batch = "auto" ----------------------------------------------------------------------------

def test_micro_batch_auto_setting():
    assert SystemConfig(micro_batch="auto").micro_batch == "auto"
    assert load_config(None, ["--system.micro_batch=auto"]).system.micro_batch == "auto"
    assert load_config(None, ["--system.micro_batch=48"]).system.micro_batch == 48
    with pytest.raises(UserError, match="positive number or"):
        load_config(None, ["--system.micro_batch=big"])
    with pytest.raises(UserError, match="expected int or str"):
        load_config(None, ["--system.micro_batch=1.5"])
    # Resolved before DeepSpeed's JSON is filled, so every engine takes it.
    assert SystemConfig(micro_batch="auto", strategy="deepspeed", deepspeed_config="x.json").micro_batch == "auto"


def test_micro_batch_auto_on_cpu_is_the_largest_divisor_up_to_32(data_dirs, tmp_path):
    tokenizer = load_tokenizer(data_dirs["roberta"] / "tokenizer")
    model = build_model(hf_config("roberta", "tiny", tokenizer, 64), 0)
    for per_rank, expected in [(8192, 32), (96, 32), (40, 20), (7, 7)]:
        assert auto_micro_batch(model, per_rank, 32, 5, torch.device("cpu"), None, log=lambda _: None) == expected
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run", steps=5)
    cfg.system.micro_batch = "auto"
    s = setup(cfg, log=lambda _: None)
    assert (s.cfg.system.micro_batch, s.accum) == (16, 1)  # global batch 16 on one process
    assert json.loads((tmp_path / "run" / "config.json").read_text())["system"]["micro_batch"] == 16
    s.batches.close()
    if s.run_lock:
        s.run_lock.release()


# ---- the mathematics: fast path == plain Hugging Face model -------------------------------------------

def _trained_like_model(family, tokenizer_dirs, dropout, scale=0.05):
    """A tiny model whose weights are moved off their initial values (by `scale` standard normals)."""
    tokenizer = load_tokenizer(tokenizer_dirs[family])
    model = build_model(hf_config(family, "tiny", tokenizer, max_positions=64, dropout=dropout), seed=0)
    return moved_off_init(model, scale)


def _batch(data_dirs, family, tmp_path, dropout):
    cfg = tiny_config(data_dirs[family], tmp_path / "run", family, steps=5)
    cfg.model.dropout = dropout
    s = setup(cfg, log=lambda _: None)
    masked, positions, labels = masked_batch(s, step=0)
    s.batches.close()
    s.run_lock.release()
    return masked, positions, labels


@pytest.mark.parametrize("fused_qkv", [False, True], ids=["three-matmuls", "fused-qkv"])
def test_fast_path_loss_and_gradients_equal_the_plain_hf_model(data_dirs, tokenizer_dirs, family, fused_qkv, tmp_path):
    """fp32, dropout 0: MaskedLMLoss (SDPA, head on the masked positions only, with or without the fused QKV
    projection) and HF's own forward (eager attention, head everywhere, labels IGNORE_INDEX elsewhere) give
    the same loss and gradients, the separate query/key/value weights' included."""
    masked, positions, labels = _batch(data_dirs, family, tmp_path, dropout=0.0)
    model = _trained_like_model(family, tokenizer_dirs, dropout=0.0)
    plain = eager_copy(model)
    install_training_attention(model, fused_qkv)
    ours = MaskedLMLoss(model)(masked, positions, labels)
    ours.backward()
    full_labels = torch.full_like(masked, IGNORE_INDEX).scatter(1, positions, labels)
    theirs = plain(input_ids=masked, labels=full_labels).loss
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    plain_grads = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain_grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_dropout_gives_the_same_loss_distribution(data_dirs, tokenizer_dirs, tmp_path):
    """With dropout 0.1 the draws differ (SDPA drops inside its kernel, eager attention with nn.Dropout), but
    the loss distribution over many seeds is the same: equal means within 4 standard errors; and that test
    has the power to see dropout (the dropout-free loss lies far outside it)."""
    masked, positions, labels = _batch(data_dirs, "roberta", tmp_path, dropout=0.1)
    # Weights far from a fresh init, so that dropout moves the loss well beyond the noise of its mean.
    model = _trained_like_model("roberta", tokenizer_dirs, dropout=0.1, scale=1.0)
    plain = eager_copy(model)
    fast = MaskedLMLoss(model)
    full_labels = torch.full_like(masked, IGNORE_INDEX).scatter(1, positions, labels)
    ours, theirs = [], []
    with torch.no_grad():
        for seed in range(100):
            torch.manual_seed(seed)
            ours.append(fast(masked, positions, labels).item())
            torch.manual_seed(10_000 + seed)
            theirs.append(plain(input_ids=masked, labels=full_labels).loss.item())
        model.eval()
        no_dropout = fast(masked, positions, labels).item()
    ours, theirs = np.array(ours), np.array(theirs)
    standard_error = math.sqrt(ours.var(ddof=1) / len(ours) + theirs.var(ddof=1) / len(theirs))
    assert abs(ours.mean() - theirs.mean()) < 4 * standard_error
    assert 0.7 < ours.std() / theirs.std() < 1.4
    assert abs(ours.mean() - no_dropout) > 8 * standard_error


def test_fused_qkv_draws_the_same_dropout_and_keeps_the_checkpoint(tokenizer_dirs, tmp_path):
    """With dropout on, the fused projection feeds the same attention kernel the same way, so one seed gives
    the same loss as HF's attention forward; the saved checkpoint is a plain HF one with the three weights."""
    model = _trained_like_model("roberta", tokenizer_dirs, dropout=0.1)
    ids = torch.randint(10, model.config.vocab_size, (4, 62), generator=torch.Generator().manual_seed(0))
    positions = torch.rand(4, 62, generator=torch.Generator().manual_seed(1)).topk(10, dim=1).indices
    labels = ids.gather(1, positions)
    torch.manual_seed(3)
    unfused = MaskedLMLoss(model)(ids, positions, labels)
    install_training_attention(model, fused_qkv=True)
    torch.manual_seed(3)
    fused = MaskedLMLoss(model)(ids, positions, labels)
    torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=1e-6)
    model.save_pretrained(tmp_path / "checkpoint")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "checkpoint")
    assert {"query", "key", "value"} <= {name for name, _ in loaded.base_model.encoder.layer[0].attention.self.named_children()}
    for (name, mine), (_, theirs) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(mine, theirs), name


@pytest.mark.parametrize("fused_qkv", [False, True], ids=["three-matmuls", "fused-qkv"])
def test_the_training_forward_compiles_as_one_graph(family, fused_qkv):
    """torch.compile's gains need the whole masked-LM forward in one graph: no graph breaks (each break is a
    return to Python and an unfused boundary)."""
    vocab = REFERENCE_VOCABULARIES[family]
    hf_model = build_model(hf_config(family, "tiny", vocab, max_positions=64), seed=0).train()
    install_training_attention(hf_model, fused_qkv)
    loss_model = MaskedLMLoss(hf_model)
    ids = torch.randint(200, 1000, (2, 32))
    positions = torch.rand(2, 32).topk(5, dim=1).indices
    try:
        explanation = torch._dynamo.explain(loss_model)(ids, positions, ids.gather(1, positions))
    finally:
        torch._dynamo.reset()
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
