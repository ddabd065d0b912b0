"""What mlm refuses so that a folder, file or option from someone else cannot run code, overwrite a file it does
not name, or take the machine's memory: a checkpoint's own Python (auto_map) and pickles beyond weights,
writes through symbolic links, glob loops, and inputs that ended in a traceback or a silent misreading."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glue_fixtures import make_checkpoint
from mlm.errors import UserError

# ---- a checkpoint is data, never code --------------------------------------------------------------------

EVIL_CODE = """
from pathlib import Path
Path({marker!r}).write_text("the checkpoint's code ran")
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification
class EvilConfig(BertConfig):
    model_type = "evilbert"
class EvilForMaskedLM(BertForMaskedLM):
    config_class = EvilConfig
class EvilForSequenceClassification(BertForSequenceClassification):
    config_class = EvilConfig
"""


def code_checkpoint(root: Path) -> tuple[Path, Path]:
    """A whole checkpoint whose config.json names a Python file of its own, which writes a marker when imported
    (as transformers does when `trust_remote_code` is true, or when asked "[y/N]" and told y)."""
    folder, marker = Path(make_checkpoint(root / "evil")), root / "code-ran"
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "evilbert"
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForMaskedLM": "evil.EvilForMaskedLM",
                          "AutoModelForSequenceClassification": "evil.EvilForSequenceClassification"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    return folder, marker


@pytest.fixture
def yes_on_stdin(monkeypatch):
    """What `echo y | mlm …` gives transformers' "Do you wish to run the custom code? [y/N]"."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 20))


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("auto", ["AutoConfig", "AutoTokenizer", "AutoModelForMaskedLM",
                                  "AutoModelForSequenceClassification"])
def test_no_load_runs_a_checkpoint_s_code_even_when_told_yes(tmp_path, yes_on_stdin, auto):
    import transformers

    from mlm.model.loading import from_pretrained

    folder, marker = code_checkpoint(tmp_path)
    with pytest.raises(UserError) as e:
        from_pretrained(getattr(transformers, auto), folder, "a thing")
    assert f"{folder}: cannot load it as a thing without running its code" in one_line(e)
    assert "auto_map" in str(e.value)
    assert not marker.exists()


def test_init_from_a_checkpoint_with_code_is_one_line_and_runs_nothing(data_dirs, tmp_path, yes_on_stdin):
    from conftest import tiny_config
    from mlm.train.pretrain import pretrain

    folder, marker = code_checkpoint(tmp_path)
    cfg = tiny_config(data_dirs["bert"], tmp_path / "run", family="bert")
    cfg.model.init_from = str(folder)
    with pytest.raises(UserError) as e:
        pretrain(cfg, log=lambda _: None)
    assert str(folder) in one_line(e) and "without running its code" in str(e.value)
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_mlm_glue_on_a_checkpoint_with_code_says_one_line_and_runs_nothing(tmp_path):
    folder, marker = code_checkpoint(tmp_path)
    rows = [{"text": f"example {i}", "label": i % 2} for i in range(8)]
    for split in ("train", "dev"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "task.toml").write_text('name = "probe"\ntext_fields = ["text"]\nnum_labels = 2\n'
                                        'train = "train.jsonl"\nvalidation = "dev.jsonl"\n')
    result = subprocess.run(
        [sys.executable, "-m", "mlm", "glue", "--model", str(folder), "--task-file", str(tmp_path / "task.toml"),
         "--out", str(tmp_path / "out"), "--epochs", "1", "--seeds", "1"],
        input="y\n" * 20, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {folder}: cannot load it as") and "code" in lines[0]
    assert "[y/N]" not in result.stdout + result.stderr
    assert not marker.exists()


def test_a_known_model_type_that_names_code_or_an_unknown_one_is_refused(tmp_path):
    from mlm.model.loading import check_no_code

    folder = Path(make_checkpoint(tmp_path / "ckpt"))
    check_no_code(folder)  # a plain checkpoint
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "auto_map": {"AutoTokenizer": ["x.T", None]}}))
    with pytest.raises(UserError, match=r"tokenizer_config.json has auto_map"):
        check_no_code(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()),
                                                    "model_type": "nobodyknows"}))
    with pytest.raises(UserError, match=r"model_type 'nobodyknows', which transformers does not know"):
        check_no_code(folder)


class _RunsCode:
    """What a malicious pickle holds: unpickling it calls a function of the pickler's choice."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the pickle ran"))


def test_a_pickle_checkpoint_loads_only_as_weights(tmp_path):
    from mlm.model.build import load_model

    folder = Path(make_checkpoint(tmp_path / "pickled"))
    weights = load_model(folder).state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(dict(weights), folder / "pytorch_model.bin")  # a weights-only pickle: loads
    assert torch.equal(load_model(folder).state_dict()["bert.embeddings.word_embeddings.weight"],
                       weights["bert.embeddings.word_embeddings.weight"])

    marker = tmp_path / "pickle-ran"
    torch.save({**weights, "extra": _RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(UserError) as e:
        load_model(folder)
    message = one_line(e)
    assert str(folder) in message and "mlm loads only safetensors or weights-only pickles" in message
    assert "weights_only" not in message and "False" not in message  # never the advice to unpickle it anyway
    assert not marker.exists()


# ---- never write through a symbolic link -----------------------------------------------------------------


def test_the_run_lock_owner_is_not_written_through_a_link(tmp_path):
    from mlm.train.run_lock import LOCK_FILE, OWNER_FILE, lock_run_dir

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / OWNER_FILE).symlink_to(victim)
    lock = lock_run_dir(run)
    lock.release()
    assert victim.read_text() == "keep me\n"
    assert not (run / OWNER_FILE).is_symlink() and "pid" in (run / OWNER_FILE).read_text()

    (run / LOCK_FILE).unlink()
    (run / LOCK_FILE).symlink_to(victim)
    with pytest.raises(UserError) as e:
        lock_run_dir(run)
    assert f"{run / LOCK_FILE} is a symbolic link" in one_line(e)
    assert victim.read_text() == "keep me\n"


def test_small_files_replace_a_link_and_appends_refuse_one(tmp_path):
    from mlm.atomic import open_append, write_file
    from mlm.config import PretrainConfig, save_config

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    for name in ("config.json", "results.md"):
        (tmp_path / name).symlink_to(victim)
    save_config(PretrainConfig(), tmp_path / "config.json")
    write_file(tmp_path / "results.md", "| a | b |\n")
    assert victim.read_text() == "keep me\n"
    assert json.loads((tmp_path / "config.json").read_text())["train"]
    assert (tmp_path / "results.md").read_text() == "| a | b |\n" and not (tmp_path / "results.md").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "precious.txt", "results.md"]  # no leftovers

    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(UserError) as e:
        open_append(tmp_path / "metrics.jsonl")
    assert "metrics.jsonl is a symbolic link" in one_line(e)
    with open_append(tmp_path / "plain.jsonl") as f:
        f.write("{}\n")
    with open_append(tmp_path / "plain.jsonl") as f:
        f.write("{}\n")
    assert (tmp_path / "plain.jsonl").read_text() == "{}\n{}\n"
    assert victim.read_text() == "keep me\n"


def test_a_run_folder_with_a_planted_owner_link_trains_and_leaves_its_target(data_dirs, tmp_path):
    from conftest import tiny_config
    from mlm.train.pretrain import pretrain
    from mlm.train.run_lock import OWNER_FILE

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / OWNER_FILE).symlink_to(victim)
    pretrain(tiny_config(data_dirs["roberta"], tmp_path / "run", steps=2), log=lambda _: None)
    assert victim.read_text() == "keep me\n"


# ---- inputs that ended in a traceback or were misread ----------------------------------------------------


def test_a_launcher_port_out_of_range_is_one_line_exit_2():
    from mlm.launch import launch

    with pytest.raises(UserError) as e:
        launch(["--master_port=99999", "--nproc-per-node=1", "pretrain", "--train.steps=1"])
    assert "mlm launch: The port number of the rendezvous endpoint '127.0.0.1:99999' must be" in one_line(e)
    result = subprocess.run([sys.executable, "-m", "mlm", "launch", "--rdzv-backend=c10d",
                             "--rdzv-endpoint=localhost:70000", "pretrain", "--train.steps=1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: mlm launch: The port number")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("options", [[], ["--standalone"], ["--nnodes=2", "--master-addr=node0"], ["--master-port=29501"],
                                     ["--rdzv-backend=c10d", "--rdzv-endpoint=node0"]])
def test_launcher_options_without_a_bad_port_pass_the_check(options):
    from torch.distributed.run import get_args_parser

    from mlm.launch import check_launcher_options

    check_launcher_options(get_args_parser().parse_args([*options, "--module", "mlm", "pretrain"]))  # no port: its own


def test_a_glob_does_not_follow_a_folder_link_back_up(tmp_path):
    from mlm.data.corpus import ReadStats, iter_documents, resolve_files

    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    for name, text in (("a.txt", "alpha\n"), ("sub/b.txt", "beta\n"), ("sub/c.txt", "gamma\n")):
        (docs / name).write_text(text)
    (docs / "sub" / "back").symlink_to("..")  # a loop: sub/back/sub/back/…
    (docs / "again.txt").symlink_to("a.txt")  # a second name for one file
    pattern = str(docs / "**" / "*.txt")
    assert [p.relative_to(docs) for p in resolve_files(pattern)] == [Path("a.txt"), Path("sub/b.txt"),
                                                                     Path("sub/c.txt")]
    assert len(resolve_files(str(docs))) == 3
    stats = ReadStats()
    assert sorted(iter_documents([pattern], stats)) == ["alpha", "beta", "gamma"]


def test_a_task_file_row_whose_text_is_not_a_string_is_named(tmp_path):
    from mlm.eval.readers import read_table_file
    from mlm.eval.tasks import custom_task

    task = custom_task(name="probe", text_fields=["text"], num_labels=2)
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine", "label": 0}\n{"text": 5, "label": 1}\n')
    with pytest.raises(UserError) as e:
        read_table_file(task, path)
    assert one_line(e) == f"{path}:2: field 'text' must be text (a JSON string), got 5"
    path.write_text('{"text": ["a", "list"], "label": 1}\n')
    with pytest.raises(UserError, match=r":1: field 'text' must be text \(a JSON string\), got \[\"a\", \"list\"\]"):
        read_table_file(task, path)


def test_tokenizer_training_takes_long_documents_in_pieces_and_learns_the_same(tmp_path, monkeypatch):
    import mlm.tokenizer as tok

    text = " ".join(f"word{i % 97} tail{i % 13}" for i in range(3000))  # one 40,000-character document
    pieces = list(tok.training_pieces([text, "short"], limit=1000))
    assert "".join(pieces[:-1]) == text and pieces[-1] == "short"
    assert all(len(p) <= 1000 for p in pieces) and all(p.startswith(" ") for p in pieces[1:-1])
    assert list(tok.training_pieces(["x" * 2500], limit=1000)) == ["x" * 1000, "x" * 1000, "x" * 500]

    for family in ("roberta", "bert"):
        whole = tok.train_tokenizer([text], family, 400, tmp_path / f"{family}-whole", min_frequency=1)
        monkeypatch.setattr(tok, "TRAINING_PIECE_CHARS", 1000)
        cut = tok.train_tokenizer([text], family, 400, tmp_path / f"{family}-cut", min_frequency=1)
        monkeypatch.undo()
        assert set(whole.get_vocab()) == set(cut.get_vocab())  # WordPiece numbers tied tokens differently run to run
        if family == "roberta":
            assert whole.get_vocab() == cut.get_vocab()


@pytest.mark.slow
def test_tokenizer_training_on_one_huge_line_stays_in_bounded_memory(tmp_path):
    """One 20 MB line took some 100 bytes a character (1.7 GB) before documents went to the trainer in pieces."""
    corpus = tmp_path / "one-line.txt"
    words = [f"w{i}" for i in range(5000)]
    corpus.write_text(" ".join(words[i * 7919 % 5000] for i in range(4_000_000)) + "\n")  # ~20 MB, one line
    script = (
        "from mlm.tokenizer import build_tokenizer\n"
        f"build_tokenizer({str(tmp_path / 'tok')!r}, [{str(corpus)!r}], vocab_size=1000, log=lambda _: None)\n"
        # VmHWM: this process's own peak. ru_maxrss would also count the pytest process it was started from
        # (Linux keeps the larger of the two across exec), over a gigabyte late in a full run.
        "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')))\n"  # KiB
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    peak_mib = int(result.stdout.split()[-1]) / 1024
    assert peak_mib < 900, f"peak {peak_mib:.0f} MiB"
