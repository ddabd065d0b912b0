"""Fine-tuning a tiny model for real: it learns a generated task; batching and padding are right."""

import random

import numpy as np
import pytest
import torch
from glue_fixtures import bert_checkpoint, keyword_examples, modernbert_checkpoint, roberta_checkpoint, sentence  # noqa: F401  (fixtures)

from mlm.errors import UserError
from mlm.eval.finetune import (FinetuneConfig, collate, encode, finetune_and_evaluate, load_config, load_tokenizer,
                               train_batches)
from mlm.eval.tasks import custom_task

FAST = dict(lr=3e-3, epochs=3, batch_size=16, max_length=64, warmup_ratio=0.1)


def test_tiny_bert_learns_a_generated_task(bert_checkpoint):
    task = custom_task("keywords", ["sentence"], 2, metrics=["accuracy", "mcc"])
    scores = finetune_and_evaluate(
        bert_checkpoint, task, keyword_examples(400, seed=1), keyword_examples(200, seed=2),
        FinetuneConfig(**FAST), seed=0, progress=False,
    )
    assert scores["accuracy"] > 0.9, scores  # chance is 0.5
    assert scores["mcc"] > 0.8, scores


def test_tiny_modernbert_learns_a_generated_task(modernbert_checkpoint):
    """ModernBERT (no token types, mean pooling, local attention on inputs longer than its window) fine-tunes
    through the same path as the other families."""
    task = custom_task("keywords", ["sentence"], 2, metrics=["accuracy"])
    scores = finetune_and_evaluate(
        modernbert_checkpoint, task, keyword_examples(400, seed=1), keyword_examples(200, seed=2),
        FinetuneConfig(**FAST), seed=0, progress=False,
    )
    assert scores["accuracy"] > 0.9, scores  # chance is 0.5


def test_random_init_twin_and_seeds(bert_checkpoint):
    """random_init builds the same architecture with fresh weights; a seed fixes the result."""
    task = custom_task("keywords", ["sentence"], 2)
    train, dev = keyword_examples(64, seed=3), keyword_examples(64, seed=4)
    cfg = FinetuneConfig(**{**FAST, "epochs": 1})
    a = finetune_and_evaluate(bert_checkpoint, task, train, dev, cfg, seed=5, random_init=True, progress=False)
    b = finetune_and_evaluate(bert_checkpoint, task, train, dev, cfg, seed=5, random_init=True, progress=False)
    assert a == b and 0 <= a["accuracy"] <= 1


def test_roberta_sentence_pairs_and_regression(roberta_checkpoint):
    """RoBERTa family (no token types, positions after the pad index) on a pair regression task."""
    rng = random.Random(0)
    words = ["cat", "dog", "sun", "car"]

    def pairs(n):
        out = []
        for _ in range(n):
            a, b = rng.choice(words), rng.choice(words)
            out.append({"s1": sentence(rng, a, 4), "s2": sentence(rng, b, 4), "label": 5.0 * (a == b)})
        return out

    task = custom_task("pairs", ["s1", "s2"], 1, metrics=["pearson", "spearman"])
    scores = finetune_and_evaluate(roberta_checkpoint, task, pairs(64), pairs(32), FinetuneConfig(**FAST), progress=False)
    assert set(scores) == {"pearson", "spearman"} and all(np.isfinite(v) for v in scores.values())


def test_length_grouped_batches_cover_every_example_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 100, size=1000)
    batches = train_batches(lengths, 32, rng, group_by_length=True)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    # grouping means far less padding than random batches
    def padding(bs):
        return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in bs)

    assert padding(batches) < 0.3 * padding(train_batches(lengths, 32, rng, group_by_length=False))


def test_dynamic_padding_and_token_types(bert_checkpoint):
    tokenizer = load_tokenizer(bert_checkpoint)
    task = custom_task("pairs", ["a", "b"], 2)
    data = encode(task, [{"a": "good w1", "b": "bad", "label": 1}, {"a": "w2 w3 w4 w5", "b": "w6 w7", "label": 0}],
                  tokenizer, max_length=64, token_types=True)
    batch = collate(data, np.array([0, 1]), torch.device("cpu"))
    lengths = data.lengths
    assert batch["input_ids"].shape == (2, lengths.max())  # padded to the batch's longest, not max_length
    assert batch["attention_mask"].sum(1).tolist() == lengths.tolist()
    assert batch["input_ids"][0, lengths[0]:].eq(tokenizer.pad_token_id).all()
    assert batch["token_type_ids"][0].tolist()[: lengths[0]].count(1) > 0  # the second segment is type 1
    # truncation to max_length
    long = encode(task, [{"a": " ".join(["w1"] * 100), "b": " ".join(["w2"] * 100), "label": 0}], tokenizer, 32, True)
    assert long.lengths.tolist() == [32]


def test_bad_inputs_are_clear_errors(bert_checkpoint, tmp_path):
    task = custom_task("keywords", ["sentence"], 2)
    with pytest.raises(UserError, match="missing checkpoint"):
        load_config(str(tmp_path / "nope"), task)
    with pytest.raises(UserError, match="lack field"):
        finetune_and_evaluate(bert_checkpoint, task, [{"text": "a", "label": 0}], [{"text": "b", "label": 1}], progress=False)
    with pytest.raises(UserError, match="warmup_ratio"):
        FinetuneConfig(warmup_ratio=1.5)


@pytest.mark.gpu
def test_bf16_on_gpu_learns(bert_checkpoint):
    task = custom_task("keywords", ["sentence"], 2)
    cfg = FinetuneConfig(**FAST, device="cuda", dtype="auto")
    scores = finetune_and_evaluate(bert_checkpoint, task, keyword_examples(400, 1), keyword_examples(200, 2), cfg, progress=False)
    assert scores["accuracy"] > 0.9, scores
