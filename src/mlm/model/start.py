"""Which model a run starts from: a fresh one of the configured family and shape, a published or earlier
checkpoint (model.init_from: it brings its own shape), or the run's own checkpoint (--resume).

`resolve_init_from` writes the shape of an init_from model into the config before anything else reads it,
so the run's config.json records the model that was trained, and a resumed run compares equal.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from mlm.config import PretrainConfig
from mlm.errors import UserError
from mlm.model.build import build_model, describe, load_config, load_model, model_config
from mlm.model.families import family_of, positions_of, shape_of


def resolve_init_from(cfg: PretrainConfig, log=print) -> PretrainConfig:
    """cfg with model.family and the shape (layers, hidden, heads, intermediate, positions) taken from the
    model.init_from checkpoint; model.size emptied (it is not used). A rotary family's positions may grow
    (context extension); a position table's may not."""
    model = cfg.model
    if not model.init_from:
        return cfg
    config = load_config(model.init_from)
    family = family_of(config)
    positions = positions_of(config)
    if family.rotary:
        positions = max(positions, model.max_positions)
    elif model.rope_theta:
        raise UserError(f"model.rope_theta is for rotary positions; {model.init_from} is a {family.name} model with a "
                        "position table")
    if model.size:
        log(f"model.size={model.size} is not used: the model from {model.init_from} brings its own shape")
    shape = shape_of(config)
    resolved = dataclasses.replace(
        model, family=family.name, size="", layers=shape.layers, hidden=shape.hidden, heads=shape.heads,
        intermediate=shape.intermediate, max_positions=positions,
    )
    cfg = dataclasses.replace(cfg, model=resolved)
    if cfg.data.seq_len > positions:
        raise UserError(f"data.seq_len={cfg.data.seq_len} is longer than the {positions} positions of the model in "
                        f"{model.init_from}")
    return cfg


def phase_config(cfg: PretrainConfig):
    """The init_from model's config as this phase trains it: dropout set anew, and for a rotary family the
    positions and the global RoPE θ of model.max_positions and model.rope_theta."""
    config = load_config(cfg.model.init_from)
    family = family_of(config)
    family.set_dropout(config, cfg.model.dropout)
    if family.rotary:
        config.max_position_embeddings = cfg.model.max_positions + family.position_offset
        if cfg.model.rope_theta:
            config.rope_parameters["full_attention"]["rope_theta"] = cfg.model.rope_theta
    return config


def check_tokenizer_fits(config, tokenizer, source: str) -> None:
    """The data's tokenizer must be the model's: the vocabulary and special ids a model was trained with.
    Refused naming both when the model's vocabulary is smaller or more than padding larger (mlm pads to no
    multiple; published models to 64 or 128), or a special id differs."""
    vocabulary = len(tokenizer)
    if not vocabulary <= config.vocab_size < vocabulary + 128:
        raise UserError(f"the model in {source} has a vocabulary of {config.vocab_size:,} but the data's tokenizer "
                        f"{vocabulary:,}: prepare the data with that model's tokenizer (mlm prepare --tokenizer "
                        f"{source} …)")
    ids = {"pad_token_id": tokenizer.pad_token_id, "cls_token_id": tokenizer.cls_token_id,
           "sep_token_id": tokenizer.sep_token_id}
    if family_of(config).tokenizer_layout == "roberta":  # RoBERTa's config names <s> and </s> bos and eos
        ids.update(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    for key, theirs in ids.items():
        ours = getattr(config, key, None)
        if ours is not None and ours != theirs:
            raise UserError(f"the model in {source} has {key} {ours} but the data's tokenizer {theirs}: prepare the "
                            f"data with that model's tokenizer (mlm prepare --tokenizer {source} …)")


SHAPE_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "vocab_size", "rope_parameters")


def config_differences(loaded, expected) -> list[str]:
    """Where a loaded model's config differs from the expected one in shape, positions or dropout
    ("hidden_size 128 vs 256": loaded vs expected)."""
    theirs, ours = loaded.to_dict(), expected.to_dict()
    keys = [k for k in ours if k in SHAPE_KEYS or "dropout" in k]
    return [f"{k} {theirs.get(k)} vs {ours[k]}" for k in keys if theirs.get(k) != ours[k]]


def expected_config(cfg: PretrainConfig, tokenizer):
    """The config of the model this recipe trains."""
    return phase_config(cfg) if cfg.model.init_from else model_config(cfg.model, tokenizer)


def initial_model(cfg: PretrainConfig, tokenizer, checkpoint: Path | None, log=print) -> nn.Module:
    """The model training starts from: the run's checkpoint, the init_from model, or a fresh one."""
    if checkpoint is not None:
        hf_model = load_model(checkpoint)
        differ = config_differences(hf_model.config, expected_config(cfg, tokenizer))
        if differ:
            raise UserError(
                f"--resume: the model in {checkpoint} is not the configured one ({'; '.join(differ)}, checkpoint vs "
                f"config): resume with the recipe that made it, or start a new run from its weights with "
                f"--model.init_from={checkpoint}"
            )
    elif cfg.model.init_from:
        config = phase_config(cfg)
        check_tokenizer_fits(config, tokenizer, cfg.model.init_from)
        hf_model = load_model(cfg.model.init_from, config)
        log(f"model: {describe(hf_model.config)}, loaded from {cfg.model.init_from}")
    else:
        hf_model = build_model(model_config(cfg.model, tokenizer), cfg.train.seed)
    if hf_model.config.vocab_size < len(tokenizer):
        raise UserError(f"the model's vocabulary ({hf_model.config.vocab_size}) is smaller than the tokenizer's "
                        f"({len(tokenizer)})")
    if cfg.data.seq_len > positions_of(hf_model.config):
        raise UserError(f"data.seq_len={cfg.data.seq_len} is longer than the model's {positions_of(hf_model.config)} "
                        "positions")
    return hf_model
