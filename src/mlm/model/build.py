"""Model construction: a family's config from a preset and overrides, a fresh or loaded model, and the
training forward.

The model is Hugging Face's own masked LM of its family (mlm.model.families), so a checkpoint is a plain HF
checkpoint with no adapter. Training calls it through `MaskedLMLoss`, a different forward that runs the
prediction head only on the masked positions (15–30% of the tokens) with static shapes, which saves most of
the head's compute and memory at 30k+ vocabularies. The model knows nothing of distribution; engines wrap it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mlm.errors import UserError, first_line
from mlm.model.families import FAMILIES, Family, Shape, family_of, positions_of, shape_of


def preset_shape(model_cfg) -> Shape:
    """model.size's preset of model.family, with model.layers/hidden/heads/intermediate where they are set."""
    family = FAMILIES[model_cfg.family]
    base = family.sizes[model_cfg.size]
    shape = Shape(
        layers=model_cfg.layers or base.layers,
        hidden=model_cfg.hidden or base.hidden,
        heads=model_cfg.heads or base.heads,
        intermediate=model_cfg.intermediate or base.intermediate,
    )
    if shape.hidden % shape.heads:
        raise UserError(f"model.heads={shape.heads} does not divide model.hidden={shape.hidden}: each head gets "
                        "hidden / heads dimensions")
    if (shape.hidden // shape.heads) % 2 and family.rotary:
        raise UserError(f"model.hidden / model.heads = {shape.hidden // shape.heads} is odd: rotary positions "
                        "rotate pairs of dimensions")
    return shape


def model_config(model_cfg, tokenizer):
    """The transformers config of model.family at the configured shape, with the tokenizer's vocabulary and
    special ids."""
    family = FAMILIES[model_cfg.family]
    return family.make_config(preset_shape(model_cfg), tokenizer, model_cfg.max_positions, model_cfg.dropout,
                              model_cfg.rope_theta)


def describe(config) -> str:
    """One line of a model's shape: "modernbert L22/H768, 12 heads, FFN 1152, 8192 positions, vocabulary 50368"."""
    family = family_of(config)
    shape = shape_of(config)
    return (f"{family.name if family else config.model_type} L{shape.layers}/H{shape.hidden}, {shape.heads} heads, "
            f"FFN {shape.intermediate}, {positions_of(config)} positions, vocabulary {config.vocab_size:,}")


def build_model(config, seed: int) -> nn.Module:
    """A freshly initialised HF masked-LM model; the same seed gives the same weights."""
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(seed)
    return AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")


def check_tokenizer_layout(family_name: str, tokenizer) -> None:
    """The tokenizer must use the family's special-token layout (<s> … </s> or [CLS] … [SEP])."""
    from mlm.tokenizer import tokenizer_family

    layout = tokenizer_family(tokenizer)
    if layout != FAMILIES[family_name].tokenizer_layout:
        raise UserError(f"model.family={family_name} but the tokenizer uses {layout} special tokens")


def load_config(name: str | Path):
    """The transformers config of a checkpoint folder or hub name; its family must be one mlm trains.
    Offline, a hub name is read from the local cache at once."""
    from transformers import AutoConfig

    from mlm.hub import cache_only, hub_host, looks_local
    from mlm.model.loading import from_pretrained

    name = str(name)
    local = looks_local(name)
    if local and not (Path(name).expanduser() / "config.json").is_file():
        raise UserError(f"{name} is not a Hugging Face checkpoint (no config.json)")
    from_cache = cache_only(name)
    try:
        config = from_pretrained(AutoConfig, str(Path(name).expanduser()) if local else name, "a model",
                                 local_files_only=from_cache)
    except (ValueError, OSError, KeyError) as e:
        if from_cache:
            raise UserError(f"cannot load model {name!r}: the hub ({hub_host()}) cannot be reached and it is not in "
                            "the local cache; give a checkpoint folder, or run where the hub can be reached") from None
        raise UserError(f"cannot load model {name!r}: {first_line(e)}") from None
    if family_of(config) is None:
        raise UserError(f"{name} is a {config.model_type!r} model; mlm trains the families {', '.join(FAMILIES)}")
    return config


def load_model(name: str | Path, config=None) -> nn.Module:
    """A masked LM from a checkpoint folder or hub name (with `config` in place of its own, e.g. a new dropout)."""
    from transformers import AutoModelForMaskedLM

    from mlm.hub import cache_only, looks_local
    from mlm.model.loading import from_pretrained

    name = str(name)
    config = config if config is not None else load_config(name)
    source = str(Path(name).expanduser()) if looks_local(name) else name
    try:  # a checkpoint is data, never code: from_pretrained runs none of it
        return from_pretrained(AutoModelForMaskedLM, source, "a masked LM", config=config, attn_implementation="sdpa",
                               local_files_only=cache_only(name))
    except (ValueError, OSError, KeyError) as e:  # damaged or missing files
        raise UserError(f"{name}: cannot load it as a masked LM ({first_line(e)})") from None


def set_sdpa_backend(name: str, device: torch.device) -> None:
    """system.sdpa_backend: allow only this kernel for scaled_dot_product_attention on CUDA ("auto": all, and
    PyTorch picks). A process-wide PyTorch setting, read when attention runs or is compiled."""
    if device.type != "cuda" or name == "auto":
        return
    torch.backends.cuda.enable_flash_sdp(name == "flash")
    torch.backends.cuda.enable_mem_efficient_sdp(name == "efficient")
    torch.backends.cuda.enable_cudnn_sdp(name == "cudnn")
    torch.backends.cuda.enable_math_sdp(name == "math")


def install_training_attention(hf_model: nn.Module, fused_qkv: bool = True) -> None:
    """Every attention layer runs mlm's training forward: no mask (training windows are never padded, and a
    mask keeps SDPA off its flash kernel), one QKV matmul where system.fused_qkv asks (BERT and RoBERTa keep
    HF's three query/key/value weights; ModernBERT has one already), and local layers that skip the blocks
    outside their window. Training only: the new forward takes no padding mask, no cache, and returns no
    attention probabilities. Checkpoints, engines and export see HF's parameter names and tensors."""
    family_of(hf_model.config).install_training_attention(hf_model, fused_qkv)


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
        self.family: Family = family_of(hf_model.config)

    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T), positions (B, K) → the prediction head's logits at those positions (B, K, V)."""
        # Sequences are full windows, never padded: the training attention takes no mask (SDPA's fast path).
        hidden = self.hf_model.base_model(input_ids=input_ids, **self.family.encoder_kwargs).last_hidden_state  # (B, T, H)
        index = positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1))  # (B, K, H)
        picked = hidden.gather(1, index)  # (B, K, H)
        # The family's head: BERT's `cls`, RoBERTa's `lm_head`, ModernBERT's `head` then `decoder`: (…, H) → (…, V).
        # On the K picked positions only: static shapes, unlike HF's sparse_prediction (data-dependent).
        return self.family.head(self.hf_model)(picked)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T), positions (B, K), labels (B, K) → mean cross-entropy over labelled positions."""
        logits = self.logits(input_ids, positions)  # (B, K, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
