"""Model presets and construction.

The model is Hugging Face's own BertForMaskedLM / RobertaForMaskedLM, so a checkpoint is a plain HF
checkpoint with no adapter. Training calls it through `MaskedLMLoss`, a different forward that runs the
prediction head only on the masked positions (about 15% of the tokens), which saves most of the head's
compute and memory at 30k+ vocabularies. The model knows nothing of distribution; engines wrap it.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mlm.config import SIZES
from mlm.errors import UserError, first_line


def model_positions(config) -> int:
    """The longest input the model takes: its position table, less RoBERTa's two padding-offset slots."""
    limit = config.max_position_embeddings
    if "roberta" in config.model_type or "camembert" in config.model_type:
        limit -= 2  # RoBERTa positions start after the padding index
    return limit


def hf_config(family: str, size: str, tokenizer, max_positions: int = 512, dropout: float = 0.1):
    """The transformers config of a preset, with the tokenizer's vocabulary and special ids."""
    from transformers import BertConfig, RobertaConfig

    if size not in SIZES:
        raise UserError(f"unknown model size {size!r} (choose {', '.join(SIZES)})")
    layers, hidden = SIZES[size]
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(2, hidden // 64),
        intermediate_size=4 * hidden,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "roberta":
        # RoBERTa numbers positions from padding_idx + 1, so it needs 2 more position embeddings.
        return RobertaConfig(
            **common,
            max_position_embeddings=max_positions + 2,
            type_vocab_size=1,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            layer_norm_eps=1e-5,
        )
    if family == "bert":
        return BertConfig(**common, max_position_embeddings=max_positions, type_vocab_size=2)
    raise UserError(f"unknown model family {family!r} (choose roberta, bert)")


def build_model(config, seed: int) -> nn.Module:
    """A freshly initialised HF masked-LM model; the same seed gives the same weights."""
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(seed)
    return AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")


def load_model(path: str | Path) -> nn.Module:
    from transformers import AutoModelForMaskedLM

    from mlm.model.loading import from_pretrained

    if not (Path(path) / "config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face checkpoint (no config.json)")
    try:  # a checkpoint is data, never code: from_pretrained runs none of it
        return from_pretrained(AutoModelForMaskedLM, path, "a BERT/RoBERTa masked LM", attn_implementation="sdpa")
    except (ValueError, OSError, KeyError) as e:  # damaged or missing files
        raise UserError(f"{path}: cannot load it as a BERT/RoBERTa masked LM ({first_line(e)})") from None


def set_sdpa_backend(name: str, device: torch.device) -> None:
    """system.sdpa_backend: allow only this kernel for scaled_dot_product_attention on CUDA ("auto": all, and
    PyTorch picks). A process-wide PyTorch setting, read when attention runs or is compiled."""
    if device.type != "cuda" or name == "auto":
        return
    torch.backends.cuda.enable_flash_sdp(name == "flash")
    torch.backends.cuda.enable_mem_efficient_sdp(name == "efficient")
    torch.backends.cuda.enable_cudnn_sdp(name == "cudnn")
    torch.backends.cuda.enable_math_sdp(name == "math")


def fuse_qkv_projections(hf_model: nn.Module) -> None:
    """system.fused_qkv: every self-attention layer computes its query, key and value in one matmul.

    The weights stay HF's three `query`/`key`/`value` Linear layers (checkpoints, engines and export see
    the same names and tensors); each forward concatenates them (3·d² values, small beside the activations)
    and runs one (tokens × d) · (d × 3d) matmul instead of three. Training only: the new forward takes no
    cache and returns no attention probabilities."""
    for layer in hf_model.base_model.encoder.layer:
        attention = layer.attention.self
        attention.forward = types.MethodType(_fused_qkv_attention, attention)


def _fused_qkv_attention(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **_):
    """BertSelfAttention/RobertaSelfAttention.forward with one QKV matmul; SDPA as in HF's "sdpa" path."""
    batch, length, _width = hidden_states.shape
    weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
    bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
    qkv = F.linear(hidden_states, weight, bias).view(batch, length, 3, self.num_attention_heads, self.attention_head_size)
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head size)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                         dropout_p=self.dropout.p if self.training else 0.0, scale=self.scaling)
    return out.transpose(1, 2).reshape(batch, length, -1), None


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: biases and LayerNorm weights (all 1-D tensors) get no weight decay,
    as in BERT/RoBERTa pretraining and fine-tuning."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class MaskedLMLoss(nn.Module):
    """Training forward of an HF masked LM: encoder on all tokens, head on the masked positions only."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        # The HF model is the only submodule, so every parameter has one name ("hf_model.…") for the
        # engines that shard or checkpoint by name.
        self.hf_model = hf_model

    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T), positions (B, K) → the prediction head's logits at those positions (B, K, V)."""
        # Sequences are full windows, never padded, so no attention mask is needed (and SDPA takes its fast path).
        hidden = self.hf_model.base_model(input_ids=input_ids).last_hidden_state  # (B, T, H)
        index = positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1))  # (B, K, H)
        picked = hidden.gather(1, index)  # (B, K, H)
        # BertForMaskedLM calls its head `cls`, RobertaForMaskedLM `lm_head`; both map (…, H) → (…, V).
        head = self.hf_model.cls if hasattr(self.hf_model, "cls") else self.hf_model.lm_head
        return head(picked)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T), positions (B, K), labels (B, K) → mean cross-entropy over labelled positions."""
        logits = self.logits(input_ids, positions)  # (B, K, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
