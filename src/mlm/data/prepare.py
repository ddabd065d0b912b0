"""`mlm prepare`: corpus → token stream in memory-mappable parts + manifest.json.

The corpus is cut into work units (corpus.py). Worker processes each read their own units, tokenize the
documents without special tokens, and write every unit as its own part: one stream per split with the
tokenizer's separator token after every document, a few files renamed into place, then a small JSON record
that marks the unit done. Training cuts windows of any length from the streams later, so one prepared
corpus serves a 128-token and a 512-token phase alike. An evenly spread fraction of each unit's documents
goes to the validation stream.

While it runs, the data lives in `OUT.partial/` (plan.json, tokenizer/, parts/). A killed run restarted with
the same arguments skips the units already done; `--num-shards N --shard-index I` does one share of the
units (several machines at once); when every unit is done, the manifest is written, listing the parts in
unit order, and `OUT.partial` is renamed `OUT`. The output depends only on the corpus and the settings, not
on the number of workers or shares, so it is byte for byte the same however it was made.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import queue as queue_module
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mlm.data.corpus import (DEMO_SOURCE, HF_PREFIX, ReadOptions, ReadStats, Unit, check_sources, input_fingerprint,
                             plan_units, read_unit)
from mlm.atomic import refuse_link, write_file
from mlm.errors import UserError
from mlm.tokenizer import load_tokenizer, save_tokenizer, tokenizer_family, tokenizer_fingerprint

MANIFEST = "manifest.json"
PLAN = "plan.json"
TOKENIZER_SUBDIR = "tokenizer"
PARTS_SUBDIR = "parts"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
KILL_AFTER_UNITS = "MLM_PREPARE_KILL_AFTER_UNITS"
"""Tests only: once this many units are done, the main process is killed (SIGKILL), as a crash would."""


class WorkerDied(UserError):
    """A worker process was killed (out of memory?): not the input's fault, so the units done are kept."""


MAX_WORKERS = 1024
"""More worker processes than any machine has cores: a typo."""


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class PrepareConfig:
    """Settings of `mlm prepare`."""

    sources: list[str]
    """Corpus: file paths, directories or globs (.txt one document per line, .jsonl, either also .gz/.zst,
    .parquet), a `save_to_disk` folder, `hf:NAME[:CONFIG]`, or `demo`."""
    tokenizer: str
    """Tokenizer directory or hub name."""
    out_dir: str
    """Where the parts and manifest.json go; work in progress lives in `out_dir.partial` until done."""
    val_fraction: float = 0.01
    """Fraction of documents held out for validation, spread evenly over each work unit."""
    workers: int = field(default_factory=_default_workers)
    """Processes that read and tokenize work units; 1 does it in this process."""
    shard_tokens: int = 2**28
    """Most tokens per part file (a unit writes more files when it holds more)."""
    text_field: str = "text"
    """Field of .jsonl / .parquet / dataset records that holds the text."""
    hf_split: str = "train"
    """Split of a hub dataset (or of a saved DatasetDict) to read."""
    docs_per_task: int = 512
    """Documents tokenized in one call."""
    overwrite: bool = False
    """Replace an existing data directory (or unfinished one) made with other settings or input."""
    document_per_file: bool = False
    """Each .txt file is one document (a book, an article) instead of one document per line."""
    unit_bytes: int = 0
    """Input bytes per work unit (large .txt/.jsonl files are cut at line boundaries; parquet by row groups);
    0 chooses: the local files' total size / 256, between 1 MiB and 64 MiB."""
    num_shards: int = 1
    """Split the work units into this many shares, each prepared by its own `mlm prepare` (machines)."""
    shard_index: int = 0
    """Which share this run prepares, 0 ≤ shard_index < num_shards."""
    max_documents: int = 0
    """Stop after this many documents (a quick sample, read in corpus order); 0 reads everything."""
    dedup: bool = False
    """Drop a document identical (same hash) to an earlier one of the same work unit."""
    progress: bool = True
    """A progress bar on a terminal, plain lines (every log_every_s) otherwise; False shows neither."""
    log_every_s: float = 30.0
    """Seconds between plain progress lines when stderr is not a terminal."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise UserError(f"workers must be between 1 and {MAX_WORKERS}, got {self.workers}")
        if not self.text_field.strip():
            raise UserError("--text-field is empty: name the field of .jsonl/.parquet records that holds the text")
        if self.shard_tokens < 1:
            raise UserError(f"shard_tokens must be positive, got {self.shard_tokens}")
        if self.unit_bytes < 0:
            raise UserError(f"the work unit size (--unit-mb) must be positive (or 0: automatic), got {self.unit_bytes} bytes")
        if self.num_shards < 1:
            raise UserError(f"--num-shards must be at least 1, got {self.num_shards}")
        if not 0 <= self.shard_index < self.num_shards:
            raise UserError(f"--shard-index {self.shard_index} is out of range: use 0 to {self.num_shards - 1} "
                            f"for --num-shards {self.num_shards}")
        if self.max_documents < 0:
            raise UserError(f"--max-documents must be positive (or 0 for all), got {self.max_documents}")
        if self.max_documents and self.num_shards > 1:
            raise UserError("--max-documents reads a sample in corpus order on one machine: leave out --num-shards")


def is_validation(doc_index: int, val_fraction: float) -> bool:
    """True for an evenly spread `val_fraction` of document indices (exactly floor(n * fraction) of the first n)."""
    return int((doc_index + 1) * val_fraction) > int(doc_index * val_fraction)


TOKEN_DTYPES = ("uint16", "uint32")
"""What token ids are stored as: uint16 while the vocabulary fits, else uint32 (token_dtype)."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def partial_dir(out_dir: str | Path) -> Path:
    """Where a preparation in progress keeps its plan, tokenizer and finished parts."""
    out_dir = Path(out_dir)
    if out_dir.name in ("", ".."):  # ".", "..", "/": the finished folder replaces OUT, so OUT needs a name
        raise UserError(f"--out {str(out_dir)!r} names no folder of its own: name the data folder (e.g. --out data)")
    return out_dir.with_name(out_dir.name + ".partial")


def _lock_path(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.lock")


def _lock(out_dir: Path):
    from filelock import FileLock

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    refuse_link(_lock_path(out_dir))  # filelock 3 opens it with O_TRUNC, emptying the file a link points to
    return FileLock(str(_lock_path(out_dir)))


# ---- the plan: units + everything that decides the output -----------------------------------------------
def make_plan(cfg: PrepareConfig, tokenizer) -> dict:
    """The work units and every setting that decides the bytes written, with a fingerprint of them all.
    Workers, shares and progress settings are left out: they change how, not what."""
    options = ReadOptions(cfg.text_field, cfg.hf_split, cfg.document_per_file)
    sources = [_resolved(source) for source in cfg.sources]
    units = plan_units(sources, options, cfg.unit_bytes)
    settings = {
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "sources": sources,
        "text_field": cfg.text_field,
        "hf_split": cfg.hf_split,
        "document_per_file": cfg.document_per_file,
        "val_fraction": cfg.val_fraction,
        "shard_tokens": cfg.shard_tokens,
        "unit_bytes": cfg.unit_bytes,
        "max_documents": cfg.max_documents,
        "dedup": cfg.dedup,
    }
    body = {"settings": settings, "inputs": input_fingerprint(units), "units": [dataclasses.asdict(u) for u in units]}
    fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "tokenizer": {
            "name": cfg.tokenizer,
            "fingerprint": settings["tokenizer"],
            "family": tokenizer_family(tokenizer),
            "vocab_size": len(tokenizer),
            "separator_id": tokenizer.sep_token_id,
        },
        "dtype": token_dtype(len(tokenizer)).name,
        **body,
    }


def _resolved(source: str) -> str:
    """A local corpus path (or glob) made absolute, so that `c.txt` and `/home/me/c.txt` plan the same data."""
    if source == DEMO_SOURCE or source.startswith(HF_PREFIX):
        return source
    return str(Path(source).resolve())


def _plan_difference(old: dict, new: dict, verb: str = "started") -> str:
    """What changed between two plans, in words; `verb` says what was done with the old one."""
    if old["settings"]["tokenizer"] != new["settings"]["tokenizer"]:
        return (f"it was {verb} with tokenizer {old['tokenizer']['name']!r} (fingerprint {old['settings']['tokenizer']}), "
                f"not {new['tokenizer']['name']!r} (fingerprint {new['settings']['tokenizer']})")
    for key, value in new["settings"].items():
        if old["settings"].get(key) != value:
            return f"it was {verb} with {key} = {old['settings'].get(key)!r}, not {value!r}"
    old_inputs = {path: (size, mtime) for path, size, mtime in old["inputs"]}
    for path, size, mtime in new["inputs"]:
        if old_inputs.get(path) != (size, mtime):
            return f"the corpus file {path} changed since it was {verb} (size or modification time)"
    return f"the corpus is not the one it was {verb} with (other files or dataset shards)"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged ({e}): remove it and run `mlm prepare` again") from None


def _write_json(path: Path, data: dict) -> None:
    """Write whole or not at all, never through a link: a new file, then a rename."""
    write_file(path, json.dumps(data, indent=2) + "\n")


def _open_work_dir(work: Path, plan: dict, tokenizer, overwrite: bool, log) -> bool:
    """Create the work folder for this plan (True), or check that the one there was made by the same plan (False)."""
    if work.exists():
        if (work / PLAN).is_file():
            old = _read_json(work / PLAN)
            if old.get("fingerprint") == plan["fingerprint"]:
                return False
            if not overwrite:
                raise UserError(f"{work} holds an unfinished preparation that cannot be continued: "
                                f"{_plan_difference(old, plan)}; pass --overwrite to start again, or use another --out")
            log(f"note: {work}: starting again ({_plan_difference(old, plan)})")
        shutil.rmtree(work)
    for stale in itertools.chain(work.parent.glob(f".{work.name}.tmp*"), work.parent.glob(f".{work.name[:-8]}.tmp*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed start (or a killed write of the old layout)
    tmp = work.with_name(f".{work.name}.tmp{os.getpid()}")
    (tmp / PARTS_SUBDIR).mkdir(parents=True)
    save_tokenizer(tokenizer, tmp / TOKENIZER_SUBDIR)
    _write_json(tmp / PLAN, plan)
    os.replace(tmp, work)
    return True


# ---- one work unit → one part ----------------------------------------------------------------------------
@dataclass(frozen=True)
class UnitSettings:
    """What a worker needs to turn a unit into a part."""

    parts_dir: str
    options: ReadOptions
    val_fraction: float
    shard_tokens: int
    dtype: str
    separator_id: int
    docs_per_task: int
    dedup: bool


class PartWriter:
    """Appends token ids to `<unit>-<split>-NNNNN.bin` files of at most `shard_tokens` tokens each, under
    temporary names until `commit` renames them."""

    def __init__(self, parts_dir: Path, stem: str, split: str, dtype: np.dtype, shard_tokens: int):
        self.parts_dir, self.stem, self.split, self.dtype, self.shard_tokens = parts_dir, stem, split, dtype, shard_tokens
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
            try:
                self._file.write(ids[:take].tobytes())
            except OSError as e:  # a full disk or a file size limit: a failed write's error names no file
                raise OSError(e.errno, e.strerror, e.filename or self._file.name) from e
            self._in_shard += take
            self.shards[-1]["tokens"] += take
            ids = ids[take:]

    def _tmp(self, name: str) -> Path:
        return self.parts_dir / f".{name}.tmp{os.getpid()}"

    def _next_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.stem}-{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self._tmp(name), "wb")
        self.shards.append({"file": f"{PARTS_SUBDIR}/{name}", "tokens": 0})
        self._in_shard = 0

    def commit(self) -> dict:
        if self._file is not None:
            try:
                self._file.close()  # writes what is left in the buffer
            except OSError as e:
                raise OSError(e.errno, e.strerror, e.filename or self._file.name) from e
        for shard in self.shards:
            name = Path(shard["file"]).name
            shard["ends_sha256"] = shard_fingerprint(self._tmp(name))
            os.replace(self._tmp(name), self.parts_dir / name)
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents, "shards": self.shards}

    def discard(self) -> None:
        """Close and remove the temporary files: the unit failed (bad input), nothing of it is kept."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # a full disk cannot keep what is being removed
                pass
        for shard in self.shards:
            self._tmp(Path(shard["file"]).name).unlink(missing_ok=True)


def unit_stem(index: int) -> str:
    return f"{index:06d}"


def _marker(parts_dir: Path, index: int) -> Path:
    """The JSON record whose presence says that unit `index` is done."""
    return parts_dir / f"{unit_stem(index)}.json"


def process_unit(index: int, unit: Unit, s: UnitSettings, encode: Callable[[list[str]], list[list[int]]],
                 report: Callable[[int, int, int], None], max_documents: int | None = None) -> dict:
    """Read, tokenize and write one unit; returns (and writes, last) its record. `max_documents` stops early."""
    parts_dir, dtype = Path(s.parts_dir), np.dtype(s.dtype)
    stats = ReadStats()
    writers = {split: PartWriter(parts_dir, unit_stem(index), split, dtype, s.shard_tokens) for split in SPLITS}
    seen: set[bytes] = set()
    duplicates = 0
    doc_index = 0  # within the unit: decides train or validation

    def documents() -> Iterator[str]:
        nonlocal duplicates
        for text in read_unit(unit, s.options, stats):
            if s.dedup:
                digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                if digest in seen:
                    duplicates += 1
                    continue
                seen.add(digest)
            yield text

    docs: Iterator[str] = documents()
    if max_documents is not None:
        docs = itertools.islice(docs, max(0, max_documents))
    reported_bytes = 0
    try:
        while batch := list(itertools.islice(docs, s.docs_per_task)):
            id_lists = encode(batch)
            lengths = np.fromiter((len(ids) + 1 for ids in id_lists), dtype=np.int64, count=len(id_lists))
            flat = np.fromiter(itertools.chain.from_iterable(ids + [s.separator_id] for ids in id_lists),
                               dtype=np.uint32, count=int(lengths.sum()))
            positions = np.arange(doc_index, doc_index + len(batch), dtype=np.float64)
            # is_validation, for the whole batch at once
            validation = (np.floor((positions + 1) * s.val_fraction) > np.floor(positions * s.val_fraction))
            doc_index += len(batch)
            token_is_validation = np.repeat(validation, lengths)
            writers["train"].write(flat[~token_is_validation])
            writers["validation"].write(flat[token_is_validation])
            writers["validation"].documents += int(validation.sum())
            writers["train"].documents += len(batch) - int(validation.sum())
            report(len(batch), len(flat), stats.bytes_read - reported_bytes)
            reported_bytes = stats.bytes_read
    except BaseException:  # bad input (or an interrupt): no half-written part is left under a temporary name
        for writer in writers.values():
            writer.discard()
        raise
    report(0, 0, max(unit.size, stats.bytes_read) - reported_bytes)  # the rest of the unit (e.g. after a sample's end)
    record = {
        "unit": index,
        "documents": doc_index,
        "empty": stats.empty,
        "duplicates": duplicates,
        "bad_utf8": stats.bad_utf8,
        "bad_utf8_files": stats.bad_utf8_files,
        "input_bytes": stats.bytes_read,
        "splits": {split: w.commit() for split, w in writers.items()},
    }
    _write_json(_marker(parts_dir, index), record)
    _crash_for_tests(parts_dir)
    return record


def _crash_for_tests(parts_dir: Path) -> None:
    after = int(os.environ.get(KILL_AFTER_UNITS, "0"))
    if after and len(list(parts_dir.glob("*.json"))) >= after:
        try:
            os.kill(_worker_parent if _worker_queue is not None else os.getpid(), signal.SIGKILL)
        except ProcessLookupError:  # another worker was first
            pass
        os._exit(1)  # in a worker: go with the main process


# Worker state: each worker process loads the tokenizer once and reports progress on a queue.
_worker_tokenizer = None
_worker_queue = None
_worker_parent = 0


def _init_worker(tokenizer_json: str, queue=None) -> None:
    global _worker_tokenizer, _worker_queue, _worker_parent
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker process = one core
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_file(tokenizer_json)
    _worker_queue = queue
    _worker_parent = os.getppid()


def _encode(texts: list[str]) -> list[list[int]]:
    # encode_batch_fast: the same ids without character offsets, which prepare never reads (tokenizers >= 0.21)
    encode_batch = getattr(_worker_tokenizer, "encode_batch_fast", _worker_tokenizer.encode_batch)
    return [e.ids for e in encode_batch(texts, add_special_tokens=False)]


def _unit_task(index: int, unit: Unit, settings: UnitSettings, max_documents: int | None) -> dict:
    """Run in a worker process: progress goes to the queue as it happens, the record comes back at the end."""
    record = process_unit(index, unit, settings, _encode, _report_to_parent, max_documents)
    _worker_queue.put(("done", index))
    return record


def _report_to_parent(*delta) -> None:
    if os.getppid() != _worker_parent:  # the main process was killed: stop, rather than work on unwatched
        os._exit(1)
    _worker_queue.put(delta)


def _run_units(jobs: list[tuple[int, Unit, int | None]], settings: UnitSettings, tokenizer_json: str, workers: int,
               report: Callable[[int, int, int], None]) -> Iterator[tuple[int, dict]]:
    """Process (index, unit, max_documents) jobs; yields (index, record) as units finish (any order)."""
    if workers == 1 or len(jobs) == 1:
        _init_worker(tokenizer_json)
        for index, unit, cap in jobs:
            yield index, process_unit(index, unit, settings, _encode, report, cap)
        return
    # spawn, not fork: a forked copy of a process that already used the Rust tokenizer can deadlock.
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    # ProcessPoolExecutor, not Pool: a worker that dies (killed, out of memory) fails the run instead of hanging it.
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                             initargs=(tokenizer_json, queue)) as pool:
        # Only units (a path and two numbers) cross to the workers; each reads its own input.
        running = {pool.submit(_unit_task, index, unit, settings, cap) for index, unit, cap in jobs}
        try:
            while running:
                try:
                    message = queue.get(timeout=0.5)
                except queue_module.Empty:
                    message = None
                if message is not None and message[0] != "done":
                    report(*message)
                for future in [f for f in running if f.done()]:
                    running.remove(future)
                    try:
                        record = future.result()  # a worker's UserError is raised here
                    except BrokenProcessPool:
                        raise WorkerDied("a worker process died (killed, or out of memory?): run the same command "
                                         "again to continue; fewer --workers use less memory") from None
                    yield record["unit"], record
        except BaseException:  # a unit failed (bad input), or an interrupt: start no unit still queued
            pool.shutdown(wait=True, cancel_futures=True)
            raise


# ---- progress ------------------------------------------------------------------------------------------
class Progress:
    """Documents/s, tokens/s, input MB/s and an ETA where the input's size is known (file sizes, or a dataset's
    row count): a tqdm bar on a terminal, a plain line every `every_s` seconds otherwise (SLURM, nohup)."""

    def __init__(self, total: int, done: int, by_rows: bool, units: int, enabled: bool, every_s: float, log):
        from tqdm.auto import tqdm

        self.total, self.done, self.by_rows = total, done, by_rows  # in bytes, or in documents when by_rows
        self.units, self.every_s, self.log = units, every_s, log
        self.docs = self.tokens = self.bytes = self.units_done = 0
        self.start = self.last_line = time.time()
        self.plain = enabled and not sys.stderr.isatty()
        self.bar = tqdm(total=total or None, initial=done, unit="doc" if by_rows else "B", unit_scale=True,
                        dynamic_ncols=True, disable=not enabled or self.plain, desc="prepare")

    def update(self, docs: int, tokens: int, nbytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
        self.bar.update(docs if self.by_rows else nbytes)
        elapsed = max(time.time() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.docs / elapsed:,.0f} docs/s, {self.tokens / elapsed:,.0f} tokens/s", refresh=False)
        if self.plain and time.time() - self.last_line >= self.every_s:
            self.last_line = time.time()
            self.log(self.line())

    def unit_done(self) -> None:
        self.units_done += 1

    def line(self) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        text = (f"prepare: {self.units_done}/{self.units} units | {self.docs:,} documents ({self.docs / elapsed:,.0f}/s) | "
                f"{self.tokens:,} tokens ({self.tokens / elapsed:,.0f}/s) | {self.bytes / elapsed / 1e6:,.1f} MB/s")
        progressed = self.docs if self.by_rows else self.bytes
        if self.total and progressed:
            done = min(self.total, self.done + progressed)
            eta = datetime.timedelta(seconds=round((self.total - done) * elapsed / progressed))
            text += f" | {100 * done / self.total:.0f}% | ETA {eta}"
        return text

    def close(self) -> None:
        self.bar.close()


# ---- the command ---------------------------------------------------------------------------------------
def prepare(cfg: PrepareConfig, log=print) -> dict | None:
    """Prepare the corpus (this run's share of it) into `cfg.out_dir`. Returns the manifest once every unit
    is done (this run finished the last one, or the data was already complete), else None."""
    started = time.time()
    out_dir = Path(cfg.out_dir)
    check_sources(cfg.sources, log)
    tokenizer = load_tokenizer(cfg.tokenizer)
    plan = make_plan(cfg, tokenizer)
    if (out_dir / MANIFEST).is_file():
        manifest = read_manifest(out_dir)
        if manifest.get("fingerprint") == plan["fingerprint"]:
            log(f"{out_dir} is complete: {manifest['documents']:,} documents, already prepared with these settings")
            return manifest
        if not cfg.overwrite and (out_dir / PLAN).is_file():  # the plan stays in the finished folder: say what differs
            raise UserError(f"{out_dir} is already prepared, differently: "
                            f"{_plan_difference(_read_json(out_dir / PLAN), plan, 'prepared')}; pass --overwrite to "
                            "replace it, or use another --out")
    work = partial_dir(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file: choose a folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not cfg.overwrite:
            raise UserError(f"output directory {out_dir} already exists and is not empty (pass --overwrite to replace it)")
        if not (out_dir / MANIFEST).is_file():  # never delete a folder of something else
            raise UserError(f"output directory {out_dir} holds no prepared data (no {MANIFEST}): --overwrite replaces only "
                            "prepared data; choose another --out")
    new_lock = not _lock_path(out_dir).exists()
    new_work = False
    try:
        with _lock(out_dir):
            new_work = _open_work_dir(work, plan, tokenizer, cfg.overwrite, log)
            _write_json(work / "shares.json", {"num_shards": cfg.num_shards})
        _process_share(cfg, plan, work, log)
        with _lock(out_dir):
            if not work.is_dir():  # another share finished last and finalized meanwhile
                return read_manifest(out_dir)
            missing = _missing_units(work, len(plan["units"]))
            if not missing:
                return _finalize(work, out_dir, log, started)
    except WorkerDied:  # not the input's fault: the units done are kept for the next run
        raise
    except UserError:
        # Bad input: the work folder this run started holds nothing worth resuming (the input must change, and
        # a changed input starts again anyway). A folder that was there before is kept (its units are done),
        # and so is one that other shares may be writing into.
        if new_work and cfg.num_shards == 1 and work.exists():
            with _lock(out_dir):
                shutil.rmtree(work, ignore_errors=True)
                if new_lock:
                    _lock_path(out_dir).unlink(missing_ok=True)
        raise
    log(f"share {cfg.shard_index} of {cfg.num_shards} is done; {len(missing)} of {len(plan['units'])} work units are "
        f"left to other shares: the last share to finish writes the manifest (or run mlm prepare --finalize {out_dir})")
    return None


def _process_share(cfg: PrepareConfig, plan: dict, work: Path, log) -> None:
    parts_dir = work / PARTS_SUBDIR
    units = [Unit(**{**u, "files": tuple(u["files"])}) for u in plan["units"]]
    mine = [i for i in range(len(units)) if i % cfg.num_shards == cfg.shard_index]
    pending = [i for i in mine if not _marker(parts_dir, i).is_file()]
    for i in pending:  # parts a killed run of this share left half-written
        for stale in parts_dir.glob(f".{unit_stem(i)}-*"):
            stale.unlink(missing_ok=True)
    settings = UnitSettings(str(parts_dir), ReadOptions(cfg.text_field, cfg.hf_split, cfg.document_per_file),
                            cfg.val_fraction, cfg.shard_tokens, plan["dtype"], plan["tokenizer"]["separator_id"],
                            cfg.docs_per_task, cfg.dedup)
    # Progress in input bytes where every unit's size is known, else in documents where the row counts are.
    by_rows = not all(units[i].size for i in mine) and all(units[i].rows for i in mine)
    measure = (lambda u: u.rows) if by_rows else (lambda u: u.size)
    total = sum(measure(units[i]) for i in mine) if all(measure(units[i]) for i in mine) else 0
    done = sum(measure(units[i]) for i in mine if i not in pending) if total else 0
    if len(pending) < len(mine):
        log(f"resuming: {len(mine) - len(pending)} of {len(mine)} work units already done")
    progress = Progress(total, done, by_rows, len(mine), cfg.progress, cfg.log_every_s, log)
    progress.units_done = len(mine) - len(pending)
    tokenizer_json = str(work / TOKENIZER_SUBDIR / "tokenizer.json")
    start = time.time()
    finished = 0

    def unit_done() -> None:
        nonlocal finished
        progress.unit_done()
        finished += 1

    if cfg.max_documents:  # a sample in corpus order: one unit after another, each told what is left
        left = cfg.max_documents - sum(_read_json(_marker(parts_dir, i))["documents"] for i in mine if i not in pending)
        _init_worker(tokenizer_json)  # this process reads the sample
        for i in pending:
            left -= process_unit(i, units[i], settings, _encode, progress.update, left)["documents"]
            unit_done()
    else:  # the largest units first, so that no worker is left with a big one at the end
        jobs = [(i, units[i], None) for i in sorted(pending, key=lambda i: -units[i].size)]
        for _ in _run_units(jobs, settings, tokenizer_json, cfg.workers, progress.update):
            unit_done()
    progress.close()
    if cfg.progress and finished:
        log(progress.line())
    elapsed = time.time() - start
    if finished:
        log(f"this run tokenized {_count(finished, 'work unit')} ({progress.docs:,} documents, {progress.tokens:,} "
            f"tokens) in {elapsed:.1f}s ({progress.tokens / max(elapsed, 1e-9):,.0f} tokens/s, "
            f"{progress.bytes / max(elapsed, 1e-9) / 1e6:,.1f} MB/s of input, {_count(cfg.workers, 'worker')})")


def _count(n: int, noun: str) -> str:
    """"1 work unit", "3 work units"."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _missing_units(work: Path, count: int) -> list[int]:
    return [i for i in range(count) if not _marker(work / PARTS_SUBDIR, i).is_file()]


def finalize(out_dir: str | Path, log=print) -> dict:
    """`mlm prepare --finalize OUT`: check that every work unit is done and write the manifest."""
    started = time.time()
    out_dir = Path(out_dir)
    work = partial_dir(out_dir)
    with _lock(out_dir):
        if not work.is_dir():
            if (out_dir / MANIFEST).is_file():
                manifest = read_manifest(out_dir)
                log(f"{out_dir} is complete: {manifest['documents']:,} documents")
                return manifest
            raise UserError(f"nothing to finalize: {work} does not exist (start it with mlm prepare … --out {out_dir})")
        plan = _read_json(work / PLAN)
        missing = _missing_units(work, len(plan["units"]))
        if missing:
            shares = _read_json(work / "shares.json")["num_shards"] if (work / "shares.json").is_file() else 1
            by_share: dict[int, list[int]] = {}
            for i in missing:
                by_share.setdefault(i % shares, []).append(i)
            named = "; ".join(
                f"share {s} (--num-shards {shares} --shard-index {s}): unit(s) "
                + ", ".join(map(str, units[:5])) + (" …" if len(units) > 5 else "")
                for s, units in sorted(by_share.items())
            )
            raise UserError(f"{len(missing)} of {len(plan['units'])} work units of {out_dir} are not done, from {named}: "
                            "run those shares (again), then --finalize")
        return _finalize(work, out_dir, log, started)


def _finalize(work: Path, out_dir: Path, log, started: float) -> dict:
    """Every unit is done: gather the records, check the parts, write the manifest, rename to out_dir."""
    plan = _read_json(work / PLAN)
    records = [_read_json(_marker(work / PARTS_SUBDIR, i)) for i in range(len(plan["units"]))]
    dtype = np.dtype(plan["dtype"])
    for i, record in enumerate(records):
        for s in (s for split in SPLITS for s in record["splits"][split]["shards"]):
            path = work / s["file"]
            if not path.is_file() or path.stat().st_size != s["tokens"] * dtype.itemsize:
                raise UserError(f"{path} is missing or has the wrong size: delete {_marker(work / PARTS_SUBDIR, i)} "
                                "and run mlm prepare again (it redoes that unit)")
    splits = {}
    for split in SPLITS:
        shards = [s for r in records for s in r["splits"][split]["shards"] if s["tokens"] > 0]
        splits[split] = {
            "tokens": sum(s["tokens"] for s in shards),
            "documents": sum(r["splits"][split]["documents"] for r in records),
            "shards": shards,
        }
    stats = ReadStats(
        documents=sum(r["documents"] for r in records), empty=sum(r["empty"] for r in records),
        bad_utf8=sum(r["bad_utf8"] for r in records),
    )
    for r in records:
        for name, count in r["bad_utf8_files"].items():
            stats.bad_utf8_files[name] = stats.bad_utf8_files.get(name, 0) + count
    duplicates = sum(r["duplicates"] for r in records)
    settings = plan["settings"]
    if stats.documents == 0:
        shutil.rmtree(work, ignore_errors=True)
        _lock_path(out_dir).unlink(missing_ok=True)
        raise UserError(f"the corpus {' '.join(settings['sources'])} is empty: no non-blank document found")
    if stats.bad_utf8:
        log(stats.bad_utf8_warning())
    val_fraction = settings["val_fraction"]
    if val_fraction > 0 and splits["validation"]["documents"] == 0:
        log(
            f"warning: no document went to validation ({stats.documents:,} documents × --val-fraction "
            f"{val_fraction} < 1), so pretraining will report no validation loss: use --val-fraction "
            f"{min(0.5, 1.0 / stats.documents):.3g} or more"
        )
    tokens = sum(s["tokens"] for s in splits.values())
    disk = sum((work / s["file"]).stat().st_size for split in splits.values() for s in split["shards"])
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": plan["fingerprint"],
        "dtype": plan["dtype"],
        "tokenizer": plan["tokenizer"],
        "sources": settings["sources"],
        "val_fraction": val_fraction,
        "document_per_file": settings["document_per_file"],
        "documents": stats.documents,
        "empty_documents": stats.empty,
        "duplicates_removed": duplicates,
        "bad_utf8": stats.bad_utf8,
        "input_bytes": sum(r["input_bytes"] for r in records),
        "units": len(records),
        "splits": splits,
    }
    _write_json(work / MANIFEST, manifest)
    (work / "shares.json").unlink(missing_ok=True)  # how the work was split is no part of the result
    for stale in (work / PARTS_SUBDIR).glob(".*"):  # temporary files of killed runs
        stale.unlink(missing_ok=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # empty, or replaced by --overwrite
    os.replace(work, out_dir)
    _lock_path(out_dir).unlink(missing_ok=True)
    log(
        f"prepared {stats.documents:,} documents → {splits['train']['tokens']:,} train + "
        f"{splits['validation']['tokens']:,} validation tokens in {_count(len(records), 'work unit')} | "
        f"{stats.empty:,} empty documents skipped | {stats.bad_utf8:,} invalid UTF-8 sequences replaced"
        + (f" | {duplicates:,} duplicates removed" if settings["dedup"] else "")
        + f" | {disk / max(tokens, 1):.2f} bytes/token on disk | {time.time() - started:.1f}s for this whole command "
        f"(tokenizer loading, planning, tokenizing and the manifest) → {out_dir}"
    )
    return manifest


FINGERPRINT_BYTES = 4096


def shard_fingerprint(path: Path) -> str:
    """SHA-256 of a shard's first and last 4 KiB: cheap to check at every start (two reads per shard, whatever
    its size), and a shard replaced by another of the same size (from another prepared set, or swapped with a
    neighbour) no longer matches."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        f.seek(max(0, os.fstat(f.fileno()).st_size - FINGERPRINT_BYTES))
        digest.update(f.read(FINGERPRINT_BYTES))
    return digest.hexdigest()


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        if Path(data_dir).name not in ("", "..") and (partial_dir(data_dir) / PLAN).is_file():
            raise UserError(f"{data_dir} is not finished ({partial_dir(data_dir)} holds the work in progress): run the "
                            "same `mlm prepare` again to continue, or `mlm prepare --finalize` once every share is done")
        raise UserError(f"{data_dir} holds no prepared data ({MANIFEST} missing): run `mlm prepare` first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged (not valid JSON: {e}): run `mlm prepare` again") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path} is damaged (not a JSON object): run `mlm prepare` again")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has format version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    if manifest.get("dtype") not in TOKEN_DTYPES:  # any other would read the shards as wrong numbers
        raise UserError(f"{path} is damaged (dtype {manifest.get('dtype')!r}; prepared data holds "
                        f"{' or '.join(TOKEN_DTYPES)}): run `mlm prepare` again")
    tokenizer = manifest.get("tokenizer")
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("vocab_size"), int) or tokenizer["vocab_size"] < 1:
        # training checks every token id against it
        raise UserError(f"{path} is damaged (no tokenizer vocab_size): run `mlm prepare` again")
    try:
        files = [s["file"] for split in manifest["splits"].values() for s in split["shards"]]
    except (AttributeError, KeyError, TypeError):
        raise UserError(f"{path} is damaged (no list of shards for each split): run `mlm prepare` again") from None
    for name in files:
        # Training opens these: a damaged (or hostile) manifest must not send it outside the data folder.
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise UserError(f"{path} is damaged (shard file {name!r} is not a file inside {data_dir}): "
                            "run `mlm prepare` again")
    return manifest
