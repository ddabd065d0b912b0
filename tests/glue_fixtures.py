"""Hermetic helpers for the GLUE tests: tiny tokenizers and models made in-process, generated tasks,
and a GLUE directory in the original download layout. Nothing touches the network."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

WORDS = [f"w{i}" for i in range(60)]  # neutral filler words
KEYWORDS = (["good", "great", "fine"], ["bad", "awful", "poor"])  # class 0 / class 1 cue words
PAIR_WORDS = ["cat", "dog", "sun", "car"]


def sentence(rng: random.Random, cue: str | None = None, n: int = 8) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    if cue is not None:
        words.insert(rng.randrange(n + 1), cue)
    return " ".join(words)


def keyword_examples(n: int, seed: int = 0) -> list[dict]:
    """A single-sentence task: the label is which cue-word set the sentence contains."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randrange(2)
        out.append({"sentence": sentence(rng, rng.choice(KEYWORDS[label]), rng.randint(4, 12)), "label": label})
    return out


def corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    cues = [w for ws in KEYWORDS for w in ws] + PAIR_WORDS + ["entailment", "yes", "no"]
    return [sentence(rng, rng.choice(cues)) for _ in range(2000)]


def make_checkpoint(root: Path, family: str = "bert", max_positions: int = 64) -> str:
    """A tiny pretrained-looking checkpoint: the project's own tokenizer + *ForMaskedLM saved with save_pretrained."""
    from transformers import BertConfig, BertForMaskedLM, ModernBertConfig, ModernBertForMaskedLM, RobertaConfig, RobertaForMaskedLM

    from mlm.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(corpus(), family, 300, root, min_frequency=1)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, pad_token_id=tokenizer.pad_token_id,
    )
    if family == "bert":
        model = BertForMaskedLM(BertConfig(**common, max_position_embeddings=max_positions, type_vocab_size=2))
    elif family == "modernbert":
        model = ModernBertForMaskedLM(ModernBertConfig(
            **common, max_position_embeddings=max_positions, local_attention=16, classifier_pooling="mean",
            cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        ))
    else:
        config = RobertaConfig(
            **common, max_position_embeddings=max_positions + 2, type_vocab_size=1,
            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        )
        model = RobertaForMaskedLM(config)
    model.save_pretrained(root)
    return str(root)


@pytest.fixture(scope="session")
def bert_checkpoint(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("bert") / "checkpoint-100", "bert")


@pytest.fixture(scope="session")
def roberta_checkpoint(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("roberta") / "ckpt", "roberta")


@pytest.fixture(scope="session")
def modernbert_checkpoint(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("modernbert") / "ckpt", "modernbert")


# ---- a GLUE directory in the original download layout -------------------------------------------


def _pair(rng: random.Random) -> tuple[str, str, int]:
    """Two sentences; label 1 when they share a pair word."""
    a, b = rng.choice(PAIR_WORDS), rng.choice(PAIR_WORDS)
    return sentence(rng, a, 5), sentence(rng, b, 5), int(a == b)


def write_tsv(path: Path, rows: list[list[str]], header: list[str] | None = None, bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(map(str, r)) for r in rows]
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")


def write_glue_dir(root: Path, n_train: int = 40, n_dev: int = 16, seed: int = 0) -> Path:
    """All nine tasks with the real files, headers and column orders of the GLUE download."""
    rng = random.Random(seed)
    nli3 = ["entailment", "neutral", "contradiction"]
    for split, n in (("train", n_train), ("dev", n_dev)):
        # CoLA: no header; source, label, original label, sentence.
        rows = []
        for _ in range(n):
            label = rng.randrange(2)
            rows.append(["gj04", label, "" if label else "*", sentence(rng, rng.choice(KEYWORDS[label]))])
        write_tsv(root / "CoLA" / f"{split}.tsv", rows)
        # SST-2: header sentence, label.
        rows = [[ex["sentence"], ex["label"]] for ex in keyword_examples(n, rng.randrange(10**6))]
        write_tsv(root / "SST-2" / f"{split}.tsv", rows, ["sentence", "label"])
        # MRPC: header Quality, #1 ID, #2 ID, #1 String, #2 String (the files start with a BOM).
        rows = [[lab, 100 + i, 200 + i, a, b] for i, (a, b, lab) in enumerate(_pair(rng) for _ in range(n))]
        write_tsv(root / "MRPC" / f"{split}.tsv", rows, ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], bom=True)
        # STS-B: ten columns, score last.
        rows = []
        for i in range(n):
            a, b, lab = _pair(rng)
            rows.append([i, "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", a, b, f"{lab * 4 + rng.random():.3f}"])
        write_tsv(root / "STS-B" / f"{split}.tsv", rows, ["index", "genre", "filename", "year", "old_index",
                                                         "source1", "source2", "sentence1", "sentence2", "score"])
        # QQP: id, qid1, qid2, question1, question2, is_duplicate.
        rows = [[i, 2 * i, 2 * i + 1, a, b, lab] for i, (a, b, lab) in enumerate(_pair(rng) for _ in range(n))]
        write_tsv(root / "QQP" / f"{split}.tsv", rows, ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"])
        # QNLI / RTE: index, two texts, label name. WNLI: label 0/1.
        for folder, names, fields in (("QNLI", ["entailment", "not_entailment"], ["question", "sentence"]),
                                      ("RTE", ["entailment", "not_entailment"], ["sentence1", "sentence2"]),
                                      ("WNLI", ["0", "1"], ["sentence1", "sentence2"])):
            rows = [[i, a, b, names[1 - lab] if folder != "WNLI" else str(lab)]
                    for i, (a, b, lab) in enumerate(_pair(rng) for _ in range(n))]
            write_tsv(root / folder / f"{split}.tsv", rows, ["index", *fields, "label"])
    # MNLI: train has label1 + gold_label, dev has label1..label5 + gold_label; matched and mismatched dev.
    base = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
            "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
    for name, n, labels in (("train", n_train, ["label1"]), ("dev_matched", n_dev, [f"label{k}" for k in range(1, 6)]),
                            ("dev_mismatched", n_dev, [f"label{k}" for k in range(1, 6)])):
        rows = []
        for i in range(n):
            a, b, _ = _pair(rng)
            gold = rng.choice(nli3)
            rows.append([i, 1, f"{i}e", "fiction", "( a )", "( b )", "(ROOT a)", "(ROOT b)", a, b] + [gold] * len(labels) + [gold])
        write_tsv(root / "MNLI" / f"{name}.tsv", rows, base + labels + ["gold_label"])
    return root
