import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mlm.errors import UserError
from mlm.tokenizer import build_tokenizer, load_tokenizer, tokenizer_family, tokenizer_fingerprint, train_tokenizer

from conftest import make_documents

SPECIALS = {
    "roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "modernbert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
}
LAYOUT = {"roberta": "roberta", "bert": "bert", "modernbert": "bert"}  # ModernBERT uses BERT's [CLS] … [SEP]


def test_saved_tokenizer_reloads_with_full_vocabulary(tokenizer_dirs, family):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dirs[family]))
    assert len(tok) > 100  # not the 5-token vocabulary a bare vocab_file gives with transformers 5
    assert tok.convert_ids_to_tokens(list(range(5))) == SPECIALS[family]
    assert tokenizer_family(tok) == LAYOUT[family]


def test_round_trip(tokenizer_dirs, family):
    tok = load_tokenizer(tokenizer_dirs[family])
    text = "The old farmer sees a red ball. My sister reads the long letter."
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert decoded == (text.lower() if family == "bert" else text)  # only BERT's WordPiece is uncased
    assert tok.unk_token_id not in ids


def test_roberta_mask_swallows_preceding_space(tokenizer_dirs):
    tok = load_tokenizer(tokenizer_dirs["roberta"])
    tokens = tok.convert_ids_to_tokens(tok("the cat <mask> the river")["input_ids"])
    assert tokens[tokens.index("<mask>") - 1] != "Ġ"


def test_fingerprint_is_stable_across_save_and_load(tokenizer_dirs, tmp_path):
    a = load_tokenizer(tokenizer_dirs["roberta"])
    b = load_tokenizer(tokenizer_dirs["bert"])
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    copy = build_tokenizer(tmp_path / "copy", from_name=str(tokenizer_dirs["roberta"]), log=lambda _: None)
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "copy")) == tokenizer_fingerprint(a) == tokenizer_fingerprint(copy)


def test_build_from_corpus_file(corpus_file, tmp_path):
    tok = build_tokenizer(tmp_path / "tok", [str(corpus_file)], "bert", 300, log=lambda _: None)
    assert 50 < len(tok) <= 300
    assert (tmp_path / "tok" / "tokenizer.json").is_file()


def test_empty_corpus_is_rejected(tmp_path):
    with pytest.raises(UserError, match="empty"):
        train_tokenizer([], "roberta", 1000, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_unknown_family_and_missing_tokenizer(tmp_path):
    with pytest.raises(UserError, match="unknown model family"):
        train_tokenizer(make_documents(10), "gpt", 1000, tmp_path / "tok")
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    assert not Path(tmp_path / "tok").exists()


def test_a_trained_tokenizer_truncates_to_its_model_length(tokenizer_dirs, family):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dirs[family]))
    assert tok.model_max_length == 512
    long_text = " ".join(make_documents(400))
    assert len(tok(long_text, truncation=True)["input_ids"]) == 512


def test_an_existing_folder_is_never_replaced_by_accident(corpus_file, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-1").mkdir()
    with pytest.raises(UserError, match="already exists: choose another folder, or --overwrite"):
        build_tokenizer(run, [str(corpus_file)], "bert", 300, log=lambda _: None)
    with pytest.raises(UserError, match="is not a tokenizer folder"):
        build_tokenizer(run, [str(corpus_file)], "bert", 300, log=lambda _: None, overwrite=True)
    assert (run / "checkpoint-1").is_dir()
    build_tokenizer(tmp_path / "tok", [str(corpus_file)], "bert", 300, log=lambda _: None)
    build_tokenizer(tmp_path / "tok", [str(corpus_file)], "roberta", 400, log=lambda _: None, overwrite=True)
    assert tokenizer_family(load_tokenizer(tmp_path / "tok")) == "roberta"


def _hub_cache_holding(tokenizer_dir: Path, cache: Path, repo_id: str) -> None:
    """The layout huggingface_hub leaves after downloading `repo_id`: refs/main → snapshots/<commit>/files,
    and .no_exist/<commit>/ marking the files the repository does not have (here config.json)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tokenizer_dir, repo / "snapshots" / commit)
    (repo / ".no_exist" / commit).mkdir(parents=True)
    (repo / ".no_exist" / commit / "config.json").touch()


def test_without_a_network_a_hub_tokenizer_comes_from_the_cache_at_once(tokenizer_dirs, corpus_file, tmp_path):
    """The hub unreachable (HF_ENDPOINT on a .invalid host, which never resolves): a tokenizer in the local
    cache loads without a retry, and one that is not there is one error line in seconds, not a minute."""
    env = {**os.environ, "HF_ENDPOINT": "https://hub.invalid", "HF_HUB_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    env.pop("HF_HUB_OFFLINE", None)
    _hub_cache_holding(tokenizer_dirs["roberta"], tmp_path / "cache", "someorg/tiny-tok")

    def prepare(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mlm", "prepare", "--corpus", str(corpus_file), "--tokenizer", name,
                               "--out", str(tmp_path / name.replace("/", "-"))], capture_output=True, text=True,
                              env=env, timeout=120)

    cached = prepare("someorg/tiny-tok")
    assert cached.returncode == 0 and "Retry" not in cached.stderr, cached.stderr
    start = time.time()
    missing = prepare("someorg/not-there")
    assert missing.returncode == 2 and time.time() - start < 20
    assert missing.stderr.splitlines() == [
        "error: cannot load tokenizer 'someorg/not-there': the hub (hub.invalid) cannot be reached and it is not in "
        "the local cache; give a tokenizer folder, or run where the hub can be reached"]


def test_a_tokenizer_path_of_several_folders_is_never_taken_for_a_hub_name():
    with pytest.raises(UserError, match="tokenizer directory some/local/path does not exist"):
        load_tokenizer("some/local/path")


def _run_mlm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    return subprocess.run([sys.executable, "-m", "mlm", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=120)


@pytest.mark.parametrize("damage, what", [("missing", "is missing"), ("a folder", "is not a file"), ("empty", "is missing")])
def test_a_tokenizer_folder_without_a_vocabulary_is_refused(tokenizer_dirs, corpus_file, tmp_path, damage, what):
    """Without tokenizer.json transformers builds a tokenizer of the 5 special tokens, and prepare would turn every
    document into one unknown token."""
    tok = tmp_path / "tok"
    if damage == "empty":
        tok.mkdir()
    else:
        shutil.copytree(tokenizer_dirs["roberta"], tok)
        (tok / "tokenizer.json").unlink()
        if damage == "a folder":
            (tok / "tokenizer.json").mkdir()
    message = (f"tokenizer folder {tok} holds no vocabulary: tokenizer.json {what} (nor are there the vocab.json + "
               "merges.txt, vocab.txt or .model files of a slow tokenizer); give a whole tokenizer folder, as "
               "`mlm tokenizer` writes")
    with pytest.raises(UserError) as error:
        load_tokenizer(tok)
    assert str(error.value) == message
    result = _run_mlm("prepare", "--corpus", str(corpus_file), "--tokenizer", str(tok), "--out", str(tmp_path / "d"))
    assert (result.returncode, result.stderr) == (2, f"error: {message}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_a_slow_tokenizer_folder_of_vocabulary_files_still_loads(tokenizer_dirs, tmp_path):
    """vocab.txt without tokenizer.json (as older BERT folders are) is a vocabulary: not refused."""
    whole = load_tokenizer(tokenizer_dirs["bert"])
    shutil.copytree(tokenizer_dirs["bert"], tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").unlink()
    vocab = sorted(whole.get_vocab(), key=whole.get_vocab().get)
    (tmp_path / "tok" / "vocab.txt").write_text("".join(token + "\n" for token in vocab))
    slow = load_tokenizer(tmp_path / "tok")
    assert len(slow) == len(whole) and slow("a dog")["input_ids"] == whole("a dog")["input_ids"]


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "is damaged (not a JSON object)"),
    ("{oops", "is damaged (not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    (None, "is not a file"),
])
def test_a_damaged_tokenizer_config_is_named(tokenizer_dirs, tmp_path, content, message):
    tok = tmp_path / "tok"
    shutil.copytree(tokenizer_dirs["roberta"], tok)
    config = tok / "tokenizer_config.json"
    if content is None:
        config.unlink()
        config.mkdir()
    else:
        config.write_text(content)
    with pytest.raises(UserError) as error:
        load_tokenizer(tok)
    assert str(error.value) == f"{config} {message}: copy the tokenizer folder again"


@pytest.mark.parametrize("out", [".", "", ".."])
def test_a_tokenizer_out_that_names_no_folder_is_refused(corpus_file, tmp_path, out):
    """Not "Invalid argument at .": the tokenizer is written beside --out and renamed to it."""
    (tmp_path / "here").mkdir()
    result = _run_mlm("tokenizer", "--corpus", str(corpus_file), "--vocab-size", "300", "--out", out,
                      cwd=tmp_path / "here")
    message = ("--out is empty: name a new or tokenizer folder (e.g. --out tok)" if not out else
               f"--out {out!r} names no folder of its own: name a new or tokenizer folder (e.g. --out tok)")
    assert (result.returncode, result.stderr) == (2, f"error: {message}\n")
    assert [p.name for p in tmp_path.iterdir()] == ["here"] and not any((tmp_path / "here").iterdir())


def test_copying_a_tokenizer_and_training_one_at_once_is_refused(tokenizer_dirs, corpus_file, tmp_path):
    """--corpus with --from was silently ignored: the copy was not trained on that corpus."""
    with pytest.raises(UserError) as error:
        build_tokenizer(tmp_path / "tok", [str(corpus_file)], from_name=str(tokenizer_dirs["roberta"]), log=lambda _: None)
    assert str(error.value) == "--from copies a tokenizer and --corpus trains one: give one of them, not both"
    assert not any(tmp_path.iterdir())


def test_a_tokenizer_config_with_a_length_that_cannot_be_is_named(tokenizer_dirs, tmp_path):
    import json

    folder = tmp_path / "tok"
    shutil.copytree(tokenizer_dirs["roberta"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["model_max_length"] = -5
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"has model_max_length -5: it must be a positive number \(its "
                                        r"tokenizer_config.json is damaged\)"):
        load_tokenizer(folder)
