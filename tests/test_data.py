import json
import re
import shutil

import numpy as np
import pytest

from mlm.data.corpus import ReadStats, demo_documents, iter_documents
from mlm.data.prepare import FINGERPRINT_BYTES, PrepareConfig, is_validation, prepare, read_manifest, token_dtype
from mlm.data.stream import Sampler, TokenStream, Windows, permute
from mlm.errors import UserError
from mlm.tokenizer import load_tokenizer

from conftest import make_documents

QUIET = {"log": lambda _: None}


def expected_streams(docs, tokenizer, val_fraction):
    streams = {"train": [], "validation": []}
    for i, doc in enumerate(docs):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
        streams["validation" if is_validation(i, val_fraction) else "train"].extend(ids)
    return streams


@pytest.mark.parametrize("family,workers", [("roberta", 1), ("roberta", 2), ("bert", 2)])
def test_shards_hold_exactly_the_token_stream(tmp_path, tokenizer_dirs, family, workers):
    """The shards hold what the transformers tokenizer gives each document (prepare's workers call the Rust
    tokenizer's encode_batch_fast directly), separators between documents, split as is_validation says."""
    docs = make_documents(300, seed=1)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(docs))
    out = tmp_path / "data"
    cfg = PrepareConfig([str(corpus)], str(tokenizer_dirs[family]), str(out), 0.1, workers, shard_tokens=997, docs_per_task=7)
    manifest = prepare(cfg, **QUIET)
    tokenizer = load_tokenizer(tokenizer_dirs[family])
    expected = expected_streams(docs, tokenizer, 0.1)
    for split in ("train", "validation"):
        stream = TokenStream(out, split)
        assert len(manifest["splits"][split]["shards"]) == -(-len(expected[split]) // 997)  # shards of 997 tokens
        assert stream.read(0, len(stream)).tolist() == expected[split]
    assert manifest["splits"]["validation"]["documents"] == 30
    assert manifest["dtype"] == "uint16"
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_windows_cover_the_stream_without_gaps_or_overlaps(data_dirs):
    tokenizer = load_tokenizer(data_dirs["bert"] / "tokenizer")
    stream = TokenStream(data_dirs["bert"], "train")
    windows = Windows(stream, 50, tokenizer.cls_token_id, tokenizer.sep_token_id)
    assert windows.count == len(stream) // 48
    batch = windows.batch(np.arange(windows.count))
    assert (batch[:, 0] == tokenizer.cls_token_id).all() and (batch[:, -1] == tokenizer.sep_token_id).all()
    assert batch[:, 1:-1].reshape(-1).tolist() == stream.read(0, windows.count * 48).tolist()


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000, 1023, 1025, 4097])
def test_permute_is_a_bijection(n):
    out = permute(np.arange(n), n, seed=3)
    assert sorted(out.tolist()) == list(range(n))
    if n >= 64:
        assert out.tolist() != list(range(n))  # actually shuffled
        assert out.tolist() != permute(np.arange(n), n, seed=4).tolist()


def test_sampler_epochs_ranks_and_resume():
    sampler = Sampler(num_windows=100, global_batch=20, seed=0)
    first_epoch = np.concatenate([sampler.global_batch_ids(s) for s in range(5)])
    assert sorted(first_epoch.tolist()) == list(range(100))  # each window once per epoch
    second_epoch = np.concatenate([sampler.global_batch_ids(s) for s in range(5, 10)])
    assert sorted(second_epoch.tolist()) == list(range(100)) and second_epoch.tolist() != first_epoch.tolist()
    for world in (1, 2, 4):
        parts = [sampler.rank_batch_ids(7, r, world) for r in range(world)]
        assert np.concatenate(parts).tolist() == sampler.global_batch_ids(7).tolist()
    # O(1) resume: a new sampler asked for step 7 gives the same batch, no replay.
    assert Sampler(100, 20, 0).global_batch_ids(7).tolist() == sampler.global_batch_ids(7).tolist()
    # A batch that straddles an epoch boundary still has 20 distinct-per-epoch ids.
    assert len(Sampler(30, 20, 0).global_batch_ids(1)) == 20


def test_token_dtype():
    assert token_dtype(50_265) == np.uint16
    assert token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32


def test_readers_jsonl_parquet_and_bad_utf8(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text('{"text": "first doc"}\n\n{"text": "second doc", "id": 2}\n')
    pq.write_table(pa.table({"text": ["third doc", "", "fourth doc"]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_bytes(b"fifth \xff doc\n\nsixth doc\n")
    stats = ReadStats()
    docs = list(iter_documents([str(tmp_path)], stats))
    assert docs == ["first doc", "second doc", "third doc", "fourth doc", "fifth \ufffd doc", "sixth doc"]
    assert stats.bad_utf8 == 1 and stats.files == 3


def test_bad_utf8_is_replaced_counted_and_reported(tmp_path, tokenizer_dirs):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(b"good text here\nbad \xff\xfe bytes \xc3 here\n" + "\n".join(make_documents(50)).encode())
    messages = []
    manifest = prepare(PrepareConfig([str(corpus)], str(tokenizer_dirs["bert"]), str(tmp_path / "d"), workers=1), log=messages.append)
    assert manifest["bad_utf8"] == 3
    assert any(f"replaced 3 invalid UTF-8 byte sequence(s) with U+FFFD ({corpus}: 3)" in m for m in messages)


@pytest.mark.parametrize(
    "content, message",
    [(None, "does not exist"), ("\n\n   \n", "empty")],
)
def test_missing_or_empty_corpus(tmp_path, tokenizer_dirs, content, message):
    corpus = tmp_path / "c.txt"
    if content is not None:
        corpus.write_text(content)
    out = tmp_path / "data"
    with pytest.raises(UserError, match=message):
        prepare(PrepareConfig([str(corpus)], str(tokenizer_dirs["bert"]), str(out), workers=1), **QUIET)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["c.txt"] if content is not None else [])


def test_prepare_refuses_to_overwrite(tmp_path, corpus_file, tokenizer_dirs, data_dirs):
    """Finished data made with other settings is refused, naming the setting (the fixture used 0.05)."""
    with pytest.raises(UserError, match=re.escape(
            f"{data_dirs['bert']} is already prepared, differently: it was prepared with val_fraction "
            "= 0.05, not 0.01; pass --overwrite to replace it, or use another --out")):
        prepare(PrepareConfig([str(corpus_file)], str(tokenizer_dirs["bert"]), str(data_dirs["bert"]), workers=1), **QUIET)
    read_manifest(data_dirs["bert"])  # untouched


def test_bad_jsonl_names_the_line(tmp_path, tokenizer_dirs):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(UserError, match=r"a.jsonl:2: no 'text' field"):
        prepare(PrepareConfig([str(tmp_path / "a.jsonl")], str(tokenizer_dirs["bert"]), str(tmp_path / "d"), workers=1), **QUIET)


@pytest.mark.parametrize("value, kind", [("null", "null"), ('["a", "list"]', "list"), ("12345", "int")])
def test_a_jsonl_text_that_is_not_a_string_is_refused(tmp_path, tokenizer_dirs, value, kind):
    """Never "None", "['a', 'list']" or "12345" in the vocabulary and the data."""
    (tmp_path / "a.jsonl").write_text(f'{{"text": "ok"}}\n{{"text": {value}}}\n')
    with pytest.raises(UserError, match=rf"a.jsonl:2: the 'text' field is {kind}, not a string"):
        prepare(PrepareConfig([str(tmp_path / "a.jsonl")], str(tokenizer_dirs["bert"]), str(tmp_path / "d"), workers=1), **QUIET)
    assert not (tmp_path / "d").exists()


def test_files_a_corpus_folder_leaves_out_are_named(tmp_path, tokenizer_dirs):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("\n".join(make_documents(50)))
    (tmp_path / "corpus" / "notes.md").write_text("# notes")
    (tmp_path / "corpus" / "b.txt.bz2").write_bytes(b"BZh")
    messages = []
    prepare(PrepareConfig([str(tmp_path / "corpus")], str(tokenizer_dirs["bert"]), str(tmp_path / "d"), workers=1),
            log=messages.append)
    assert (f"note: {tmp_path / 'corpus'}: skipping 2 file(s) that are not .txt, .jsonl (either also .gz or .zst) "
            "or .parquet: b.txt.bz2, notes.md") in messages


def test_a_corpus_too_small_for_its_validation_fraction_is_warned(tmp_path, tokenizer_dirs):
    (tmp_path / "c.txt").write_text("\n".join(make_documents(50)))
    messages = []
    manifest = prepare(PrepareConfig([str(tmp_path / "c.txt")], str(tokenizer_dirs["bert"]), str(tmp_path / "d"),
                                     val_fraction=0.01, workers=1), log=messages.append)
    assert manifest["splits"]["validation"]["tokens"] == 0
    assert any("no document went to validation (50 documents × --val-fraction 0.01 < 1)" in m
               and "use --val-fraction 0.02 or more" in m for m in messages)


def test_document_per_file(tmp_path, tokenizer_dirs):
    (tmp_path / "books").mkdir()
    for name in ("one", "two"):
        (tmp_path / "books" / f"{name}.txt").write_text(f"Chapter one of {name}.\n\nIt goes on.\nAnd on.\n")
    stats = ReadStats()
    docs = list(iter_documents([str(tmp_path / "books")], stats, document_per_file=True))
    assert docs == [f"Chapter one of {name}.\n\nIt goes on.\nAnd on." for name in ("one", "two")]
    assert len(list(iter_documents([str(tmp_path / "books")], ReadStats()))) == 6  # one per line otherwise
    manifest = prepare(PrepareConfig([str(tmp_path / "books")], str(tokenizer_dirs["bert"]), str(tmp_path / "d"),
                                     val_fraction=0.0, workers=1, document_per_file=True), **QUIET)
    assert manifest["documents"] == 2 and manifest["document_per_file"] is True


def test_demo_corpus_is_read_from_the_installed_package():
    docs = demo_documents()
    assert len(docs) == 2225
    assert sorted({topic for _, topic in docs}) == ["business", "entertainment", "politics", "sports", "tech"]


def test_a_killed_prepare_leaves_nothing_behind_for_long(tmp_path, tokenizer_dirs):
    (tmp_path / "c.txt").write_text("\n".join(make_documents(50)))
    stale = tmp_path / ".d.tmpk1ll3d"  # what a prepare killed mid-write leaves
    stale.mkdir()
    (stale / "train-00000.bin").write_bytes(b"\0" * 10)
    prepare(PrepareConfig([str(tmp_path / "c.txt")], str(tokenizer_dirs["bert"]), str(tmp_path / "d"), workers=1), **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "d"]


@pytest.mark.parametrize("damage, message", [
    ("manifest", r"manifest.json is damaged \(not valid JSON"),
    ("missing shard", r"train-\d+\.bin is missing \([\d,]+ tokens expected\): run `mlm prepare` again"),
    ("truncated shard", r"train-\d+\.bin is truncated \(50 tokens, the manifest lists [\d,]+\): run `mlm prepare` again"),
    # The manifest edited to list fewer tokens: training would read only those, silently.
    ("fewer tokens listed", r"train-\d+\.bin is longer than listed \([\d,]+ tokens, the manifest lists 100\): run "
                            r"`mlm prepare` again"),
])
def test_damaged_prepared_data_is_named(tmp_path, data_dirs, damage, message):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data_dirs["roberta"], data)
    shard = data / read_manifest(data)["splits"]["train"]["shards"][0]["file"]
    if damage == "manifest":
        (data / "manifest.json").write_text("{oops")
    elif damage == "missing shard":
        shard.unlink()
    elif damage == "fewer tokens listed":
        manifest = json.loads((data / "manifest.json").read_text())
        manifest["splits"]["train"]["shards"][0]["tokens"] = 100
        (data / "manifest.json").write_text(json.dumps(manifest))
    else:
        shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UserError, match=message):
        TokenStream(data, "train")


@pytest.mark.parametrize("file, kind", [("../../x.bin", "up"), ("/etc/passwd", "absolute"), ("", "empty")])
def test_a_manifest_shard_outside_the_data_folder_is_refused(tmp_path, data_dirs, file, kind):
    data = tmp_path / "data"
    shutil.copytree(data_dirs["roberta"], data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["file"] = file
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=re.escape(
            f"{data / 'manifest.json'} is damaged (shard file {file!r} is not a file inside {data}): "
            "run `mlm prepare` again")):
        TokenStream(data, "train")


@pytest.mark.parametrize("change, damage", [
    ({"dtype": "float64"}, "dtype 'float64'; prepared data holds uint16 or uint32"),  # not "…bin is truncated"
    ({"tokenizer": {"name": "tok"}}, "no tokenizer vocab_size"),  # training checks the token ids against it
])
def test_a_manifest_dtype_or_vocabulary_size_that_cannot_be_right_is_named(tmp_path, data_dirs, change, damage):
    data = tmp_path / "data"
    shutil.copytree(data_dirs["roberta"], data)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, **change}))
    with pytest.raises(UserError) as error:
        read_manifest(data)
    assert str(error.value) == f"{data / 'manifest.json'} is damaged ({damage}): run `mlm prepare` again"


@pytest.mark.parametrize("where", ["first", "last"])
def test_a_shard_replaced_after_prepare_is_named(tmp_path, data_dirs, where):
    """A shard swapped for another of the same size (from another prepared set, or a neighbour): its first or
    last 4 KiB no longer match the fingerprint in the manifest."""
    data = tmp_path / "data"
    shutil.copytree(data_dirs["roberta"], data)
    shard = data / read_manifest(data)["splits"]["train"]["shards"][0]["file"]
    data_bytes = bytearray(shard.read_bytes())
    if where == "first":
        data_bytes[0] ^= 1
    else:
        data_bytes[-1] ^= 1
    shard.write_bytes(bytes(data_bytes))
    with pytest.raises(UserError, match=rf"^{re.escape(str(shard))} is not the shard the manifest lists \(its first or "
                                        r"last bytes differ: replaced or altered after `mlm prepare`\): run `mlm prepare` again$"):
        TokenStream(data, "train")


def test_token_ids_beyond_the_vocabulary_are_named_before_the_model_sees_them(tmp_path, data_dirs):
    """A train shard overwritten with random bytes of its size: the sizes agree, the ids do not. Training says
    which shard, instead of an IndexError inside the embedding (or a device-side assert on a GPU)."""
    from conftest import tiny_config
    from mlm.train.pretrain import pretrain

    data = tmp_path / "data"
    shutil.copytree(data_dirs["roberta"], data)
    manifest = read_manifest(data)
    shard = data / manifest["splits"]["train"]["shards"][0]["file"]
    # Random bytes between the shard's first and last 4 KiB (its fingerprint): damage only the ids can show.
    data_bytes = bytearray(shard.read_bytes())
    assert len(data_bytes) > 3 * FINGERPRINT_BYTES
    data_bytes[FINGERPRINT_BYTES:-FINGERPRINT_BYTES] = np.random.default_rng(0).bytes(len(data_bytes) - 2 * FINGERPRINT_BYTES)
    shard.write_bytes(bytes(data_bytes))
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    vocab = manifest["tokenizer"]["vocab_size"]
    with pytest.raises(UserError, match=rf"^{re.escape(str(shard))} holds token id \d+, but the tokenizer has {vocab:,} "
                                        r"tokens: the data is damaged or was prepared with another tokenizer; run "
                                        r"`mlm prepare` again$"):
        pretrain(tiny_config(data, tmp_path / "run", steps=3), log=lambda _: None)
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before  # read, never written
    assert not (tmp_path / "run").exists()  # found before the run folder is made: the corrected rerun is not blocked
