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
}


def test_saved_tokenizer_reloads_with_full_vocabulary(tokenizer_dirs, family):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dirs[family]))
    assert len(tok) > 100  # not the 5-token vocabulary a bare vocab_file gives with transformers 5
    assert tok.convert_ids_to_tokens(list(range(5))) == SPECIALS[family]
    assert tokenizer_family(tok) == family


def test_round_trip(tokenizer_dirs, family):
    tok = load_tokenizer(tokenizer_dirs[family])
    text = "The old farmer sees a red ball. My sister reads the long letter."
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert decoded == (text if family == "roberta" else text.lower())
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
