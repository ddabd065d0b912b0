"""Dynamic masking on the device, fresh for every batch.

Default (RoBERTa's original implementation): a fixed number of positions per sequence,
round(rate × non-special tokens), so the masked positions form a (B, K) tensor of static shape and the
prediction head runs only on those B×K positions. Option: per-token Bernoulli(rate); the count then
varies, so K = T and unmasked slots carry the ignore label.
Chosen positions are replaced 80/10/10 by the mask token / a random token / themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MaskingSpec:
    """How tokens are chosen and replaced."""

    rate: float
    """Fraction of non-special tokens to predict."""
    mask_token_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    """Ids never chosen (and never drawn as random replacements)."""
    per_token: bool = False
    """Bernoulli(rate) per token instead of a fixed count per sequence."""
    mask_fraction: float = 0.8
    random_fraction: float = 0.1


def masked_count(seq_len: int, rate: float) -> int:
    """Positions masked per sequence with the fixed-count scheme (the 2 special tokens excluded); at least 1."""
    return max(1, round(rate * (seq_len - 2)))


def mask_tokens(
    input_ids: torch.Tensor,
    spec: MaskingSpec,
    generator: torch.Generator,
    row_offset: int = 0,
    total_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T) ids → (masked ids (B, T), positions (B, K), labels (B, K) with IGNORE_INDEX where not predicted).

    The random draws are made for `total_rows` rows and rows [row_offset, row_offset + B) are kept, so a
    rank holding one slice of a global batch masks it exactly as one process holding the whole batch would.
    Everything runs on input_ids' device with no host synchronisation.
    """
    B, T = input_ids.shape
    device = input_ids.device
    total_rows = total_rows or B

    def ours(draw: torch.Tensor) -> torch.Tensor:
        return draw[row_offset : row_offset + B]

    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for token_id in spec.special_ids:
        special |= input_ids == token_id
    scores = ours(torch.rand((total_rows, T), generator=generator, device=device))  # (B, T)
    if spec.per_token:
        positions = torch.arange(T, device=device).expand(B, T)
        chosen = (scores < spec.rate) & ~special  # (B, T)
    else:
        k = masked_count(T, spec.rate)
        scores = scores.masked_fill(special, 2.0)  # specials sort last, never among the k smallest
        positions = scores.topk(k, dim=1, largest=False).indices  # (B, K)
        chosen = ~special.gather(1, positions)  # all true unless a row has fewer than k non-special tokens
    originals = input_ids.gather(1, positions)
    labels = torch.where(chosen, originals, IGNORE_INDEX)

    # 80% mask, 10% random token, 10% unchanged, decided per chosen position.
    drawn_shape = (total_rows, positions.shape[1])
    action = ours(torch.rand(drawn_shape, generator=generator, device=device))  # (B, K)
    use_mask = chosen & (action < spec.mask_fraction)
    use_random = chosen & (action >= spec.mask_fraction) & (action < spec.mask_fraction + spec.random_fraction)
    random_ids = ours(_random_non_special(drawn_shape, spec, generator, device))  # (B, K)
    replacement = torch.where(use_mask, spec.mask_token_id, torch.where(use_random, random_ids, originals))
    masked = input_ids.scatter(1, positions, replacement)
    return masked, positions, labels


def _random_non_special(shape, spec: MaskingSpec, generator: torch.Generator, device) -> torch.Tensor:
    """Uniform ids from the vocabulary with special tokens excluded (drawn over the non-special ids)."""
    specials = sorted(set(spec.special_ids))
    draw = torch.randint(0, spec.vocab_size - len(specials), shape, generator=generator, device=device)
    # Shift each draw past every special id at or below it: a bijection onto the non-special ids.
    for s in specials:
        draw = draw + (draw >= s).long()
    return draw
