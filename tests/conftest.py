"""Shared fixtures: a generated corpus, tokenizers trained in-process, prepared data. No downloads."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import pytest
import torch

from mlm.config import DataConfig, EvalConfig, ModelConfig, PretrainConfig, RunConfig, SystemConfig, TrainConfig
from mlm.data.prepare import PrepareConfig, prepare
from mlm.tokenizer import train_tokenizer

SUBJECTS = ["the cat", "a dog", "the old farmer", "my sister", "the government", "a small bird", "the team"]
VERBS = ["sees", "likes", "chases", "builds", "finds", "reads", "sells"]
OBJECTS = ["a red ball", "the river", "an apple", "the new house", "a long letter", "the market", "green fields"]


def make_documents(n: int, seed: int = 0) -> list[str]:
    """Documents of 1-6 template sentences: structured enough that a tiny model's loss falls quickly."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = [
            f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
            for _ in range(rng.randint(1, 6))
        ]
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(make_documents(1500)) + "\n")
    return path


FAMILY_NAMES = ["roberta", "bert", "modernbert"]


@pytest.fixture(scope="session", params=FAMILY_NAMES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    docs = make_documents(1500)
    dirs = {}
    for fam in FAMILY_NAMES:
        dirs[fam] = root / fam
        train_tokenizer(docs, fam, 400, dirs[fam])
    return dirs


@pytest.fixture(scope="session")
def data_dirs(tmp_path_factory, corpus_file, tokenizer_dirs) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    dirs = {}
    for fam, tok in tokenizer_dirs.items():
        dirs[fam] = root / fam
        prepare(PrepareConfig([str(corpus_file)], str(tok), str(dirs[fam]), val_fraction=0.05, workers=1), log=lambda _: None)
    return dirs


def hf_config(family: str, size: str, tokenizer, max_positions: int = 512, dropout: float = 0.1):
    """The transformers config of a family's preset, as `mlm pretrain` builds it."""
    from mlm.model.build import model_config

    return model_config(ModelConfig(family=family, size=size, max_positions=max_positions, dropout=dropout), tokenizer)


def moved_off_init(model, scale: float):
    """The model with every weight moved off its initial value by `scale` standard normals (a fixed draw), so a
    comparison is not of a fresh init."""
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model


def eager_copy(model):
    """The plain HF masked LM (eager attention, head on every position) holding the same weights."""
    from transformers import AutoModelForMaskedLM

    plain = AutoModelForMaskedLM.from_config(model.config, attn_implementation="eager")
    plain.load_state_dict(model.state_dict())
    return plain


def tiny_config(data_dir: Path, out_dir: Path, family: str = "roberta", steps: int = 30, **train) -> PretrainConfig:
    """A CPU-fast recipe: tiny model, 32-token sequences."""
    return PretrainConfig(
        model=ModelConfig(family=family, size="tiny", max_positions=64),
        data=DataConfig(data_dir=str(data_dir), seq_len=32),
        train=TrainConfig(**{"steps": steps, "global_batch": 16, "lr": 2e-3, "warmup_steps": min(3, steps), **train}),
        system=SystemConfig(micro_batch=8, device="cpu", compile="off"),
        run=RunConfig(out_dir=str(out_dir), log_every=1, checkpoint_every=10, progress=False),
        eval=EvalConfig(every=10, sequences=32),
    )


@contextlib.contextmanager
def poison_steps(steps: set[int]):
    """The training forward passes of the given (1-based) steps give NaN, from the embeddings on: a real fault
    in the real loop, engine and optimizer. The step is the one the loop is taking (its masked_batch call), so
    forward passes outside the steps (a start-up probe, evaluation) are never poisoned."""
    import mlm.train.pretrain as loop

    taking = {"step": None}
    masked_batch = loop.masked_batch

    def tracking_masked_batch(s, step):
        taking["step"] = step + 1
        return masked_batch(s, step)

    def hook(module, args, output):
        if type(module).__name__.endswith("Embeddings") and module.training and taking["step"] in steps:
            return output * float("nan")

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    loop.masked_batch = tracking_masked_batch
    try:
        yield
    finally:
        loop.masked_batch = masked_batch
        handle.remove()
