"""`mlm prepare` at scale: work units, workers, resumption, shares across machines, input formats, progress."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mlm.data import stream as stream_module
from mlm.data.corpus import ReadOptions, ReadStats, iter_documents, plan_units, read_unit
from mlm.data.prepare import KILL_AFTER_UNITS, PrepareConfig, finalize, partial_dir, prepare, read_manifest
from mlm.data.stream import TokenStream
from mlm.errors import UserError

from conftest import make_documents, tiny_config

QUIET = {"log": lambda _: None}
ROOT = Path(__file__).parent.parent


def folder_bytes(path: Path) -> dict[str, bytes]:
    """Every file under `path` (tokenizer copy included) by relative name."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def config(corpus, tokenizer, out, **options) -> PrepareConfig:
    """Small work units (2 kB), so that a small corpus has many."""
    settings = {"val_fraction": 0.1, "workers": 1, "unit_bytes": 2048, "docs_per_task": 16, "progress": False, **options}
    return PrepareConfig([str(c) for c in corpus], str(tokenizer), str(out), **settings)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Two files with lines of very different lengths, a blank line and a duplicate."""
    root = tmp_path_factory.mktemp("big")
    docs = make_documents(600, seed=5)
    docs[10] = docs[20]
    (root / "a.txt").write_text("\n".join(docs[:400]) + "\n\n")
    (root / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[400:]))
    return root


@pytest.fixture(scope="module")
def reference(corpus, tokenizer_dirs, tmp_path_factory) -> Path:
    """The corpus prepared by one process, in one go."""
    out = tmp_path_factory.mktemp("ref") / "data"
    prepare(config([corpus], tokenizer_dirs["roberta"], out), **QUIET)
    return out


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "mlm", "prepare", *args], capture_output=True, text=True,
                          env=environment, timeout=300)


# ---- units --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("unit_bytes", [1, 7, 100, 4096, 10**9])
def test_byte_range_units_read_every_line_once(tmp_path, unit_bytes):
    lines = ["", "short", "a much longer line " * 20, "x", "", "ünïcödé line", "last line no newline"]
    (tmp_path / "c.txt").write_text("\n".join(lines))
    options = ReadOptions()
    units = plan_units([str(tmp_path / "c.txt")], options, unit_bytes)
    stats = ReadStats()
    docs = [d for u in units for d in read_unit(u, options, stats)]
    assert docs == [line.strip() for line in lines if line]
    assert stats.empty == 2 and stats.bytes_read == (tmp_path / "c.txt").stat().st_size
    assert len(units) == (1 if unit_bytes >= 4096 else -(-(tmp_path / "c.txt").stat().st_size // unit_bytes))


def test_output_is_the_same_for_any_number_of_workers(corpus, tokenizer_dirs, reference, tmp_path):
    units = len(plan_units([str(corpus)], ReadOptions(), 2048))
    assert units > 10
    manifest = prepare(config([corpus], tokenizer_dirs["roberta"], tmp_path / "w2", workers=2), **QUIET)
    assert manifest["units"] == units
    assert folder_bytes(tmp_path / "w2") == folder_bytes(reference)
    # The streams are the documents' tokens, each followed by the separator, in corpus order.
    from mlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dirs["roberta"])
    train = TokenStream(reference, "train")
    validation = TokenStream(reference, "validation")
    docs = list(iter_documents([str(corpus)], ReadStats()))
    total = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)
    assert len(train) + len(validation) == total
    assert manifest["documents"] == len(docs) == 600  # the blank line is skipped and counted
    assert manifest["empty_documents"] == 1
    first = tokenizer(docs[0], add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    assert train.read(0, len(first)).tolist() == first


def test_three_shares_finalize_into_the_same_bytes_and_train(corpus, tokenizer_dirs, reference, tmp_path):
    out = tmp_path / "data"
    results = [prepare(config([corpus], tokenizer_dirs["roberta"], out, num_shards=3, shard_index=i), **QUIET)
               for i in (2, 0)]
    assert results == [None, None] and not out.exists()
    with pytest.raises(UserError, match=r"work units of .* are not done, from share 1 \(--num-shards 3 --shard-index 1\)"):
        finalize(out, **QUIET)
    assert prepare(config([corpus], tokenizer_dirs["roberta"], out, num_shards=3, shard_index=1), **QUIET) is not None
    assert folder_bytes(out) == folder_bytes(reference)  # the last share finalized: manifest included
    assert not partial_dir(out).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert finalize(out, **QUIET)["documents"] == 600  # finalizing a finished one says so

    from mlm.train.pretrain import pretrain

    summary = pretrain(tiny_config(out, tmp_path / "run", steps=3), log=lambda _: None)
    assert np.isfinite(summary["train_loss"])


def test_a_finalize_on_its_own_after_every_share(corpus, tokenizer_dirs, reference, tmp_path):
    out = tmp_path / "data"
    for i in range(2):
        cfg = config([corpus], tokenizer_dirs["roberta"], out, num_shards=2, shard_index=i)
        prepare(cfg, **QUIET)
    assert folder_bytes(out) == folder_bytes(reference)


def test_a_killed_prepare_resumes_to_the_same_bytes(corpus, tokenizer_dirs, reference, tmp_path):
    out = tmp_path / "data"
    args = ["--corpus", str(corpus), "--tokenizer", str(tokenizer_dirs["roberta"]), "--out", str(out),
            "--val-fraction", "0.1", "--workers", "1", "--unit-mb", str(2048 / 2**20)]
    killed = run_cli(*args, env={KILL_AFTER_UNITS: "5"})
    assert killed.returncode == -9, killed.stderr
    parts = partial_dir(out) / "parts"
    assert len(list(parts.glob("*.json"))) == 5 and not out.exists()
    (parts / f".{999:06d}-train-00000.bin.tmp1").write_bytes(b"\0" * 6)  # what a unit cut off mid-write leaves
    (parts / f".{12:06d}-train-00000.bin.tmp1").write_bytes(b"\0" * 6)
    with pytest.raises(UserError, match=r"is not finished .* run the same `mlm prepare` again to continue"):
        read_manifest(out)
    resumed = run_cli(*args, "--num-shards", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: 5 of " in resumed.stdout
    assert folder_bytes(out) == folder_bytes(reference)
    again = run_cli(*args)  # a requeued job on finished data: harmless
    assert again.returncode == 0 and "is complete" in again.stdout


def test_a_killed_run_with_workers_resumes(corpus, tokenizer_dirs, reference, tmp_path):
    out = tmp_path / "data"
    args = ["--corpus", str(corpus), "--tokenizer", str(tokenizer_dirs["roberta"]), "--out", str(out),
            "--val-fraction", "0.1", "--workers", "2", "--unit-mb", str(2048 / 2**20)]
    assert run_cli(*args, env={KILL_AFTER_UNITS: "1"}).returncode == -9
    done = len(list((partial_dir(out) / "parts").glob("*.json")))
    time.sleep(1.5)
    assert done == len(list((partial_dir(out) / "parts").glob("*.json")))  # the workers stopped with it
    assert 1 <= done <= 2 < len(plan_units([str(corpus)], ReadOptions(), 2048))  # the other worker's unit at most
    assert run_cli(*args).returncode == 0
    assert folder_bytes(out) == folder_bytes(reference)


@pytest.mark.parametrize("change, message", [
    ("tokenizer", r"it was started with tokenizer '.*roberta' \(fingerprint \w+\), not '.*bert' \(fingerprint \w+\)"),
    ("setting", r"it was started with val_fraction = 0.1, not 0.2"),
    ("input", r"the corpus file .*a.txt changed since it was started \(size or modification time\)"),
])
def test_a_share_with_other_settings_or_input_is_refused(corpus, tokenizer_dirs, tmp_path, change, message):
    import shutil

    shutil.copytree(corpus, tmp_path / "corpus")
    out = tmp_path / "data"
    prepare(config([tmp_path / "corpus"], tokenizer_dirs["roberta"], out, num_shards=2, shard_index=0), **QUIET)
    other = {"tokenizer": {"tokenizer": str(tokenizer_dirs["bert"])}, "setting": {"val_fraction": 0.2}}.get(change, {})
    if change == "input":
        with open(tmp_path / "corpus" / "a.txt", "a") as f:
            f.write("one more line\n")
    cfg = config([tmp_path / "corpus"], tokenizer_dirs["roberta"], out, num_shards=2, shard_index=1)
    cfg = PrepareConfig(**{**cfg.__dict__, **other})
    with pytest.raises(UserError, match=message + r"; pass --overwrite to start again"):
        prepare(cfg, **QUIET)
    manifest = prepare(PrepareConfig(**{**cfg.__dict__, "overwrite": True, "num_shards": 1, "shard_index": 0}), **QUIET)
    assert manifest["units"] > 1 and not partial_dir(out).exists()


@pytest.mark.parametrize("args, message", [
    (["--num-shards", "3", "--shard-index", "3"], r"--shard-index 3 is out of range: use 0 to 2 for --num-shards 3"),
    (["--corpus", "BROKEN"], r"broken.txt.gz: not a readable gzip file"),
    (["--corpus", "BROKEN_ZST"], r"broken.jsonl.zst: not a readable zstd file"),
    (["--finalize", "NOWHERE"], r"nothing to finalize: .*nowhere.partial does not exist"),
    (["--unit-mb", "-1"], r"the work unit size \(--unit-mb\) must be positive \(or 0: automatic\)"),
])
def test_bad_input_is_one_error_line(tmp_path, tokenizer_dirs, args, message):
    (tmp_path / "c.txt").write_text("\n".join(make_documents(20)))
    (tmp_path / "broken.txt.gz").write_bytes(b"this is not gzip at all\n")
    (tmp_path / "broken.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"\xff" * 40)
    base = {"--corpus": str(tmp_path / "c.txt"), "--tokenizer": str(tokenizer_dirs["bert"]), "--out": str(tmp_path / "d")}
    if args[0] == "--corpus":
        base["--corpus"] = str(tmp_path / ("broken.txt.gz" if args[1] == "BROKEN" else "broken.jsonl.zst"))
        args = []
    if args[:1] == ["--finalize"]:
        base, args = {}, ["--finalize", str(tmp_path / "nowhere")]
    result = run_cli(*[x for kv in base.items() for x in kv], *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not (tmp_path / "d").exists() and not partial_dir(tmp_path / "d").exists()


def test_an_output_that_is_a_file_is_refused(tmp_path, tokenizer_dirs):
    (tmp_path / "c.txt").write_text("\n".join(make_documents(20)))
    (tmp_path / "d").write_text("my notes")
    result = run_cli("--corpus", str(tmp_path / "c.txt"), "--tokenizer", str(tokenizer_dirs["bert"]), "--out", str(tmp_path / "d"))
    assert (result.returncode, result.stderr) == (2, f"error: --out {tmp_path / 'd'} is a file: choose a folder\n")
    assert (tmp_path / "d").read_text() == "my notes" and not partial_dir(tmp_path / "d").exists()


def test_a_gzip_file_cut_short_is_one_error(tmp_path, tokenizer_dirs):
    data = gzip.compress("\n".join(make_documents(2000)).encode())
    (tmp_path / "c.txt.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"c.txt.gz: not a readable gzip file"):
        prepare(config([tmp_path / "c.txt.gz"], tokenizer_dirs["bert"], tmp_path / "d"), **QUIET)
    assert not (tmp_path / "d").exists()


# ---- inputs -------------------------------------------------------------------------------------------
def test_compressed_inputs_read_as_plain_ones(tmp_path):
    import zstandard

    docs = make_documents(300, seed=2)
    text = "\n".join(docs[:100]) + "\n"
    records = "".join(json.dumps({"text": d}) + "\n" for d in docs[100:200])
    zst_records = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[200:]))
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(records.encode()))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(zst_records.encode()))
    (tmp_path / "d.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"zst line\n\xff bad byte\n"))
    stats = ReadStats()
    assert list(iter_documents([str(tmp_path)], stats)) == docs + ["zst line", "\ufffd bad byte"]
    assert stats.bad_utf8 == 1 and stats.files == 4
    assert stats.bytes_read == sum(p.stat().st_size for p in tmp_path.iterdir())
    units = plan_units([str(tmp_path)], ReadOptions(), unit_bytes=10)
    assert [u.kind for u in units] == ["stream"] * 4  # a compressed file is one unit, whatever its size


def test_whole_compressed_files_as_documents(tmp_path):
    (tmp_path / "one.txt.gz").write_bytes(gzip.compress(b"Book one.\n\nChapter two."))
    (tmp_path / "two.txt").write_text("Book two.")
    docs = list(iter_documents([str(tmp_path)], ReadStats(), document_per_file=True))
    assert docs == ["Book one.\n\nChapter two.", "Book two."]


def test_parquet_row_groups_are_units(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_documents(500, seed=3)
    pq.write_table(pa.table({"text": docs, "id": list(range(500))}), tmp_path / "a.parquet", row_group_size=50)
    units = plan_units([str(tmp_path / "a.parquet")], ReadOptions(), unit_bytes=1)
    assert len(units) == 10 and all(u.rows == 50 for u in units)
    assert list(iter_documents([str(tmp_path / "a.parquet")], ReadStats())) == docs
    pq.write_table(pa.table({"text": list(range(3))}), tmp_path / "ints.parquet")
    with pytest.raises(UserError, match=r"ints.parquet: the 'text' column holds int64, not strings"):
        plan_units([str(tmp_path / "ints.parquet")], ReadOptions())


def test_a_dataset_saved_to_disk(tmp_path, tokenizer_dirs):
    import datasets

    docs = make_documents(300, seed=4)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:10]}),
                          "test": datasets.Dataset.from_dict({"text": ["held out"]})}).save_to_disk(str(tmp_path / "dict"))
    units = plan_units([str(tmp_path / "saved")], ReadOptions(), unit_bytes=1000)
    assert len(units) > 5 and [u.kind for u in units] == ["disk"] * len(units)
    assert list(iter_documents([str(tmp_path / "saved")], ReadStats())) == docs
    assert list(iter_documents([str(tmp_path / "dict")], ReadStats(), split="test")) == ["held out"]
    with pytest.raises(UserError, match=r"dict has no split 'validation' \(splits: train, test\): use --hf-split"):
        list(iter_documents([str(tmp_path / "dict")], ReadStats(), split="validation"))
    manifest = prepare(config([tmp_path / "saved"], tokenizer_dirs["bert"], tmp_path / "d", unit_bytes=1000, workers=2), **QUIET)
    assert manifest["documents"] == 300 and manifest["units"] == len(units)


def test_the_reference_dataset_layout_through_the_hub_reader(tmp_path, tokenizer_dirs, reference, corpus):
    """JackBAI/bert_pretrain_datasets is parquet files with a `text` column; the same `datasets` streaming
    code that reads it from the hub (hf:NAME) reads such files from a local folder, one unit per file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = list(iter_documents([str(corpus)], ReadStats()))
    (tmp_path / "ref" / "data").mkdir(parents=True)
    for i in range(3):
        pq.write_table(pa.table({"text": docs[i * 200 : (i + 1) * 200]}), tmp_path / "ref" / "data" / f"train-{i:05d}-of-00003.parquet")
    source = f"hf:{tmp_path / 'ref'}"
    units = plan_units([source], ReadOptions())
    assert [(u.kind, u.start, u.end) for u in units] == [("hub", i, 3) for i in range(3)]
    assert list(iter_documents([source], ReadStats())) == docs
    manifest = prepare(config([source], tokenizer_dirs["roberta"], tmp_path / "d", workers=2), **QUIET)
    assert manifest["documents"] == len(docs) and manifest["units"] == 3
    with pytest.raises(UserError, match=r"has no 'body' field \(fields: text\)"):
        plan_units([source], ReadOptions(text_field="body"))


def test_max_documents_takes_the_first_documents(corpus, tokenizer_dirs, reference, tmp_path):
    manifest = prepare(config([corpus], tokenizer_dirs["roberta"], tmp_path / "d", max_documents=55), **QUIET)
    assert manifest["documents"] == 55
    whole = TokenStream(reference, "train")
    sample = TokenStream(tmp_path / "d", "train")
    assert sample.read(0, len(sample)).tolist() == whole.read(0, len(sample)).tolist()


def test_dedup_counts_and_drops_exact_duplicates(tmp_path, tokenizer_dirs):
    docs = make_documents(100, seed=6)
    (tmp_path / "c.txt").write_text("\n".join(docs + docs[:30] + ["unique end"]))
    messages = []
    manifest = prepare(config([tmp_path / "c.txt"], tokenizer_dirs["bert"], tmp_path / "d", unit_bytes=10**6, dedup=True),
                       log=messages.append)
    expected = len(set(docs + ["unique end"]))
    assert manifest["documents"] == expected and manifest["duplicates_removed"] == len(docs) + 31 - expected
    assert any(f"{manifest['duplicates_removed']:,} duplicates removed" in m for m in messages)


def test_progress_lines_and_summary(corpus, tokenizer_dirs, tmp_path):
    messages = []
    prepare(config([corpus], tokenizer_dirs["bert"], tmp_path / "d", progress=True, log_every_s=0), log=messages.append)
    lines = [m for m in messages if m.startswith("prepare: ")]
    assert len(lines) > 5  # stderr is not a terminal under pytest: plain lines
    assert __import__("re").fullmatch(r"prepare: \d+/\d+ units \| [\d,]+ documents \([\d,]+/s\) \| [\d,]+ tokens "
                                      r"\([\d,]+/s\) \| [\d.,]+ MB/s \| \d+% \| ETA \d+:\d\d:\d\d", lines[-1]), lines[-1]
    assert lines[-1].startswith(f"prepare: {len(plan_units([str(corpus)], ReadOptions(), 2048))}/")
    summary = messages[-1]
    assert __import__("re").search(r"prepared 600 documents → [\d,]+ train \+ [\d,]+ validation tokens in \d+ work units "
                                   r"\| 1 empty documents skipped \| 0 invalid UTF-8 sequences replaced \| 2.00 bytes/token on disk "
                                   r"\| \d+\.\ds for this whole command \(tokenizer loading, planning, tokenizing and the "
                                   r"manifest\) → ", summary), summary
    # the two durations say what each covers
    assert __import__("re").fullmatch(r"this run tokenized \d+ work units \(600 documents, [\d,]+ tokens\) in \d+\.\ds "
                                      r"\([\d,]+ tokens/s, [\d.]+ MB/s of input, 1 worker\)", messages[-2]), messages[-2]


def test_a_stream_of_more_parts_than_open_files(reference, monkeypatch):
    whole = TokenStream(reference, "train")
    expected = whole.read(0, len(whole))
    monkeypatch.setattr(stream_module, "OPEN_SHARDS", 2)
    few = TokenStream(reference, "train")
    assert len(few.paths) > 10
    rng = np.random.default_rng(0)
    for start in rng.integers(0, len(few) - 300, size=50):
        assert few.read(int(start), 300).tolist() == expected[start : start + 300].tolist()
    assert len(few._open) <= 2


def test_unit_size_follows_the_corpus_size(tmp_path):
    from mlm.data.corpus import auto_unit_bytes

    for size, unit in [(6 * 2**20, 2**20), (2**30, 4 * 2**20), (32 * 2**30, 64 * 2**20)]:
        with open(tmp_path / "c.txt", "wb") as f:
            f.truncate(size)  # sparse: no disk used
        assert auto_unit_bytes([str(tmp_path / "c.txt")]) == unit


@pytest.mark.slow
def test_the_slurm_array_script_prepares_every_share(corpus, tokenizer_dirs, reference, tmp_path):
    """scripts/slurm/prepare.sbatch run as SLURM runs an array task: one share per task, the last finalizes."""
    script = ROOT / "scripts" / "slurm" / "prepare.sbatch"
    out = tmp_path / "data"
    args = ["--corpus", str(corpus), "--tokenizer", str(tokenizer_dirs["roberta"]), "--out", str(out),
            "--val-fraction", "0.1", "--unit-mb", str(2048 / 2**20), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_JOB_ID": "7",
           "SLURM_CPUS_PER_TASK": "1"}
    for index in (1, 0, 2):
        result = subprocess.run(["bash", str(script), *args], env={**env, "SLURM_ARRAY_TASK_ID": str(index)},
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    assert folder_bytes(out) == folder_bytes(reference)
    gap = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60,
                         env={**env, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "3"})
    assert gap.returncode == 2 and "use --array=0-2" in gap.stderr


def test_progress_in_documents_where_only_row_counts_are_known():
    from mlm.data.prepare import Progress

    lines = []
    progress = Progress(total=1000, done=200, by_rows=True, units=4, enabled=True, every_s=0, log=lines.append)
    progress.update(400, 9000, 0)  # a hub dataset's shard: documents, no byte count
    progress.close()
    assert " | 60% | ETA " in lines[-1] and "400 documents" in lines[-1]


def test_a_hub_corpus_without_a_network_is_one_line_at_once(tmp_path, tokenizer_dirs):
    env = {"HF_ENDPOINT": "https://hub.invalid", "HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": ""}
    start = time.time()
    result = run_cli("--corpus", "hf:someorg/somecorpus", "--tokenizer", str(tokenizer_dirs["bert"]),
                     "--out", str(tmp_path / "d"), env=env)
    assert result.returncode == 2 and time.time() - start < 30
    assert result.stderr.splitlines() == [
        "error: cannot load dataset 'someorg/somecorpus': the hub (hub.invalid) cannot be reached; run where it can, "
        "or give local files (a folder of .parquet/.jsonl files works as NAME)"]


def test_an_empty_hub_dataset_name_is_named(tmp_path, tokenizer_dirs):
    """Not "cannot load dataset '': list index out of range"."""
    for spec in ("hf:", "hf::some-config"):
        with pytest.raises(UserError) as error:
            prepare(config([spec], tokenizer_dirs["bert"], tmp_path / "d"), **QUIET)
        assert str(error.value) == f"--corpus {spec} names no dataset: the name after hf: is empty (give hf:NAME or hf:NAME:CONFIG)"
    assert not any(tmp_path.iterdir())


BAD_INPUTS = {  # the bad record comes after enough good ones that parts were being written
    "no text field": ("bad.jsonl", '{"body": "no text"}', r"bad.jsonl:41: no 'text' field"),
    "null text": ("bad.jsonl", '{"text": null}', r"bad.jsonl:41: the 'text' field is null, not a string"),
    "bad JSON": ("bad.jsonl", '{"text": oops}', r"bad.jsonl:41: not valid JSON \(Expecting value\)"),
    "cut gzip": ("bad.txt.gz", None, r"bad.txt.gz: not a readable gzip file"),
}


def write_bad_input(folder: Path, kind: str) -> Path:
    name, line, _ = BAD_INPUTS[kind]
    if line is None:  # a gzip file cut short: its start reads (the plan checks it), its end does not
        data = gzip.compress("\n".join(make_documents(2000, seed=8)).encode())
        (folder / name).write_bytes(data[: len(data) // 2])
    else:
        good = "".join(json.dumps({"text": d}) + "\n" for d in make_documents(40, seed=8))
        (folder / name).write_text(good + line + "\n")
    return folder / name


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_leaves_nothing_behind(corpus, tokenizer_dirs, tmp_path, kind, workers):
    """The .partial folder, the lock and the parts under temporary names this run made are removed: the input
    has to change, and a changed input could not continue them anyway."""
    (tmp_path / "in").mkdir()
    bad = write_bad_input(tmp_path / "in", kind)
    with pytest.raises(UserError, match=BAD_INPUTS[kind][2]):
        prepare(config([corpus, bad], tokenizer_dirs["roberta"], tmp_path / "d", workers=workers), **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_bad_input_keeps_the_partial_work_of_an_earlier_run(corpus, tokenizer_dirs, tmp_path):
    """A .partial that was there before (a killed run, another share) keeps its finished units; only the
    failed unit's temporary parts go."""
    (tmp_path / "in").mkdir()
    bad = write_bad_input(tmp_path / "in", "null text")
    out = tmp_path / "d"
    cfg = config([corpus, bad], tokenizer_dirs["roberta"], out, unit_bytes=10**6)
    assert len(plan_units(cfg.sources, ReadOptions(), cfg.unit_bytes)) == 3  # a.txt, b.jsonl, then the bad one
    assert prepare(PrepareConfig(**{**cfg.__dict__, "num_shards": 2, "shard_index": 1}), **QUIET) is None  # unit 1
    parts = partial_dir(out) / "parts"
    done = folder_bytes(parts)
    assert sorted(name for name in done if name.endswith(".json")) == ["000001.json"]
    with pytest.raises(UserError, match=BAD_INPUTS["null text"][2]):
        prepare(cfg, **QUIET)  # does unit 0 (good, kept), then unit 2 (bad)
    assert (parts / "000000.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.lock", "d.partial", "in"]
    assert folder_bytes(parts).items() >= done.items() and not list(parts.glob(".*"))


def test_finished_data_with_the_same_inputs_spelled_otherwise_is_complete(corpus, tokenizer_dirs, reference,
                                                                         tmp_path, monkeypatch):
    """Relative paths for the absolute ones of the first run: the same data, so it is complete (exit 0); another
    setting is refused, naming it."""
    before = folder_bytes(reference)
    monkeypatch.chdir(reference.parent)
    relative_corpus = os.path.relpath(corpus)
    messages = []
    manifest = prepare(config([relative_corpus], os.path.relpath(tokenizer_dirs["roberta"]), "data"),
                       log=messages.append)
    assert manifest["documents"] == 600
    assert messages == ["data is complete: 600 documents, already prepared with these settings"]
    with pytest.raises(UserError) as error:
        prepare(config([relative_corpus], tokenizer_dirs["roberta"], "data", val_fraction=0.2), **QUIET)
    assert str(error.value) == ("data is already prepared, differently: it was prepared with "
                                "val_fraction = 0.1, not 0.2; pass --overwrite to replace it, or use another --out")
    assert folder_bytes(reference) == before and sorted(p.name for p in reference.parent.iterdir()) == ["data"]
