"""Model families: ModernBERT's training path equals Hugging Face's, presets and overrides, FLOPs, published
checkpoints as a start (by folder and by hub name from a cache the test builds), context extension."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForMaskedLM, ModernBertForSequenceClassification

from conftest import eager_copy, hf_config, moved_off_init, tiny_config
from mlm.config import ModelConfig, load_config
from mlm.data.masking import IGNORE_INDEX
from mlm.errors import UserError
from mlm.model.attention import band_mask, window_attention
from mlm.model.build import MaskedLMLoss, build_model, install_training_attention, model_config
from mlm.model.families import MODERNBERT_SIZES, attended_keys, flops_per_token
from mlm.tokenizer import load_tokenizer
from mlm.train.metrics import read_metrics
from mlm.train.pretrain import masked_batch, pretrain, setup


def _modernbert(tokenizer_dirs, local_attention: int, dropout: float = 0.0, scale: float = 0.05):
    """A tiny ModernBERT with a small local window, so 32-token windows have local and global layers."""
    config = hf_config("modernbert", "tiny", load_tokenizer(tokenizer_dirs["modernbert"]), 64, dropout)
    config.local_attention = local_attention
    return moved_off_init(build_model(config, seed=0), scale)


def _ids(vocab: int, batch: int = 3, length: int = 32):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, length), generator=generator)
    positions = torch.rand(batch, length, generator=generator).topk(9, dim=1).indices
    return ids, positions, ids.gather(1, positions)


@pytest.mark.parametrize("local_attention", [8, 128])
def test_modernbert_training_path_equals_hf_loss_and_gradients(tokenizer_dirs, local_attention):
    """fp32, dropout 0: mlm's attention (no mask, band-masked local layers) and the masked-only head give HF's
    eager loss and gradients; with an 8-token window the local layers really are local at 32 tokens."""
    model = _modernbert(tokenizer_dirs, local_attention)
    plain = eager_copy(model)
    install_training_attention(model)
    masked, positions, labels = _ids(model.config.vocab_size)
    ours = MaskedLMLoss(model)(masked, positions, labels)
    ours.backward()
    full_labels = torch.full_like(masked, IGNORE_INDEX).scatter(1, positions, labels)
    theirs = plain(input_ids=masked, labels=full_labels).loss
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    plain_grads = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain_grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_window_one_position_off_gives_another_loss(tokenizer_dirs):
    """The equality above can fail: the same model with a local window one position narrower does not match."""
    model = _modernbert(tokenizer_dirs, local_attention=8)
    plain = eager_copy(model)
    install_training_attention(model)
    for layer in model.base_model.layers:
        if layer.attn.half_window is not None:
            layer.attn.half_window -= 1
    masked, positions, labels = _ids(model.config.vocab_size)
    full_labels = torch.full_like(masked, IGNORE_INDEX).scatter(1, positions, labels)
    with torch.no_grad():
        assert abs(MaskedLMLoss(model)(masked, positions, labels) - plain(input_ids=masked, labels=full_labels).loss) > 1e-4


def test_flex_attention_equals_the_band_masked_kernel():
    """The GPU's kernel (FlexAttention's block mask, run here unfused on the CPU) computes the band-masked SDPA."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 256, 16, generator=generator) for _ in range(3))
    flex = window_attention(q, k, v, half_window=64, dropout=0.0, scale=0.25, kernel="flex")
    dense = window_attention(q, k, v, half_window=64, dropout=0.0, scale=0.25, kernel="sdpa")
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)
    wider = window_attention(q, k, v, half_window=65, dropout=0.0, scale=0.25, kernel="sdpa")
    assert not torch.allclose(wider, dense, atol=1e-4)


@pytest.mark.parametrize("length, half_window", [(32, 8), (256, 64), (64, 64), (5, 1)])
def test_attended_keys_counts_the_band(length, half_window):
    assert attended_keys(half_window, length) == pytest.approx(band_mask(length, half_window, "cpu").sum().item() / length)
    assert attended_keys(None, length) == length


def test_flops_count_the_glu_and_the_local_windows(tokenizer_dirs):
    model = build_model(hf_config("modernbert", "tiny", load_tokenizer(tokenizer_dirs["modernbert"]), 1024, 0.0), 0)
    c = model.config
    d, ffn, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    per_layer = 3 * d * d + d * d + 2 * d * ffn + ffn * d + 2 * d  # Wqkv, Wo, Wi (both GLU halves), Wo, two norms
    per_layer_without_first_norm = per_layer - d  # layer 0 has no attention norm
    n = L * per_layer - (per_layer - per_layer_without_first_norm)
    # Layers 0 and 3 global (1,024 keys), 1 and 2 local (±64: 129 keys less the ends).
    keys = [1024, attended_keys(64, 1024), attended_keys(64, 1024), 1024]
    expected = 6 * n + sum(12 * d * k for k in keys) + 6 * 0.3 * (d * c.vocab_size + d * d)
    assert flops_per_token(model, 1024, 0.3) == pytest.approx(expected)
    assert flops_per_token(model, 1024, 0.3) < flops_per_token(model, 1024, 0.3) + 2 * 12 * d * (1024 - 129)


def test_presets_follow_the_published_shapes(tokenizer_dirs):
    tokenizer = load_tokenizer(tokenizer_dirs["modernbert"])
    base = hf_config("modernbert", "base", tokenizer, 8192, 0.0)
    assert (base.num_hidden_layers, base.hidden_size, base.intermediate_size, base.num_attention_heads) == (22, 768, 1152, 12)
    assert base.layer_types[:4] == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    assert (base.local_attention, base.rope_parameters["full_attention"]["rope_theta"],
            base.rope_parameters["sliding_attention"]["rope_theta"]) == (128, 160_000, 10_000)
    large = MODERNBERT_SIZES["large"]
    assert (large.layers, large.hidden, large.intermediate) == (28, 1024, 2624)
    assert ModelConfig(family="modernbert").size == "base" and ModelConfig().size == "medium"


def test_a_preset_is_a_starting_point(tokenizer_dirs):
    tokenizer = load_tokenizer(tokenizer_dirs["bert"])
    config = model_config(ModelConfig(family="bert", size="tiny", layers=3, hidden=96, heads=3, intermediate=200), tokenizer)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size) == (3, 96, 3, 200)
    with pytest.raises(UserError, match="model.heads=5 does not divide model.hidden=96"):
        model_config(ModelConfig(family="bert", size="tiny", hidden=96, heads=5), tokenizer)
    with pytest.raises(UserError, match="unknown modernbert size 'medium'"):
        ModelConfig(family="modernbert", size="medium")


def test_modernbert_trains_records_its_shape_and_exports(data_dirs, tmp_path):
    """A tiny ModernBERT of a non-preset shape trains; config.json records the shape; the export is a plain
    ModernBertForMaskedLM that classifies and gives embeddings with no mlm code."""
    cfg = tiny_config(data_dirs["modernbert"], tmp_path / "run", "modernbert", steps=20)
    cfg.model.layers, cfg.model.intermediate = 3, 160
    result = pretrain(cfg, log=lambda _: None)
    losses = [m["loss"] for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert losses[-1] < losses[0]
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert (recorded["family"], recorded["layers"], recorded["intermediate"]) == ("modernbert", 3, 160)
    checkpoint = result["checkpoint"]
    model = AutoModelForMaskedLM.from_pretrained(checkpoint)
    assert type(model).__name__ == "ModernBertForMaskedLM" and model.config.num_hidden_layers == 3
    tokenizer = load_tokenizer(checkpoint)
    batch = tokenizer(["the cat sees a red ball"] * 2, ["the team reads"] * 2, return_tensors="pt")
    assert "token_type_ids" not in batch  # ModernBERT has no segment embeddings
    classifier = ModernBertForSequenceClassification.from_pretrained(checkpoint, num_labels=2)
    assert classifier(**batch).logits.shape == (2, 2)
    embeddings = model.model(**batch).last_hidden_state
    assert embeddings.shape == (2, batch["input_ids"].shape[1], 128)
    text = " ".join(["the cat sees a red ball."] * 40)  # longer than the 128-token local window
    long_ids = tokenizer(text.replace("red", tokenizer.mask_token, 1), return_tensors="pt")
    assert long_ids["input_ids"].shape[1] > 150
    with torch.no_grad():
        assert model(**long_ids).logits.shape[1] == long_ids["input_ids"].shape[1]


def _save_hf(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _first_step_loss_is_the_models(cfg, model):
    """The first training step's batch and masks give the saved model's own MLM loss: nothing re-initialised."""
    s = setup(cfg, log=lambda _: None)
    try:
        masked, positions, labels = masked_batch(s, step=0)
        full_labels = torch.full_like(masked, IGNORE_INDEX).scatter(1, positions, labels)
        with torch.no_grad():
            expected = model.eval()(input_ids=masked, labels=full_labels).loss
            ours = MaskedLMLoss(s.hf_model.eval())(masked, positions, labels)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    finally:
        s.batches.close()
        if s.run_lock:
            s.run_lock.release()
    return s


@pytest.mark.parametrize("fam", ["roberta", "bert", "modernbert"])
def test_init_from_a_published_model_of_another_shape(data_dirs, tokenizer_dirs, fam, tmp_path):
    tokenizer = load_tokenizer(tokenizer_dirs[fam])
    # No preset has this shape.
    config = model_config(ModelConfig(family=fam, size="tiny", layers=3, intermediate=136, max_positions=64,
                                      dropout=0.0), tokenizer)
    model = build_model(config, seed=5)
    folder = _save_hf(model, tokenizer, tmp_path / "published")
    cfg = tiny_config(data_dirs[fam], tmp_path / "run", "roberta", steps=4)
    cfg.model.init_from, cfg.model.dropout, cfg.model.size = str(folder), 0.0, "base"
    lines = []
    s = _first_step_loss_is_the_models(cfg, model)
    assert (s.cfg.model.family, s.cfg.model.layers, s.cfg.model.size) == (fam, 3, "")
    cfg.run.out_dir = str(tmp_path / "run2")
    result = pretrain(cfg, log=lines.append)
    assert any("model.size=base is not used" in line for line in lines)
    assert any("L3/H128" in line and str(folder) in line for line in lines)
    assert AutoModelForMaskedLM.from_pretrained(result["checkpoint"]).config.num_hidden_layers == 3


def _hub_cache(root, repo: str, folder):
    """The layout huggingface_hub keeps for a downloaded model: models--org--name/{refs/main, snapshots/<rev>/…}."""
    entry = root / f"models--{repo.replace('/', '--')}"
    revision = "0" * 40
    shutil.copytree(folder, entry / "snapshots" / revision)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(revision)
    if not (folder / "config.json").exists():  # what the hub library records for a file the repository lacks
        (entry / ".no_exist" / revision).mkdir(parents=True)
        (entry / ".no_exist" / revision / "config.json").touch()
    return root


def test_init_from_a_hub_name_reads_the_local_cache(data_dirs, tokenizer_dirs, tmp_path, monkeypatch):
    tokenizer = load_tokenizer(tokenizer_dirs["modernbert"])
    model = build_model(hf_config("modernbert", "tiny", tokenizer, 64, 0.0), seed=3)
    cache = _hub_cache(tmp_path / "hub", "someone/tiny-modernbert", _save_hf(model, tokenizer, tmp_path / "m"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at each download, unlike the variable
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # no network: the cache answers at once
    cfg = tiny_config(data_dirs["modernbert"], tmp_path / "run", "modernbert", steps=2)
    cfg.model.init_from, cfg.model.dropout = "someone/tiny-modernbert", 0.0
    _first_step_loss_is_the_models(cfg, model)


def test_a_foreign_tokenizer_or_family_is_one_line(data_dirs, tokenizer_dirs, tmp_path):
    roberta = build_model(hf_config("roberta", "tiny", load_tokenizer(tokenizer_dirs["roberta"]), 64, 0.0), 0)
    folder = _save_hf(roberta, load_tokenizer(tokenizer_dirs["roberta"]), tmp_path / "roberta")
    # The model's vocabulary is larger by far than the data's tokenizer.
    roberta.resize_token_embeddings(5000, mean_resizing=False)
    big = _save_hf(roberta, load_tokenizer(tokenizer_dirs["roberta"]), tmp_path / "big")
    cfg = tiny_config(data_dirs["bert"], tmp_path / "run", "bert", steps=2)
    cfg.model.init_from = str(folder)
    with pytest.raises(UserError, match="tokenizer uses bert special tokens"):
        pretrain(cfg, log=lambda _: None)
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run", "roberta", steps=2)
    cfg.model.init_from = str(big)
    with pytest.raises(UserError, match=f"vocabulary of 5,000 but the data's tokenizer {len(load_tokenizer(folder))}:"):
        pretrain(cfg, log=lambda _: None)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "pad_token_id": 3}))
    cfg.model.init_from = str(folder)
    with pytest.raises(UserError, match="has pad_token_id 3 but the data's tokenizer 1:"):
        pretrain(cfg, log=lambda _: None)
    config["model_type"] = "distilbert"
    (folder / "config.json").write_text(json.dumps(config))
    cfg.model.init_from = str(folder)
    result = subprocess.run([sys.executable, "-m", "mlm", "pretrain", f"--model.init_from={folder}",
                             f"--data.data_dir={data_dirs['roberta']}", f"--run.out_dir={tmp_path / 'cli'}"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "mlm trains the families roberta, bert, modernbert" in result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cli").exists()


def test_context_extension_continues_from_the_first_phase(data_dirs, tmp_path):
    """ModernBERT 64 → 128 tokens: the second phase starts from the first's weights, with more positions and
    a new global RoPE θ, and its first step's loss is that model's on the longer windows."""
    first = tiny_config(data_dirs["modernbert"], tmp_path / "short", "modernbert", steps=10)
    first.data.seq_len = 64
    first.model.dropout = 0.0
    checkpoint = pretrain(first, log=lambda _: None)["checkpoint"]
    second = load_config(None, [f"--data.data_dir={data_dirs['modernbert']}", f"--run.out_dir={tmp_path / 'long'}",
                                f"--model.init_from={checkpoint}", "--model.max_positions=128",
                                "--model.rope_theta=320000.0", "--model.dropout=0.0", "--data.seq_len=128",
                                "--train.steps=3", "--train.global_batch=8", "--train.warmup_steps=1",
                                "--system.micro_batch=8", "--system.device=cpu", "--system.compile=off",
                                "--run.progress=false", "--eval.every=0"])
    extended = AutoModelForMaskedLM.from_pretrained(checkpoint)
    extended.config.max_position_embeddings = 128
    extended.config.rope_parameters["full_attention"]["rope_theta"] = 320_000.0
    extended = AutoModelForMaskedLM.from_pretrained(checkpoint, config=extended.config)
    _first_step_loss_is_the_models(second, extended)
    result = pretrain(second, log=lambda _: None)
    config = AutoModelForMaskedLM.from_pretrained(result["checkpoint"]).config
    assert config.max_position_embeddings == 128
    assert config.rope_parameters["full_attention"]["rope_theta"] == 320_000.0


def test_tokenizer_family_modernbert_and_from_a_cached_hub_copy(tokenizer_dirs, corpus_file, tmp_path):
    """--family modernbert trains a byte-level BPE in ModernBERT's layout; --from copies a published one,
    offline, from the hub cache (a layout the test builds)."""
    import os

    from mlm.tokenizer import tokenizer_family, tokenizer_fingerprint

    trained = load_tokenizer(tokenizer_dirs["modernbert"])
    assert (trained.cls_token, trained.sep_token, trained.mask_token, trained.pad_token) == ("[CLS]", "[SEP]", "[MASK]", "[PAD]")
    assert tokenizer_family(trained) == "bert" and trained.model_input_names == ["input_ids", "attention_mask"]
    ids = trained("The Cat sees a red ball.")["input_ids"]
    assert ids[0] == trained.cls_token_id and ids[-1] == trained.sep_token_id
    assert trained.decode(ids[1:-1]) == "The Cat sees a red ball."  # cased, byte-level: nothing lost
    # A published model's repository: its tokenizer beside its config (transformers 5.17 reads the config first).
    published = tmp_path / "published"
    shutil.copytree(tokenizer_dirs["modernbert"], published)
    hf_config("modernbert", "tiny", trained, 64, 0.0).save_pretrained(published)
    cache = _hub_cache(tmp_path / "hub", "someorg/modernbert-like", published)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": "https://hub.invalid"}
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([sys.executable, "-m", "mlm", "tokenizer", "--from", "someorg/modernbert-like", "--out",
                             str(tmp_path / "copy")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "copy")) == tokenizer_fingerprint(trained)
