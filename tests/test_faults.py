"""Faults and hostile input. Whatever goes wrong (a random setting, a random corpus, a full disk, kill -9),
`mlm` ends in one `error: …` line on stderr and a non-zero exit (2 for the user's errors, 130 for Ctrl-C),
never a traceback, and nothing is lost or left half-written under a final name.

Random input runs in this process through `mlm.cli.main` (fast); faults that need a fresh process (a file
size limit, SIGKILL, SIGINT) run `python -m mlm`."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gzip
import hashlib
import importlib.util
import io
import json
import math
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from mlm.cli import main
from mlm.config import PretrainConfig, load_config, parse_budget
from mlm.errors import UserError
from mlm.eval.finetune import FinetuneConfig
from mlm.eval.glue import parse_overrides, task_config
from mlm.eval.tasks import GLUE_TASKS
from mlm.train.metrics import read_metrics
from mlm.train.pretrain import pretrain

from conftest import make_documents, poison_steps, tiny_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """system.threads calls torch.set_num_threads, which outlives the run: give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def cli(*args: str) -> tuple[int, str]:
    """`mlm ARGS` in this process: (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    return code, err.getvalue()


def mlm(*args: str, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    """`python -m mlm ARGS` in a fresh process, optionally under a file size limit (RLIMIT_FSIZE): a write
    past it fails with EFBIG, as on a full disk."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG for the write, instead of death by SIGXFSZ
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, "-m", "mlm", *args], capture_output=True, text=True, env=ENV, timeout=300,
                          preexec_fn=limit if file_size_limit else None)


def assert_one_error_line(code: int, stderr: str, fragment: str = "") -> str:
    """Exit 2 and exactly one stderr line, `error: …` (not mlm's wording for a bug), with no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), f"exit {code}:\n{stderr}"
    assert not lines[0].startswith("error: unexpected") and "Traceback" not in stderr, stderr
    assert fragment in lines[0], stderr
    return lines[0]


def assert_clean_end(code: int, stderr: str) -> None:
    """Success, or one clear error line."""
    assert "Traceback" not in stderr, stderr
    if code != 0:
        assert_one_error_line(code, stderr)


def as_overrides(cfg: PretrainConfig) -> list[str]:
    """The config as --section.key=value flags (JSON scalars and lists are TOML too)."""
    return [f"--{section}.{key}={json.dumps(value)}"
            for section, values in dataclasses.asdict(cfg).items() for key, value in values.items()]


@contextlib.contextmanager
def inside(folder: str | Path):
    """Run with `folder` as the working directory (contextlib.chdir needs Python 3.11)."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def without_timing(records: list[dict]) -> list[dict]:
    """metrics.jsonl records without tokens/s, the one figure that differs between identical runs."""
    return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in records]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def stop_at(step: int):
    """A `log` for pretrain() that sends this process SIGTERM once step `step` is logged: the run checkpoints
    there and returns, as a pre-empted job does."""

    def log(line: str) -> None:
        if line.startswith(f"step {step}/"):
            os.kill(os.getpid(), signal.SIGTERM)

    return log


# ---- random settings for mlm pretrain --------------------------------------------------------------------

SECTION_TYPES = typing.get_type_hints(PretrainConfig)
KEYS = sorted(f"{section.name}.{f.name}" for section in dataclasses.fields(PretrainConfig)
              for f in dataclasses.fields(SECTION_TYPES[section.name]))
PATH_KEYS = {"data.data_dir", "data.tokenizer", "model.init_from", "run.out_dir", "system.deepspeed_config", "eval.glue_dir"}

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24)
NUMBERS = st.one_of(
    st.integers(-3, 64).map(str),
    st.sampled_from(["0", "-1", "2147483648", "9223372036854775807", "-9223372036854775808", "10000000000000000000000000000000"]),
    # No subnormals: GLUE fine-tuning on a CPU flushes them to zero process-wide (an earlier test may have).
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False).map(repr),  # nan, inf, -inf, 1e+300
    st.sampled_from(["nan", "-nan", "inf", "-inf", "1e308", "-0.0", "5e-324", "0.5", "0.999999"]),
)
WORDS = st.sampled_from([  # the values the validation knows, and near misses, so that runs get past it too
    "true", "false", "auto", "on", "off", "cpu", "cuda", "cuda:1", "ddp", "fsdp", "deepspeed", "tiny", "bert",
    "roberta", "bf16", "fp32", "math", "flash", "default", "reduce-overhead", "[0.9, 0.98]", "[0.9]", "[]",
    "[1, 2, 3]", "[0.5, 1.0]", '"tiny"', "{a = 1}", '"', "'", "[", "1e3 tokens", "100 tokens", "1e30 tokens",
    "0 tokens", "-5 tokens", "1.5.5 tokens", "90 s", "2h", "nan s", "--seeds 1", "--seeds '1",
])
VALUES = st.one_of(NUMBERS, WORDS, TEXT, TEXT.map(json.dumps), st.just(""))
# A path value stays inside the example's folder: "./…", never absolute, never "..", never a hub name
# (which would wait for the network).
PATH_VALUES = st.one_of(NUMBERS, st.sampled_from(["true", "[]", "", '""']),
                        TEXT.filter(lambda t: ".." not in t).map(lambda t: "./" + t),
                        TEXT.filter(lambda t: ".." not in t).map(lambda t: json.dumps("./" + t)))
OVERRIDES = st.lists(
    st.sampled_from(KEYS).flatmap(lambda key: (PATH_VALUES if key in PATH_KEYS else VALUES).map(lambda v: f"--{key}={v}")),
    min_size=1, max_size=3,
)


def _base_overrides(data_dir: Path) -> list[str]:
    """A tiny model, two steps of 8 sequences of 32 tokens, one checkpoint at the end: a success takes 0.2 s."""
    return [f"--data.data_dir={json.dumps(str(data_dir))}", "--model.size=tiny", "--model.max_positions=64",
            "--data.seq_len=32", "--train.steps=2", "--train.global_batch=8", "--train.warmup_steps=1",
            "--system.micro_batch=8", "--system.device=cpu", "--system.compile=off", "--system.threads=1",
            "--run.out_dir=run", "--run.progress=false", "--run.checkpoint_every=1000", "--eval.every=0",
            "--eval.sequences=8"]


def _cheap(overrides: list[str]) -> bool:
    """False for a valid config that would run long or reach out (a big model, many steps, torch.compile,
    a time budget, GLUE jobs, W&B); invalid ones are always cheap: they must fail in one line."""
    try:
        cfg = load_config(None, overrides)
        seconds, tokens = parse_budget(cfg.train.budget)
    except Exception:
        return True
    steps = tokens // (cfg.train.global_batch * cfg.data.seq_len) if tokens else cfg.train.steps
    return (cfg.model.size == "tiny" and cfg.model.max_positions <= 4096 and seconds is None and steps <= 4
            and cfg.train.global_batch <= 64 and cfg.data.seq_len <= 128 and cfg.system.compile != "on"
            and cfg.system.threads <= 2 and cfg.eval.glue_every == 0 and not cfg.run.wandb)


def check_random_pretrain_settings(data_dir: Path, overrides: list[str]) -> None:
    args = _base_overrides(data_dir) + overrides  # later flags win: the random ones
    if not _cheap(args):
        event("valid but too long a run: skipped")
        return
    environ = dict(os.environ)
    with tempfile.TemporaryDirectory() as work, inside(work):
        try:
            code, stderr = cli("pretrain", *args)
        finally:
            os.environ.clear()
            os.environ.update(environ)  # a one-process fsdp group sets RANK and WORLD_SIZE
        event(f"exit {code}")
        assert_clean_end(code, stderr)
        if code == 0:  # it trained with the settings given (the later of two values for a key), in run.out_dir
            cfg = load_config(None, args)
            out = Path(cfg.run.out_dir)
            assert list(out.glob("checkpoint-*")) and not list(out.glob(".checkpoint-*.tmp"))
            recorded = json.loads((out / "config.json").read_text())
            assert {k: recorded[k] for k in ("model", "data", "eval")} == {k: dataclasses.asdict(cfg)[k] for k in ("model", "data", "eval")}


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(overrides=OVERRIDES)
@example(overrides=["--train.lr=nan"])
@example(overrides=["--run.out_dir=./x y"])  # was: argparse took it for the recipe, and --run.out_dir=run won
@example(overrides=["--data.data_dir="])  # was: "unexpected ValueError: PosixPath('.') has an empty name"
@example(overrides=["--train.seed=9223372036854775807"])  # was: "unexpected ValueError: Overflow when unpacking long long"
@example(overrides=["--system.threads=2", "--data.per_token_masking=true", "--eval.every=1"])
def test_random_pretrain_settings_succeed_or_fail_in_one_line(data_dirs, overrides):
    """Random values (numbers from -2^63 to 1e308, nan, inf, booleans, unicode text, TOML lists and tables,
    nothing) for random keys of every config section: each run of `mlm pretrain` either trains or ends in
    exactly one `error:` line with exit 2, never a traceback or mlm's line for a bug."""
    check_random_pretrain_settings(data_dirs["roberta"], overrides)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(overrides=OVERRIDES)
def test_random_pretrain_settings_many_more(data_dirs, overrides):
    """The same with five times the examples, freshly drawn each time."""
    check_random_pretrain_settings(data_dirs["roberta"], overrides)


# ---- random corpora for mlm tokenizer and mlm prepare ----------------------------------------------------

LINE = st.one_of(
    TEXT,
    st.sampled_from(["", " ", "\t", "\r", "\x0c", "\u2028", "\ufeff", "\x1b[31m", "  \u00a0 "]),
    # long lines; 20,000 characters at most: BPE training is quadratic in a word's length (57 s for 200,000 "é")
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "😀", "ab ", "\u0301"]), st.integers(1_000, 20_000)),
)
JSON_LINE = st.one_of(
    st.dictionaries(st.sampled_from(["text", "other"]),
                    st.one_of(TEXT, st.integers(), st.floats(allow_subnormal=False), st.none(), st.booleans(), st.lists(st.integers(), max_size=3)),
                    max_size=2).map(json.dumps),
    LINE,
)
RAW_BYTES = st.lists(st.one_of(TEXT.map(lambda t: t.encode()), st.sampled_from(
    [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\xf4\x90\x80\x80", b"\x00", b"\n", b"\r\n", b"\xef\xbb\xbf"])),
    max_size=40).map(b"".join)
CORPUS = st.one_of(
    st.lists(LINE, max_size=20).map(lambda lines: "\n".join(lines).encode()),
    st.lists(JSON_LINE, max_size=20).map(lambda lines: "\n".join(lines).encode()),
    RAW_BYTES,
    st.binary(max_size=3000),
)
SUFFIXES = st.sampled_from([".txt", ".txt", ".jsonl", ".txt.gz", ".jsonl.zst", ".parquet"])


def write_corpus(folder: Path, data: bytes, suffix: str, compress: bool) -> Path:
    """The bytes as a corpus file: compressed properly, or (compress=False) raw under a compressed name."""
    path = folder / f"corpus{suffix}"
    if compress and suffix.endswith(".gz"):
        data = gzip.compress(data)
    elif compress and suffix.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    elif compress and suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": data.decode("utf-8", "replace").split("\n")}), path)
        return path
    path.write_bytes(data)
    return path


def check_random_corpus(tokenizer_dirs, data: bytes, suffix: str, compress: bool, family: str, per_file: bool) -> None:
    with tempfile.TemporaryDirectory() as work, inside(work):
        corpus = str(write_corpus(Path(work), data, suffix, compress))
        extra = ["--document-per-file"] if per_file else []
        code, stderr = cli("tokenizer", "--corpus", corpus, "--family", family, "--vocab-size", "300", "--out", "tok", *extra)
        event(f"tokenizer: exit {code}")
        assert_clean_end(code, stderr)
        assert Path("tok/tokenizer_config.json").is_file() == (code == 0)  # the tokenizer is whole or absent
        code, stderr = cli("prepare", "--corpus", corpus, "--tokenizer", str(tokenizer_dirs[family]), "--out", "data",
                           "--workers", "1", "--no-progress", "--val-fraction", "0.3", *extra)
        event(f"prepare: exit {code}")
        assert_clean_end(code, stderr)
        assert Path("data/manifest.json").is_file() == (code == 0)  # never a data folder that looks finished but is not
        assert not [p.name for p in Path(work).iterdir() if ".tmp" in p.name]


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(data=CORPUS, suffix=SUFFIXES, compress=st.booleans(), family=st.sampled_from(["roberta", "bert"]),
       per_file=st.booleans())
@example(data=b"", suffix=".txt", compress=True, family="roberta", per_file=False)
@example(data=b"\n \n\t\n", suffix=".txt", compress=True, family="bert", per_file=True)
@example(data=b"\xff\xfe caf\xc3 \xed\xa0\x80\n" + b"x" * 20_000, suffix=".txt", compress=True, family="roberta", per_file=False)
@example(data=b"not gzip", suffix=".txt.gz", compress=False, family="bert", per_file=False)
@example(data=b'{"text": 5}\n{"text": null}\n', suffix=".jsonl.zst", compress=True, family="roberta", per_file=False)
def test_random_corpora_succeed_or_fail_in_one_line(tokenizer_dirs, data, suffix, compress, family, per_file):
    """Random bytes, invalid UTF-8, empty and blank lines, lines of 20,000 characters, JSON records of any
    type, as .txt, .jsonl, .gz, .zst (well formed or not) and .parquet: `mlm tokenizer` and `mlm prepare`
    each succeed or end in one `error:` line with exit 2, and leave a finished tokenizer or data folder only
    when they succeed."""
    check_random_corpus(tokenizer_dirs, data, suffix, compress, family, per_file)


@pytest.mark.slow
@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(data=CORPUS, suffix=SUFFIXES, compress=st.booleans(), family=st.sampled_from(["roberta", "bert"]),
       per_file=st.booleans())
def test_random_corpora_many_more(tokenizer_dirs, data, suffix, compress, family, per_file):
    """The same with four times the examples, freshly drawn each time."""
    check_random_corpus(tokenizer_dirs, data, suffix, compress, family, per_file)


@pytest.mark.parametrize("out", ["notes", ".", ".."])
def test_prepare_overwrite_replaces_only_prepared_data(corpus_file, tokenizer_dirs, tmp_path, out):
    """`mlm prepare --out X --overwrite` where X is a folder of something else (or ".", or ".."): one
    `error:` line and every file still there. It used to delete the folder (or fail with "unexpected
    ValueError" for "." and "..")."""
    here = tmp_path / "project" / "src"
    (tmp_path / "project" / "notes").mkdir(parents=True)
    here.mkdir()
    for folder in (tmp_path / "project", tmp_path / "project" / "notes", here):
        (folder / "thesis.tex").write_text("precious")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with inside(here):
        code, stderr = cli("prepare", "--corpus", str(corpus_file), "--tokenizer", str(tokenizer_dirs["roberta"]),
                           "--out", "../notes" if out == "notes" else out, "--overwrite", "--workers", "1", "--no-progress")
    assert_one_error_line(code, stderr, "holds no prepared data" if out == "notes" else "names no folder of its own")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


# ---- a full disk (a file size limit: writes past it fail with EFBIG) -------------------------------------


def test_the_libraries_write_errors_are_traced_to_the_os_error(tmp_path):
    """torch's distributed checkpoint, torch.save, safetensors and tokenizers each hide a failed write in an
    exception of their own (none an OSError); os_error_behind finds the EFBIG under each of them."""
    import errno

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    from mlm.atomic import os_error_behind
    from mlm.tokenizer import train_tokenizer
    from mlm.train.checkpoint import _one_process_is_fine

    train_tokenizer(make_documents(300), "roberta", 400, tmp_path / "tok")  # its tokenizer.json is ~13 kB
    tokenizer = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    tensors = {"w": torch.zeros(50_000)}

    def torch_save() -> None:
        with open(tmp_path / "state.pt", "wb") as f:
            torch.save(tensors, f)

    writers = {
        "dcp": lambda: dcp.save(dict(tensors), checkpoint_id=str(tmp_path / "engine")),
        "torch.save": torch_save,
        "safetensors": lambda: save_file(tensors, str(tmp_path / "model.safetensors")),
        "tokenizers": lambda: tokenizer.save(str(tmp_path / "tokenizer.json")),
    }
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    for name, write in writers.items():
        error = None
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))  # this process only, restored at once
        try:
            with _one_process_is_fine():
                write()
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            error = e
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert error is not None and not isinstance(error, OSError), (name, repr(error))
        found = os_error_behind(error, tmp_path / "x")
        assert isinstance(found, OSError) and found.errno == errno.EFBIG, (name, repr(error))
        assert found.filename == str(tmp_path / "x")


def test_a_full_disk_at_a_checkpoint_keeps_the_earlier_ones_and_auto_resume_finishes(data_dirs, tmp_path):
    """A run pre-empted at step 5 (checkpoints 4 and 5) resumes under a file size limit that its step-8
    checkpoint cannot fit: one `error:` line naming the limit and the folder, exit 2, checkpoints 4 and 5
    byte for byte as they were, no checkpoint-8 and no .checkpoint-8.tmp. Without the limit, --resume=auto
    then finishes with the losses and weights of an unbroken run."""
    run = tmp_path / "run"
    cfg = tiny_config(data_dirs["roberta"], run, steps=12)
    cfg.run.checkpoint_every, cfg.eval.every = 4, 6
    assert pretrain(cfg, log=stop_at(5))["stopped_by"] == "SIGTERM"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    before = file_hashes(run / "checkpoint-4") | {f"5/{k}": v for k, v in file_hashes(run / "checkpoint-5").items()}

    r = mlm("pretrain", *as_overrides(cfg), "--resume=auto", file_size_limit=200_000)  # the engine shard is ~6 MB
    assert_one_error_line(r.returncode, r.stderr, f"file size limit reached at {run / '.checkpoint-8.tmp'}")
    assert "what was there before is kept" in r.stderr
    assert file_hashes(run / "checkpoint-4") | {f"5/{k}": v for k, v in file_hashes(run / "checkpoint-5").items()} == before
    assert sorted(p.name for p in run.glob("*checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]

    assert cli("pretrain", *as_overrides(cfg), "--resume=auto") == (0, "")
    unbroken = tiny_config(data_dirs["roberta"], tmp_path / "unbroken", steps=12)
    unbroken.run.checkpoint_every, unbroken.eval.every = 4, 6
    pretrain(unbroken, log=lambda _: None)
    assert without_timing(read_metrics(run)) == without_timing(read_metrics(tmp_path / "unbroken"))
    final, expected = weights(run / "checkpoint-12"), weights(tmp_path / "unbroken" / "checkpoint-12")
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert not list(run.glob(".checkpoint-*.tmp"))


def test_a_full_disk_while_logging_metrics_still_resumes(data_dirs, tmp_path):
    """The disk fills up while metrics.jsonl is appended to: the write stops mid-record. The run ends in
    one line, and --resume=auto afterwards continues from the last checkpoint with the unbroken losses."""
    run = tmp_path / "run"
    cfg = tiny_config(data_dirs["roberta"], run, steps=30)
    cfg.run.checkpoint_every, cfg.eval.every = 4, 0
    assert pretrain(cfg, log=stop_at(20))["stopped_by"] == "SIGTERM"
    size = (run / "metrics.jsonl").stat().st_size  # 20 records: larger than config.json, which is rewritten
    assert size > (run / "config.json").stat().st_size + 100
    no_checkpoint = [*as_overrides(cfg), "--run.checkpoint_every=100"]  # none before the log is full
    r = mlm("pretrain", *no_checkpoint, "--resume=auto", file_size_limit=size + 250)  # 250 bytes: a record and a half
    assert_one_error_line(r.returncode, r.stderr, "file size limit reached")
    assert not (run / "metrics.jsonl").read_text().endswith("\n")  # cut mid-record, as a full disk does

    code, stderr = cli("pretrain", *as_overrides(cfg), "--resume=auto")
    assert (code, stderr) == (0, ""), stderr  # today: "error: unexpected JSONDecodeError: Unterminated string …"
    unbroken = tiny_config(data_dirs["roberta"], tmp_path / "unbroken", steps=30)
    unbroken.run.checkpoint_every, unbroken.eval.every = 4, 0
    pretrain(unbroken, log=lambda _: None)
    assert losses(run) == losses(tmp_path / "unbroken")


def test_a_full_disk_while_preparing_leaves_no_finished_looking_data(tokenizer_dirs, tmp_path):
    """`mlm prepare` of a 2 MB corpus under a 300 kB file size limit: one `error:` line naming the limit and
    the part file, exit 2, no OUT (only OUT.partial, which pretraining refuses as unfinished). Without the
    limit the same command finishes, byte for byte as a preparation that never failed."""
    from mlm.data.prepare import read_manifest

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(make_documents(20_000, seed=1)) + "\n")
    args = ["prepare", "--corpus", str(corpus), "--tokenizer", str(tokenizer_dirs["roberta"]), "--workers", "1",
            "--no-progress"]
    r = mlm(*args, "--out", str(tmp_path / "data"), file_size_limit=300_000)
    line = assert_one_error_line(r.returncode, r.stderr, f"file size limit reached at {tmp_path / 'data.partial' / 'parts'}")
    assert re.search(r"/\.000000-train-00000\.bin\.tmp\d+ ", line), line
    assert not (tmp_path / "data").exists()
    with pytest.raises(UserError, match="is not finished"):
        read_manifest(tmp_path / "data")

    assert cli(*args, "--out", str(tmp_path / "data"))[0] == 0
    assert cli(*args, "--out", str(tmp_path / "clean"))[0] == 0
    assert not (tmp_path / "data.partial").exists()
    assert file_hashes(tmp_path / "data") == file_hashes(tmp_path / "clean")


def test_a_full_disk_while_saving_a_tokenizer_keeps_the_old_one(corpus_file, tmp_path):
    """`mlm tokenizer --overwrite` under a 4 kB file size limit (tokenizer.json is ~13 kB): one `error:`
    line naming the limit and the folder, exit 2, the tokenizer that was there unchanged and no temporary
    folder beside it. Without the limit the same command replaces it."""
    tok = tmp_path / "tok"
    args = ["tokenizer", "--corpus", str(corpus_file), "--vocab-size", "400", "--out", str(tok), "--overwrite"]
    assert cli(*args, "--family", "bert")[0] == 0
    before = file_hashes(tok)
    r = mlm(*args, "--family", "roberta", file_size_limit=4_000)
    assert_one_error_line(r.returncode, r.stderr, f"file size limit reached at {tok} ")
    assert file_hashes(tok) == before
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]
    assert cli(*args, "--family", "roberta")[0] == 0
    assert json.loads((tok / "tokenizer_config.json").read_text())["tokenizer_class"].startswith("Roberta")


# ---- kill -9 at random moments ---------------------------------------------------------------------------


def _logged_step(run: Path) -> int:
    """The last step in metrics.jsonl (0 if none)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_auto_resume_equals_an_unbroken_run(data_dirs, tmp_path):
    """A 30-step run (dropout 0.1, a checkpoint every 3 steps) is killed with SIGKILL five times at moments
    drawn with a fixed seed: at a random logged step plus a random delay, or a random delay after a
    .checkpoint-*.tmp folder appears (mid-write), and once stopped with SIGINT (Ctrl-C: a checkpoint, exit
    130, nothing on stderr). Each restart uses --resume=auto. The finished run's metrics (every training
    and validation loss, once per step) and final weights equal
    an unbroken run's, at least one kill cut a checkpoint write short, and no temporary folder is left."""
    rng = random.Random(20240611)
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run", steps=30)
    cfg.run.checkpoint_every, cfg.eval.every, cfg.model.dropout, cfg.system.threads = 3, 5, 0.1, 1
    unbroken = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(tmp_path / "unbroken")))
    pretrain(unbroken, log=lambda _: None)
    run = tmp_path / "run"
    plan = ["step", "tmp", "step", "sigint", "tmp", "step"]
    cut_writes = 0  # kills that left a checkpoint half-written
    for how in plan:
        start = _logged_step(run)  # the restart truncates the records after its checkpoint: wait for new ones
        target = min(rng.randint(start + 1, start + 3), 27)  # six stops leave the run unfinished
        delay = rng.uniform(0, 0.04 if how == "step" else 0.005)
        proc = subprocess.Popen([sys.executable, "-m", "mlm", "pretrain", *as_overrides(cfg), "--resume=auto"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
        try:
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline:
                if how == "tmp":
                    writing = [int(m.group(1)) for p in run.glob(".checkpoint-*.tmp")
                               if (m := re.fullmatch(r"\.checkpoint-(\d+)\.tmp", p.name))]
                    if any(step > start for step in writing):
                        break
                elif _logged_step(run) >= target:
                    break
                time.sleep(0.002)
            assert proc.poll() is None, f"the run ended before the {how} kill: {proc.stderr.read()}"
            time.sleep(delay)
            proc.send_signal(signal.SIGINT if how == "sigint" else signal.SIGKILL)
            stderr = proc.communicate(timeout=120)[1]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if how == "sigint":
            assert proc.returncode == 130 and stderr == "", stderr
        else:
            assert proc.returncode == -signal.SIGKILL
            cut_writes += bool(list(run.glob(".checkpoint-*.tmp")))
    assert cut_writes >= 1
    assert cli("pretrain", *as_overrides(cfg), "--resume=auto") == (0, "")
    expected = without_timing(read_metrics(tmp_path / "unbroken"))
    assert without_timing(read_metrics(run)) == expected
    final, expected = weights(run / "checkpoint-30"), weights(tmp_path / "unbroken" / "checkpoint-30")
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert not list(run.glob(".checkpoint-*.tmp"))


def test_a_run_stopped_at_an_evaluation_step_keeps_its_validation_loss(data_dirs, tmp_path):
    """Pre-empted at step 5, an evaluation step, and resumed: the validation losses of steps 0, 5 and 10 are
    all in metrics.jsonl, as in an unbroken run."""
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run", steps=10)
    cfg.eval.every = 5
    assert pretrain(cfg, log=stop_at(5))["stopped_by"] == "SIGTERM"
    pretrain(cfg, resume="auto", log=lambda _: None)
    unbroken = tiny_config(data_dirs["roberta"], tmp_path / "unbroken", steps=10)
    unbroken.eval.every = 5
    pretrain(unbroken, log=lambda _: None)
    assert without_timing(read_metrics(tmp_path / "run")) == without_timing(read_metrics(tmp_path / "unbroken"))


GLUE_FIELDS = [f.name for f in dataclasses.fields(FinetuneConfig)]


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(items=st.lists(st.tuples(st.sampled_from(["", "rte."]), st.sampled_from(GLUE_FIELDS), VALUES)
                      .map(lambda t: f"{t[0]}{t[1]}={t[2]}"), min_size=1, max_size=3))
@example(items=["lr=nan"])  # was accepted: nan <= 0 is false
@example(items=["rte.lr=inf"])
@example(items=["adam_eps=-1"])
@example(items=["device=bogus"])  # was: a RuntimeError at fine-tuning
def test_random_glue_settings_are_accepted_whole_or_refused_in_one_line(items):
    """`mlm glue --set` with random values for every fine-tuning field: the settings a task would run with
    are either built, with every number finite and in range, or refused as a UserError before any work."""
    try:
        cfg = task_config(GLUE_TASKS["rte"], FinetuneConfig(), parse_overrides(items))
    except UserError:
        event("refused")
        return
    event("accepted")
    assert cfg.lr > 0 and all(math.isfinite(v) for v in (cfg.lr, cfg.weight_decay, cfg.adam_eps, cfg.max_grad_norm))
    assert cfg.epochs >= 1 and cfg.batch_size >= 1 and cfg.eval_batch_size >= 1 and cfg.max_length >= 8
    assert 0 <= cfg.warmup_ratio < 1 and all(0 <= b < 1 for b in cfg.adam_betas) and len(cfg.adam_betas) == 2


# ---- bad steps: one with a NaN or infinite gradient is skipped, a run of them stops training ---------------

def bad_step_config(data_dir: Path, run: Path, steps: int) -> PretrainConfig:
    """A checkpoint after every step (all kept), no evaluation; 2 forward passes per step."""
    cfg = tiny_config(data_dir, run, steps=steps)
    cfg.run.checkpoint_every, cfg.run.keep_checkpoints, cfg.eval.every = 1, 0, 0
    return cfg


def same_weights(a: Path, b: Path) -> bool:
    first, second = weights(a), weights(b)
    return all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_step_with_a_nan_gradient_is_skipped_and_training_goes_on(data_dirs, tmp_path, strategy):
    """Step 5 of 8 gives NaN: its update is skipped (checkpoint-5 holds checkpoint-4's weights), the logged
    loss of its window leaves it out and counts it, a warning says so, and training goes on."""
    cfg = bad_step_config(data_dirs["roberta"], tmp_path / "run", steps=8)
    cfg.run.log_every, cfg.system.strategy = 2, strategy
    lines = []
    with poison_steps({5}):
        pretrain(cfg, log=lines.append)
    run = tmp_path / "run"
    assert same_weights(run / "checkpoint-4", run / "checkpoint-5")
    assert not same_weights(run / "checkpoint-5", run / "checkpoint-6")
    logged = {m["step"]: m for m in read_metrics(run) if "loss" in m}
    assert sorted(logged) == [2, 4, 6, 8] and all(math.isfinite(m["loss"]) for m in logged.values())
    assert [step for step, m in logged.items() if "bad_steps" in m] == [6] and logged[6]["bad_steps"] == 1
    assert ("warning: 1 of the steps up to step 6 had a NaN or infinite loss or gradient norm: left out of the "
            "logged loss, their update skipped if the gradient was") in lines


def test_more_bad_steps_in_a_row_than_tolerated_stop_the_run(data_dirs, tmp_path):
    """train.max_bad_steps=2 and steps 3 to 6 give NaN: the run stops at step 5, the third in a row, in one
    error naming the newest checkpoint (step 4's, which holds step 2's weights: 3 and 4 were skipped)."""
    run = tmp_path / "run"
    cfg = bad_step_config(data_dirs["roberta"], run, steps=10)
    cfg.run.log_every, cfg.train.max_bad_steps = 5, 2
    message = (r"training diverged: 3 steps in a row had a NaN or infinite loss or gradient norm by step 5 \(lr \S+; "
               r"2 tolerated\); no checkpoint was written from them\. Lower train\.lr or check the data, then resume "
               rf"from {re.escape(str(run / 'checkpoint-4'))}$")
    with poison_steps({3, 4, 5, 6}), pytest.raises(UserError, match=message):
        pretrain(cfg, log=lambda _: None)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert same_weights(run / "checkpoint-2", run / "checkpoint-4")
    assert not list(run.glob(".checkpoint-*"))


def test_a_checkpoint_carries_its_bad_steps_into_the_resumed_run(data_dirs, tmp_path):
    """Step 3 is bad and checkpointed (logs every 4 steps): resumed from checkpoint-3, the run logs what the
    unbroken run logs after it. With train.max_bad_steps=1 and step 4 bad too, the resumed run counts two in a
    row and stops at step 4, as the unbroken run does."""
    cfg = bad_step_config(data_dirs["roberta"], tmp_path / "run", steps=6)
    cfg.run.log_every = 4
    with poison_steps({3}):
        pretrain(cfg, log=lambda _: None)
    checkpoint = tmp_path / "run" / "checkpoint-3"
    resumed = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(tmp_path / "resumed")))
    pretrain(resumed, resume=str(checkpoint), log=lambda _: None)
    unbroken = [m for m in without_timing(read_metrics(tmp_path / "run")) if m["step"] > 3]
    assert without_timing(read_metrics(tmp_path / "resumed")) == unbroken and unbroken[0]["bad_steps"] == 1

    strict = dataclasses.replace(resumed, train=dataclasses.replace(cfg.train, max_bad_steps=1),
                                 run=dataclasses.replace(cfg.run, out_dir=str(tmp_path / "strict")))
    with poison_steps({4}), pytest.raises(UserError, match=r"2 steps in a row .* by step 4 "):
        pretrain(strict, resume=str(checkpoint), log=lambda _: None)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_torch_engine_step_with_a_non_finite_gradient_changes_nothing(strategy, fused):
    """Either engine, either AdamW implementation (fused: on the device through found_inf, also over FSDP's
    DTensor shards): a NaN gradient leaves every weight and every optimizer state (moments, step count) as
    it was, and the next finite step updates as usual."""
    from transformers import BertConfig, BertForMaskedLM

    from mlm import dist
    from mlm.config import TrainConfig
    from mlm.train.engines.torch_engines import DDPEngine, FSDPEngine
    from mlm.train.optim import build_optimizer

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, max_position_embeddings=16))
    cpu = torch.device("cpu")

    def optimizer_factory(m):
        return build_optimizer(m, TrainConfig(), fused=fused)

    dist.init("cpu", need_group=True)  # FSDP shards over a group (of one, here)
    try:
        if strategy == "ddp":
            engine = DDPEngine(model, optimizer_factory, cpu, distributed=False, compile_mode=None, autocast_dtype=None)
        else:
            engine = FSDPEngine(model, optimizer_factory, cpu, compile_mode=None, autocast_dtype=None,
                                reshard_after_forward=True)

        def full(tensor: torch.Tensor) -> torch.Tensor:
            return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()

        def step_with(bad: bool) -> torch.Tensor:
            for param in model.parameters():
                grad = torch.randn(param.shape)
                param.grad = torch.distributed.tensor.distribute_tensor(grad, param.device_mesh, param.placements) \
                    if hasattr(param, "device_mesh") else grad
            if bad:
                next(model.parameters()).grad.mul_(float("nan"))
            return engine.step(1e-3, 1.0)

        def snapshot() -> list[torch.Tensor]:
            state = engine.optimizer.state
            return [full(p) for p in model.parameters()] + [full(v) for p in model.parameters() for v in state[p].values()]

        assert torch.isfinite(step_with(bad=False))
        before = snapshot()
        assert not torch.isfinite(step_with(bad=True))
        assert all(torch.equal(a, b) for a, b in zip(before, snapshot(), strict=True))
        assert torch.isfinite(step_with(bad=False))
        assert not all(torch.equal(a, b) for a, b in zip(before, snapshot(), strict=True))
    finally:
        dist.cleanup()


RUN_POISONED = """
import sys
sys.path.insert(0, {tests!r})
from conftest import poison_steps
from mlm.cli import main
with poison_steps({steps!r}):
    main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason='needs the deepspeed extra')
@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
def test_deepspeed_skips_a_nan_step_with_bf16_and_stops_at_it_without(data_dirs, tmp_path, bf16):
    """DeepSpeed's ZeRO optimizer skips a step with non-finite gradients when it checks for overflow, which
    bf16.check_grad_overflow turns on (set by default); without that check (fp32), training stops at the
    first such step instead of tolerating train.max_bad_steps."""
    ds_config = tmp_path / "zero2.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": bf16}}))
    cfg = bad_step_config(data_dirs["roberta"], tmp_path / "run", steps=6)
    cfg.system.strategy, cfg.system.deepspeed_config = "deepspeed", str(ds_config)
    cfg.system.precision = "bf16" if bf16 else "fp32"
    runner = tmp_path / "run_poisoned.py"
    runner.write_text(RUN_POISONED.format(tests=str(Path(__file__).parent), steps={3}))
    result = subprocess.run([sys.executable, str(runner), "pretrain", *as_overrides(cfg)], capture_output=True,
                            text=True, env={**ENV, "DS_ACCELERATOR": "cpu"}, timeout=300)
    run = tmp_path / "run"
    if bf16:
        assert result.returncode == 0, result.stderr
        assert "warning: 1 of the steps up to step 3 had a NaN" in result.stdout
        assert same_weights(run / "checkpoint-2", run / "checkpoint-3")
        assert (run / "checkpoint-6").is_dir()
    else:
        assert_one_error_line(result.returncode, result.stderr, "training diverged: 1 step in a row had a NaN or "
                              "infinite loss or gradient norm by step 3 (lr")
        assert "0 tolerated" in result.stderr
        assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_a_closed_terminal_sighup_checkpoints_like_sigterm(data_dirs, tmp_path):
    """SIGHUP (the terminal or ssh session closed) stops the run with a checkpoint, like a pre-emption."""
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run", steps=10)

    def hang_up_at_step_3(line: str) -> None:
        if line.startswith("step 3/"):
            os.kill(os.getpid(), signal.SIGHUP)

    summary = pretrain(cfg, log=hang_up_at_step_3)
    assert summary["stopped_by"] == "SIGHUP" and summary["checkpoint"] == str(tmp_path / "run" / "checkpoint-3")
