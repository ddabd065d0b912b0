"""Train on several prepared folders at once (data.sources), each an exact share of every step's global batch.

Source i of k (sorted by path) gets share_i windows of every global batch of B: weight_i / total × B rounded by
the largest remainder, so the shares add up to B and are the same at every step. Within its share a source is
read like one folder: its own seeded permutation per epoch (stream.Sampler, with global batch share_i), so
step t reads its windows [t × share_i, (t + 1) × share_i) of its endless sequence of epochs, and a source that
runs out starts its next epoch while the others go on. The global batch is the k shares concatenated in
source order; each rank takes its contiguous slice of it as with one folder. Everything is a function of
(seed, t): not of the ranks, the micro-batch, or where a run was resumed.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from mlm.data.stream import Sampler, Windows
from mlm.errors import UserError

SOURCE_SEED_STRIDE = 2**32
"""Source i's permutations are seeded with train.seed + i × this (train.seed is below 2^32): every (seed, source)
pair its own order, and source 0 that of one folder, so a mixture of one folder trains as data.data_dir."""


def batch_shares(weights: list[float], global_batch: int) -> list[int]:
    """Windows per step of each source: weight / total × global_batch, rounded by the largest remainder (floors
    first, then one more to the largest fractional parts, the earlier source on a tie). Exact arithmetic, so that
    weights 1:2 and 2:4 give the same shares."""
    exact = [Fraction(w) for w in weights]
    quotas = [w / sum(exact) * global_batch for w in exact]
    shares = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (shares[i] - quotas[i], i))  # largest remainder first
    for i in by_remainder[: global_batch - sum(shares)]:
        shares[i] += 1
    return shares


class MixedWindows:
    """Several sources' windows seen as one set: source i's window w is window offsets[i] + w, so the batch
    loader and a rank's slice of the global batch work on a mixture as on one folder."""

    def __init__(self, names: list[str], parts: list[Windows]):
        self.names, self.parts = names, parts
        self.offsets = np.cumsum([0] + [part.count for part in parts])
        self.count = int(self.offsets[-1])
        self.seq_len = parts[0].seq_len

    def batch(self, window_ids: np.ndarray) -> np.ndarray:
        """(B,) window ids → (B, seq_len) int64 token ids, each read from its source."""
        window_ids = np.asarray(window_ids, dtype=np.int64)
        source = np.searchsorted(self.offsets, window_ids, side="right") - 1
        out = np.empty((len(window_ids), self.seq_len), dtype=np.int64)
        for i, part in enumerate(self.parts):
            rows = source == i
            if rows.any():
                out[rows] = part.batch(window_ids[rows] - self.offsets[i])
        return out


class MixtureSampler(Sampler):
    """Which windows of a MixedWindows form the global batch of each step: each source its exact share, in its
    own seeded epochs; O(1) in the step, like Sampler, and rank_batch_ids slices it the same way."""

    def __init__(self, names: list[str], counts: list[int], weights: list[float], global_batch: int, seed: int):
        self.names, self.counts, self.weights = names, counts, weights
        self.shares = batch_shares(weights, global_batch)
        for name, weight, share in zip(names, weights, self.shares):
            if share == 0:
                # From this batch on every source's quota is at least 1, so none can round to 0.
                least = math.ceil(sum(Fraction(w) for w in weights) / min(Fraction(w) for w in weights))
                raise UserError(
                    f"data.sources: {name} (weight {weight:g}) gets no sequence of a global batch of {global_batch}: "
                    f"raise its weight, or train.global_batch to at least {least}"
                )
        self.offsets = np.cumsum([0] + counts)
        self.sources = [Sampler(count, share, seed + i * SOURCE_SEED_STRIDE)
                        for i, (count, share) in enumerate(zip(counts, self.shares))]
        super().__init__(int(self.offsets[-1]), global_batch, seed)

    def global_batch_ids(self, step: int) -> np.ndarray:
        """The window ids of `step`: each source's share, concatenated in source order."""
        return np.concatenate([offset + source.global_batch_ids(step) for offset, source in zip(self.offsets, self.sources)])

    def epochs(self, steps: int) -> dict[str, float]:
        """Passes over each source's training windows in `steps` steps, by source name."""
        return {name: steps * share / count for name, share, count in zip(self.names, self.shares, self.counts)}

    def figures(self, step: int) -> dict[str, float]:
        """epochs/<name>: each source's epochs after `step` steps, for metrics.jsonl."""
        return {f"epochs/{name}": epochs for name, epochs in self.epochs(step).items()}
