"""`mlm prepare`: corpus → token stream in memory-mappable shards + manifest.json.

Documents are tokenized without special tokens in worker processes and written, in corpus order, as one
stream per split with the tokenizer's separator token after every document. Training cuts windows of any
length from that stream later, so one prepared corpus serves a 128-token and a 512-token phase alike.
A fixed, evenly spread fraction of the documents goes to the validation stream.
"""

from __future__ import annotations

import collections
import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from mlm.atomic import atomic_dir
from mlm.data.corpus import ReadStats, check_sources, iter_documents
from mlm.errors import UserError
from mlm.tokenizer import load_tokenizer, save_tokenizer, tokenizer_family, tokenizer_fingerprint

MANIFEST = "manifest.json"
TOKENIZER_SUBDIR = "tokenizer"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")


@dataclass
class PrepareConfig:
    """Settings of `mlm prepare`."""

    sources: list[str]
    """Corpus: file paths, directories or globs (.txt one document per line, .jsonl, .parquet), `hf:NAME[:CONFIG]`, or `demo`."""
    tokenizer: str
    """Tokenizer directory or hub name."""
    out_dir: str
    """Where the shards and manifest.json go; must not exist yet (unless overwrite)."""
    val_fraction: float = 0.01
    """Fraction of documents held out for validation, spread evenly over the corpus."""
    workers: int = field(default_factory=lambda: max(1, (os.cpu_count() or 1) - 1))
    """Tokenizer worker processes; 1 tokenizes in this process."""
    shard_tokens: int = 2**28
    """Tokens per shard file (the last shard of a split is shorter)."""
    text_field: str = "text"
    """Field of .jsonl / .parquet / hub records that holds the text."""
    hf_split: str = "train"
    """Split of a hub dataset to read."""
    docs_per_task: int = 512
    """Documents sent to a worker at a time."""
    overwrite: bool = False
    """Replace an existing out_dir."""
    document_per_file: bool = False
    """Each .txt file is one document (a book, an article) instead of one document per line."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.workers < 1:
            raise UserError(f"workers must be at least 1, got {self.workers}")
        if self.shard_tokens < 1:
            raise UserError(f"shard_tokens must be positive, got {self.shard_tokens}")


def is_validation(doc_index: int, val_fraction: float) -> bool:
    """True for an evenly spread `val_fraction` of document indices (exactly floor(n * fraction) of the first n)."""
    return int((doc_index + 1) * val_fraction) > int(doc_index * val_fraction)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends token ids to `<split>-NNNNN.bin` files of at most `shard_tokens` tokens each."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.documents = 0
        self._file = None
        self._in_shard = 0

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._file is None or self._in_shard == self.shard_tokens:
                self._next_shard()
            take = min(len(ids), self.shard_tokens - self._in_shard)
            self._file.write(ids[:take].tobytes())
            self._in_shard += take
            self.shards[-1]["tokens"] += take
            ids = ids[take:]

    def _next_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.out_dir / name, "wb")
        self.shards.append({"file": name, "tokens": 0})
        self._in_shard = 0

    def close(self) -> dict:
        if self._file is not None:
            self._file.close()
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents, "shards": self.shards}


# Worker state: each worker process loads the tokenizer once.
_worker_tokenizer = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker process = one core
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_file(tokenizer_json)


def _encode(texts: list[str]) -> list[np.ndarray]:
    encodings = _worker_tokenizer.encode_batch(texts, add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]


def _batched(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode_in_order(batches: Iterator[list[str]], tokenizer_json: str, workers: int) -> Iterator[list[np.ndarray]]:
    """Tokenize batches in worker processes, yielding results in corpus order.

    At most 2 batches per worker are in flight, so memory stays bounded however large the corpus
    (Pool.imap would read the whole corpus ahead into its task queue).
    """
    if workers == 1:
        _init_worker(tokenizer_json)
        for batch in batches:
            yield _encode(batch)
        return
    # spawn, not fork: a forked copy of a process that already used the Rust tokenizer can deadlock.
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tokenizer_json,)) as pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def prepare(cfg: PrepareConfig, log=print) -> dict:
    """Tokenize the corpus into `cfg.out_dir`; returns the manifest. Writes to a temporary folder, then renames."""
    check_sources(cfg.sources, log)
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not cfg.overwrite:
        raise UserError(f"output directory {out_dir} already exists and is not empty (pass --overwrite to replace it)")
    tokenizer = load_tokenizer(cfg.tokenizer)
    dtype = token_dtype(len(tokenizer))
    with atomic_dir(out_dir) as tmp:
        save_tokenizer(tokenizer, tmp / TOKENIZER_SUBDIR)
        manifest = _write_streams(cfg, tokenizer, dtype, tmp, log)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _write_streams(cfg: PrepareConfig, tokenizer, dtype: np.dtype, out: Path, log) -> dict:
    stats = ReadStats()
    writers = {split: ShardWriter(out, split, dtype, cfg.shard_tokens) for split in SPLITS}
    separator = np.array([tokenizer.sep_token_id], dtype=np.uint32)
    start = time.time()
    docs = iter_documents(cfg.sources, stats, cfg.text_field, cfg.hf_split, cfg.document_per_file)
    batches = _batched(docs, cfg.docs_per_task)
    doc_index = 0
    for encoded in _encode_in_order(batches, str(out / TOKENIZER_SUBDIR / "tokenizer.json"), cfg.workers):
        for ids in encoded:
            writer = writers["validation" if is_validation(doc_index, cfg.val_fraction) else "train"]
            writer.write(np.concatenate([ids, separator]))
            writer.documents += 1
            doc_index += 1
    splits = {split: w.close() for split, w in writers.items()}
    if stats.documents == 0:
        raise UserError(f"the corpus {' '.join(cfg.sources)} is empty: no non-blank document found")
    if stats.bad_utf8:
        log(stats.bad_utf8_warning())
    if cfg.val_fraction > 0 and splits["validation"]["documents"] == 0:
        log(
            f"warning: no document went to validation ({stats.documents:,} documents × --val-fraction "
            f"{cfg.val_fraction} < 1), so pretraining will report no validation loss: use --val-fraction "
            f"{min(0.5, 1.0 / stats.documents):.3g} or more"
        )
    elapsed = time.time() - start
    total = sum(s["tokens"] for s in splits.values())
    log(
        f"prepared {stats.documents:,} documents → {splits['train']['tokens']:,} train + "
        f"{splits['validation']['tokens']:,} validation tokens in {elapsed:.1f}s ({total / max(elapsed, 1e-9):,.0f} tokens/s)"
    )
    return {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "tokenizer": {
            "name": cfg.tokenizer,
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "family": tokenizer_family(tokenizer),
            "vocab_size": len(tokenizer),
            "separator_id": tokenizer.sep_token_id,
        },
        "sources": cfg.sources,
        "val_fraction": cfg.val_fraction,
        "document_per_file": cfg.document_per_file,
        "documents": stats.documents,
        "bad_utf8": stats.bad_utf8,
        "splits": splits,
    }


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{data_dir} holds no prepared data ({MANIFEST} missing): run `mlm prepare` first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged (not valid JSON: {e}): run `mlm prepare` again") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path} is damaged (not a JSON object): run `mlm prepare` again")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has format version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    return manifest
