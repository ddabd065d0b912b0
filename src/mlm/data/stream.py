"""Read prepared token streams and cut them into training sequences.

A split's stream of N tokens is cut into W = N // C windows of C = seq_len - 2 tokens (the remainder is
dropped); each window is wrapped with the family's special tokens (`<s> … </s>` or `[CLS] … [SEP]`).
The sampler orders windows by a seeded pseudo-random permutation per epoch that it computes index by
index (a Feistel network), so the batch of any step is found in O(1) time and memory: resuming needs
only the step number, and the global batch is the same whatever the number of ranks. Several folders at once
(data.sources) are data/mixture.py's.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np

from mlm.data.prepare import read_manifest, shard_fingerprint
from mlm.errors import UserError

OPEN_SHARDS = 256
"""Shard files kept memory-mapped at once by one TokenStream."""


class TokenStream:
    """One split's token stream, memory-mapped across its shard files (a prepared corpus's parts, in order)."""

    def __init__(self, data_dir: str | Path, split: str, manifest: dict | None = None):
        manifest = manifest or read_manifest(data_dir)
        try:
            info = manifest["splits"][split]
            dtype = np.dtype(manifest["dtype"])
            listed = [s for s in info["shards"] if s["tokens"] > 0]
            shards = [(Path(data_dir) / s["file"], int(s["tokens"])) for s in listed]
        except (KeyError, TypeError) as e:
            raise UserError(f"{data_dir}/manifest.json is damaged (no {e}): run `mlm prepare` again") from None
        # A missing, cut-short or replaced shard would fail deep inside training, or train on the wrong tokens.
        for (path, tokens), entry in zip(shards, listed):
            if not path.is_file():
                raise UserError(f"{path} is missing ({tokens:,} tokens expected): run `mlm prepare` again")
            size = path.stat().st_size
            if size != tokens * dtype.itemsize:  # prepare writes exactly the tokens it lists
                state = "truncated" if size < tokens * dtype.itemsize else "longer than listed"
                raise UserError(f"{path} is {state} ({size // dtype.itemsize:,} tokens, the manifest "
                                f"lists {tokens:,}): run `mlm prepare` again")
            if "ends_sha256" in entry and shard_fingerprint(path) != entry["ends_sha256"]:  # (absent before it existed)
                raise UserError(f"{path} is not the shard the manifest lists (its first or last bytes differ: replaced "
                                "or altered after `mlm prepare`): run `mlm prepare` again")
        self.dtype = dtype
        self.vocab_size: int | None = (manifest.get("tokenizer") or {}).get("vocab_size")
        """Every token id is below this: the tokenizer's size, which `mlm prepare` records (read_manifest checks
        that it is there; a manifest made by hand, in tests, may leave it out)."""
        self.paths = [path for path, _ in shards]
        self.lengths = [tokens for _, tokens in shards]
        # starts[i] = offset of shard i in the stream; starts[-1] = total length.
        self.starts = np.cumsum([0] + self.lengths)
        # A prepared corpus may have thousands of parts: at most OPEN_SHARDS are mapped (each holds a file
        # descriptor), the least recently read closed first.
        self._open: collections.OrderedDict[int, np.memmap] = collections.OrderedDict()

    def shard(self, i: int) -> np.memmap:
        """The memory map of shard i (opened on first use)."""
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        if len(self._open) >= OPEN_SHARDS:
            self._open.popitem(last=False)
        self._open[i] = np.memmap(self.paths[i], dtype=self.dtype, mode="r", shape=(self.lengths[i],))
        return self._open[i]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def path_at(self, position: int) -> Path:
        """The shard file that holds token `position` of the stream."""
        return self.paths[int(np.searchsorted(self.starts, position, side="right")) - 1]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, across shard boundaries."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"read [{start}, {start + length}) outside stream of {len(self)} tokens")
        pieces = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            offset = start - int(self.starts[shard])
            take = min(length, self.lengths[shard] - offset)
            pieces.append(self.shard(shard)[offset : offset + take])
            start, length, shard = start + take, length - take, shard + 1
        return np.concatenate(pieces) if len(pieces) > 1 else np.asarray(pieces[0])


class Windows:
    """Fixed-length sequences cut from a token stream and wrapped with special tokens."""

    def __init__(self, stream: TokenStream, seq_len: int, cls_id: int, sep_id: int):
        if seq_len < 3:
            raise UserError(f"seq_len must be at least 3, got {seq_len}")
        self.stream, self.seq_len, self.cls_id, self.sep_id = stream, seq_len, cls_id, sep_id
        self.content_len = seq_len - 2
        self.count = len(stream) // self.content_len
        # Each shard seen as a (rows, content_len) matrix of the windows that lie wholly inside it, so a batch
        # is one fancy-indexing copy per shard it touches instead of one read per window. Shards are mapped
        # only when read (the stream keeps a bounded number open).
        C = self.content_len
        self._shard_rows = []  # per shard: (first window id inside it, that window's offset in the shard, rows)
        for start, length in zip(stream.starts[:-1], stream.lengths):
            first = -(-int(start) // C)  # the first window starting inside this shard
            offset = first * C - int(start)
            self._shard_rows.append((first, offset, max(0, (length - offset) // C)))

    def batch(self, window_ids: np.ndarray) -> np.ndarray:
        """(B,) window ids → (B, seq_len) int64 token ids."""
        window_ids = np.asarray(window_ids, dtype=np.int64)
        out = np.empty((len(window_ids), self.seq_len), dtype=np.int64)
        out[:, 0] = self.cls_id
        out[:, -1] = self.sep_id
        done = np.zeros(len(window_ids), dtype=bool)
        C = self.content_len
        for i, (first, offset, rows) in enumerate(self._shard_rows):
            local = window_ids - first
            inside = (local >= 0) & (local < rows)
            if inside.any():
                matrix = self.stream.shard(i)[offset : offset + rows * C].reshape(rows, C)
                out[inside, 1:-1] = matrix[local[inside]]
                done |= inside
        for row in np.flatnonzero(~done):  # the few windows that straddle two shards
            out[row, 1:-1] = self.stream.read(int(window_ids[row]) * self.content_len, self.content_len)
        # Ids beyond the vocabulary (a damaged shard, another tokenizer's data) would fail deep inside the model's
        # embedding ("index out of range"), or on a GPU as a device-side assert: one max here, on the host, is cheap.
        if self.stream.vocab_size is not None and len(out) and out.max() >= self.stream.vocab_size:
            row, column = np.argwhere(out >= self.stream.vocab_size)[0]
            path = self.stream.path_at(int(window_ids[row]) * C + int(column) - 1)
            raise UserError(f"{path} holds token id {out[row, column]}, but the tokenizer has {self.stream.vocab_size:,} "
                            "tokens: the data is damaged or was prepared with another tokenizer; run `mlm prepare` again")
        return out


class SyntheticWindows:
    """Random token windows for `mlm bench --synthetic`: window w is always the same tokens (a hash of w and
    the position), drawn uniformly from the non-special ids and wrapped with the special tokens."""

    def __init__(self, count: int, seq_len: int, vocab_size: int, cls_id: int, sep_id: int, special_ids: tuple[int, ...]):
        self.count, self.seq_len, self.vocab_size, self.cls_id, self.sep_id = count, seq_len, vocab_size, cls_id, sep_id
        self.specials = sorted(set(special_ids))

    def batch(self, window_ids: np.ndarray) -> np.ndarray:
        """(B,) window ids → (B, seq_len) int64 token ids."""
        ids = np.asarray(window_ids, dtype=np.uint64)[:, None]
        where = ids * np.uint64(self.seq_len) + np.arange(self.seq_len - 2, dtype=np.uint64)  # (B, T - 2)
        draw = (_mix(where, key=0x5EED) % np.uint64(self.vocab_size - len(self.specials))).astype(np.int64)
        for special in self.specials:  # shift past each special id: a bijection onto the non-special ids
            draw += draw >= special
        out = np.empty((len(ids), self.seq_len), dtype=np.int64)
        out[:, 0], out[:, -1], out[:, 1:-1] = self.cls_id, self.sep_id, draw
        return out


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """A cheap 64-bit hash (splitmix64 finaliser) used as the Feistel round function."""
    with np.errstate(over="ignore"):
        x = (x ^ np.uint64(key)) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(31))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(29))


def permute(indices: np.ndarray, n: int, seed: int, rounds: int = 4) -> np.ndarray:
    """A seeded bijection of [0, n), applied elementwise: `permute(arange(n))` is a permutation of arange(n).

    Balanced Feistel network on the smallest even number of bits covering n; values that land outside
    [0, n) are encrypted again (cycle walking), which keeps the map a bijection on [0, n).
    """
    half_bits = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half_bits) - 1)
    keys = [int(k) for k in np.random.default_rng(seed).integers(0, 2**63, size=rounds)]

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half_bits), x & mask
        for key in keys:
            left, right = right, left ^ (_mix(right, key) & mask)
        return (left << np.uint64(half_bits)) | right

    x = np.asarray(indices, dtype=np.uint64)
    out = encrypt(x)
    outside = out >= np.uint64(n)
    while outside.any():
        out[outside] = encrypt(out[outside])
        outside = out >= np.uint64(n)
    return out.astype(np.int64)


class Sampler:
    """Which windows form the global batch of each step: seeded, shuffled per epoch, resumable in O(1)."""

    def __init__(self, num_windows: int, global_batch: int, seed: int):
        if num_windows < 1:
            raise UserError("the training data holds no full sequence")
        self.num_windows, self.global_batch, self.seed = num_windows, global_batch, seed

    def global_batch_ids(self, step: int) -> np.ndarray:
        """Window ids of the global batch of `step` (0-based); epochs follow each other seamlessly."""
        positions = np.arange(step * self.global_batch, (step + 1) * self.global_batch, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_windows)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = permute(offsets[sel], self.num_windows, seed=self.seed * 1_000_003 + int(epoch))
        return out

    def rank_batch_ids(self, step: int, rank: int, world_size: int) -> np.ndarray:
        """Rank `rank`'s share of the global batch of `step`: its contiguous slice, in order."""
        per_rank = self.global_batch // world_size
        return self.global_batch_ids(step)[rank * per_rank : (rank + 1) * per_rank]

    def figures(self, step: int) -> dict[str, float]:
        """Figures for metrics.jsonl after `step` steps: none for one folder, whose records stay as they were (a
        mixture, data/mixture.py, reports each source's epochs)."""
        return {}
