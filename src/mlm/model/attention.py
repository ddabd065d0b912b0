"""Attention over unpadded windows, global or within a local window (ModernBERT's local layers).

Hugging Face's sdpa path gives a local layer a dense (T × T) sliding-window mask: every key is still
computed, and at 8,192 tokens the mask alone is large. Training windows are never padded, so a global layer
needs no mask at all, and a local layer needs only the band |i − j| ≤ w. On a GPU that band is a
FlexAttention block mask: blocks wholly outside the window are skipped, so a local layer costs about
(2w + 1)/T of a global one. Elsewhere (a CPU, or dropout on attention, which FlexAttention lacks) it is SDPA
with a boolean band mask, the same numbers at the dense cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def band_mask(length: int, half_window: int, device: torch.device) -> torch.Tensor:
    """(T, T) boolean: query i may attend key j when |i − j| ≤ half_window."""
    index = torch.arange(length, device=device)
    return (index[:, None] - index[None, :]).abs() <= half_window


def flex_window_attention(query, key, value, half_window: int, scale: float) -> torch.Tensor:
    """FlexAttention restricted to |i − j| ≤ half_window, skipping the blocks outside it."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def in_window(batch, head, q_index, k_index):
        return (q_index - k_index).abs() <= half_window

    length = query.size(-2)
    block_mask = create_block_mask(in_window, None, None, length, length, device=query.device)
    return flex_attention(query, key, value, block_mask=block_mask, scale=scale)


def window_attention(query, key, value, half_window: int | None, dropout: float, scale: float,
                     kernel: str = "auto") -> torch.Tensor:
    """query, key, value (B, heads, T, head dim) → (B, heads, T, head dim), attending every key (half_window
    None) or those within ± half_window. kernel: "auto" (FlexAttention on a GPU without dropout, else SDPA with
    a band mask), "flex" or "sdpa"."""
    length = query.size(-2)
    if half_window is None or half_window >= length - 1:  # the window covers the whole sequence
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scale)
    if kernel == "auto":
        kernel = "flex" if query.is_cuda and dropout == 0.0 else "sdpa"
    if kernel == "flex":
        if dropout:
            raise ValueError("FlexAttention has no dropout")
        return flex_window_attention(query, key, value, half_window, scale)
    mask = band_mask(length, half_window, query.device)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale)
