"""Model families as rows of data, the way GLUE tasks are.

A family says what mlm needs to know of one transformers architecture: its model type, its size presets and
how a shape becomes a config, the special-token layout its tokenizers use, how many position slots it spends
beyond the longest input, where its encoder layers are (what FSDP wraps and the FLOP count reads), what its
prediction head is (what the masked-only head calls), and the training attention that replaces HF's (one
QKV matmul, no mask: training windows are never padded). Adding a family is adding one entry to FAMILIES.

Model code here knows nothing of engines or distribution; the rows import no torch until a model runs.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # torch is imported where a model runs: `mlm tokenizer` reads these rows without it
    import torch
    from torch import nn


@dataclass(frozen=True)
class Shape:
    """An encoder's size: what a preset names and model.layers/hidden/heads/intermediate override."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    """Feed-forward width (for a GLU, the width of each of its two halves)."""


def miniature(layers: int, hidden: int) -> Shape:
    """Google's BERT miniatures: FFN 4H, heads H/64 (at least 2)."""
    return Shape(layers, hidden, max(2, hidden // 64), 4 * hidden)


BERT_SIZES = {
    "tiny": miniature(2, 128),
    "mini": miniature(4, 256),
    "small": miniature(4, 512),
    "medium": miniature(8, 512),
    "base": miniature(12, 768),
    "large": miniature(24, 1024),
}

# ModernBERT's published shapes (answerdotai/ModernBERT-base and -large config.json) and the smaller deep-and-
# narrow ones of the Ettin encoders trained on its code (jhu-clsp/ettin-encoder-17m, -32m, -68m, -1b
# config.json): a GLU feed-forward 1.5 × H wide per half at these sizes, heads of 64. "tiny" is ours, for CPU
# runs, in the same proportions.
MODERNBERT_SIZES = {
    "tiny": Shape(4, 128, 2, 192),
    "17m": Shape(7, 256, 4, 384),
    "32m": Shape(10, 384, 6, 576),
    "68m": Shape(19, 512, 8, 768),
    "base": Shape(22, 768, 12, 1152),
    "large": Shape(28, 1024, 16, 2624),
    "1b": Shape(28, 1792, 28, 3840),
}


@dataclass(frozen=True)
class ReferenceVocabulary:
    """What the model and masking need to know of a tokenizer: the size and special ids of a family's published
    tokenizer (roberta-base, bert-base-uncased, answerdotai/ModernBERT-base), so `mlm bench --synthetic`
    needs no tokenizer file."""

    size: int
    pad_token_id: int
    cls_token_id: int
    sep_token_id: int
    mask_token_id: int
    unk_token_id: int

    def __len__(self) -> int:
        return self.size

    @property
    def all_special_ids(self) -> list[int]:
        return [self.pad_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id, self.unk_token_id]



@dataclass(frozen=True)
class Family:
    """One architecture mlm trains: a row of data plus the few functions that differ between rows."""

    name: str
    model_type: str
    """config.model_type of its checkpoints."""
    sizes: dict[str, Shape]
    """Size presets."""
    default_size: str
    """The preset an empty model.size means."""
    tokenizer_layout: str
    """Special-token layout of its tokenizers: "roberta" (<s> … </s>) or "bert" ([CLS] … [SEP])."""
    tokenizer_kind: str
    """What `mlm tokenizer --family` trains: "bpe-roberta", "wordpiece" or "bpe-bert" (byte-level BPE, [CLS] layout)."""
    position_offset: int
    """Position slots spent beyond the longest input (RoBERTa numbers positions after the padding index: 2)."""
    rotary: bool
    """Positions are rotary (no table): a later phase may extend them and change the global RoPE θ."""
    make_config: Callable
    """(shape, tokenizer, positions, dropout, rope_theta) → its transformers config."""
    encoder_layers: Callable[[nn.Module], nn.ModuleList]
    """The masked LM's encoder layers: what FSDP wraps one by one and the FLOP count sums."""
    head: Callable[[nn.Module], Callable]
    """The masked LM's prediction head, (…, H) → (…, V)."""
    install_training_attention: Callable[[nn.Module, bool], None]
    """Replace every attention layer's forward by mlm's (fused QKV when asked, no mask)."""
    attention_windows: Callable[[object], list]
    """Per layer, the half-width of its local attention window (keys within ± that many positions), or None
    for global attention."""
    set_dropout: Callable[[object, float], None]
    """Set a config's dropout (hidden states and attention probabilities) to this rate."""
    reference_vocabulary: ReferenceVocabulary
    """The size and special ids of its published tokenizer (synthetic tokens for `mlm bench`)."""
    encoder_kwargs: dict = field(default_factory=dict)
    """More arguments of the encoder's forward on the training path (ModernBERT: attention masks given as
    None, so HF does not build the dense ones that mlm's attention never reads)."""


def _bert_like_config(family: str):
    def make(shape: Shape, tokenizer, positions: int, dropout: float, rope_theta: float = 0.0):
        from transformers import BertConfig, RobertaConfig

        common = dict(
            vocab_size=len(tokenizer),
            hidden_size=shape.hidden,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            intermediate_size=shape.intermediate,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            pad_token_id=tokenizer.pad_token_id,
        )
        if family == "roberta":
            return RobertaConfig(**common, max_position_embeddings=positions + 2, type_vocab_size=1,
                                 bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                                 layer_norm_eps=1e-5)
        return BertConfig(**common, max_position_embeddings=positions, type_vocab_size=2)

    return make


def _bert_set_dropout(config, dropout: float) -> None:
    config.hidden_dropout_prob = dropout
    config.attention_probs_dropout_prob = dropout


def _bert_install_attention(hf_model: nn.Module, fused_qkv: bool) -> None:
    for layer in hf_model.base_model.encoder.layer:
        attention = layer.attention.self
        attention.fused_qkv = fused_qkv
        attention.forward = types.MethodType(_bert_attention, attention)


def _bert_attention(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **_):
    """BertSelfAttention/RobertaSelfAttention.forward for training: no mask (windows are never padded, and a
    mask keeps SDPA off its flash kernel), and with fused_qkv one (tokens × d) · (d × 3d) matmul instead of
    three. The weights stay HF's three query/key/value Linear layers."""
    import torch
    import torch.nn.functional as F

    batch, length, _width = hidden_states.shape
    heads, head_size = self.num_attention_heads, self.attention_head_size
    if self.fused_qkv:
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
        bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        qkv = F.linear(hidden_states, weight, bias).view(batch, length, 3, heads, head_size)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head size)
    else:
        query, key, value = (p(hidden_states).view(batch, length, heads, head_size).transpose(1, 2)
                             for p in (self.query, self.key, self.value))
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=self.dropout.p if self.training else 0.0,
                                         scale=self.scaling)
    return out.transpose(1, 2).reshape(batch, length, -1), None


def _modernbert_config(shape: Shape, tokenizer, positions: int, dropout: float, rope_theta: float = 0.0):
    from transformers import ModernBertConfig

    return ModernBertConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        cls_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
        global_attn_every_n_layers=3,
        local_attention=128,
        global_rope_theta=rope_theta or 160_000.0,
        local_rope_theta=10_000.0,
        attention_dropout=dropout,
        embedding_dropout=dropout,
        mlp_dropout=dropout,
        classifier_pooling="mean",  # as the published models: a local layer's [CLS] does not see a long input
    )


def _modernbert_set_dropout(config, dropout: float) -> None:
    config.attention_dropout = config.embedding_dropout = config.mlp_dropout = dropout


def _modernbert_windows(config) -> list:
    return [None if kind == "full_attention" else config.local_attention // 2 for kind in config.layer_types]


def _modernbert_install_attention(hf_model: nn.Module, fused_qkv: bool) -> None:
    # Wqkv is already one matmul: fused_qkv changes nothing here.
    windows = _modernbert_windows(hf_model.config)
    for layer, window in zip(hf_model.base_model.layers, windows):
        layer.attn.half_window = window
        layer.attn.forward = types.MethodType(_modernbert_attention, layer.attn)


def _modernbert_attention(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **_):
    """ModernBertAttention.forward for training: global layers call SDPA with no mask, local layers a kernel
    that skips the blocks outside the window (mlm.model.attention.window_attention)."""
    from transformers.models.modernbert.modeling_modernbert import apply_rotary_pos_emb

    from mlm.model.attention import window_attention

    batch, length, _width = hidden_states.shape
    qkv = self.Wqkv(hidden_states).view(batch, length, 3, -1, self.head_dim)
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head dim)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=1)
    dropout = self.attention_dropout if self.training else 0.0
    out = window_attention(query, key, value, self.half_window, dropout, self.head_dim**-0.5)
    return self.out_drop(self.Wo(out.transpose(1, 2).reshape(batch, length, -1))), None


FAMILIES: dict[str, Family] = {
    "roberta": Family(
        name="roberta", model_type="roberta", sizes=BERT_SIZES, default_size="medium", tokenizer_layout="roberta",
        tokenizer_kind="bpe-roberta", position_offset=2, rotary=False, make_config=_bert_like_config("roberta"),
        encoder_layers=lambda m: m.base_model.encoder.layer, head=lambda m: m.lm_head,
        install_training_attention=_bert_install_attention, attention_windows=lambda c: [None] * c.num_hidden_layers,
        reference_vocabulary=ReferenceVocabulary(50_265, pad_token_id=1, cls_token_id=0, sep_token_id=2,
                                                 mask_token_id=50_264, unk_token_id=3),
        set_dropout=_bert_set_dropout,
    ),
    "bert": Family(
        name="bert", model_type="bert", sizes=BERT_SIZES, default_size="medium", tokenizer_layout="bert",
        tokenizer_kind="wordpiece", position_offset=0, rotary=False, make_config=_bert_like_config("bert"),
        encoder_layers=lambda m: m.base_model.encoder.layer, head=lambda m: m.cls,
        install_training_attention=_bert_install_attention, attention_windows=lambda c: [None] * c.num_hidden_layers,
        reference_vocabulary=ReferenceVocabulary(30_522, pad_token_id=0, cls_token_id=101, sep_token_id=102,
                                                 mask_token_id=103, unk_token_id=100),
        set_dropout=_bert_set_dropout,
    ),
    "modernbert": Family(
        name="modernbert", model_type="modernbert", sizes=MODERNBERT_SIZES, default_size="base",
        tokenizer_layout="bert", tokenizer_kind="bpe-bert", position_offset=0, rotary=True, make_config=_modernbert_config,
        encoder_layers=lambda m: m.base_model.layers, head=lambda m: (lambda x: m.decoder(m.head(x))),
        install_training_attention=_modernbert_install_attention, attention_windows=_modernbert_windows,
        reference_vocabulary=ReferenceVocabulary(50_368, pad_token_id=50_283, cls_token_id=50_281, sep_token_id=50_282,
                                                 mask_token_id=50_284, unk_token_id=50_280),
        set_dropout=_modernbert_set_dropout,
        encoder_kwargs={"attention_mask": {"full_attention": None, "sliding_attention": None}},
    ),
}


def family_of(config) -> Family | None:
    """The family of a transformers config (by model_type), or None for one mlm does not train."""
    return next((f for f in FAMILIES.values() if f.model_type == config.model_type), None)


def positions_of(config) -> int:
    """The longest input a model takes: its position limit less the family's offset slots (RoBERTa's two). A
    model mlm does not train but may score on GLUE (XLM-RoBERTa, CamemBERT) numbers positions as RoBERTa does."""
    family = family_of(config)
    if family is not None:
        return config.max_position_embeddings - family.position_offset
    roberta_like = "roberta" in config.model_type or "camembert" in config.model_type
    return config.max_position_embeddings - (2 if roberta_like else 0)


def shape_of(config) -> Shape:
    return Shape(config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size)


def attended_keys(half_window: int | None, seq_len: int) -> float:
    """Keys each query attends to on average: all of them (global), or those within ± half_window (local)."""
    if half_window is None or half_window >= seq_len - 1:
        return float(seq_len)
    w, s = half_window, seq_len
    # Each query sees 2w + 1 keys, less those cut off by the ends: position i loses max(0, w - i) on the left
    # and as many on the right, summed over i = 0 … w - 1 on each side (w(w + 1)/2 each).
    return (s * (2 * w + 1) - w * (w + 1)) / s


def flops_per_token(hf_model: nn.Module, seq_len: int, head_fraction: float) -> float:
    """Training FLOPs per token (forward + backward): 6·N + Σ_layers 12·d·keys + 6·m·(d·V + d²).

    N the encoder layers' parameters (a GLU's two halves included), d the width, keys the keys a query
    attends in that layer (s for global attention, about 2w + 1 for a local window of ± w), V the
    vocabulary, m the fraction of positions the head predicts (the head is a d × d transform and the d × V
    decoder in every family)."""
    config = hf_model.config
    family = family_of(config)
    n = sum(p.numel() for p in family.encoder_layers(hf_model).parameters())
    d, V = config.hidden_size, config.vocab_size
    attention = sum(12 * d * attended_keys(w, seq_len) for w in family.attention_windows(config))
    return 6 * n + attention + 6 * head_fraction * (d * V + d * d)
