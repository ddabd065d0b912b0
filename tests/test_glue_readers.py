"""Each task's reader on small files in the real GLUE download layout; custom files; clear errors."""

import json

import pytest
from glue_fixtures import write_glue_dir, write_tsv

from mlm.errors import UserError
from mlm.eval.readers import load_task_data, read_glue_tsv, read_table_file, task_from_file
from mlm.eval.tasks import GLUE_TASKS, TABLE_COLUMNS, custom_task, parse_tasks


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    return write_glue_dir(tmp_path_factory.mktemp("glue"), n_train=12, n_dev=6)


@pytest.mark.parametrize("name", list(GLUE_TASKS))
def test_every_task_reads_its_files(glue_dir, name):
    task = GLUE_TASKS[name]
    data = load_task_data(task, glue_dir)
    assert list(data) == ["train", *task.eval_splits]
    assert len(data["train"]) == 12 and all(len(data[s]) == 6 for s in task.eval_splits)
    for ex in data["train"]:
        assert set(ex) == {*task.text_fields, "label"}
        assert all(isinstance(ex[f], str) and ex[f] for f in task.text_fields)
        if task.is_regression:
            assert isinstance(ex["label"], float)
        else:
            assert isinstance(ex["label"], int) and 0 <= ex["label"] < task.num_labels


def test_cola_has_no_header_and_takes_column_3(tmp_path):
    write_tsv(tmp_path / "CoLA" / "dev.tsv", [["gj04", "1", "", "The cat sat ."], ["gj04", "0", "*", "Cat the sat ."]])
    rows = read_glue_tsv(GLUE_TASKS["cola"], tmp_path, "validation")
    assert rows == [{"sentence": "The cat sat .", "label": 1}, {"sentence": "Cat the sat .", "label": 0}]


def test_mrpc_bom_header_and_quotes_kept_raw(tmp_path):
    header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    write_tsv(tmp_path / "MRPC" / "train.tsv", [["1", "7", "8", 'He said "yes" .', "He agreed ."]], header, bom=True)
    rows = read_glue_tsv(GLUE_TASKS["mrpc"], tmp_path, "train")
    assert rows == [{"sentence1": 'He said "yes" .', "sentence2": "He agreed .", "label": 1}]


def test_label_names_map_to_hub_ids(glue_dir, tmp_path):
    header = ["index", "question", "sentence", "label"]
    write_tsv(tmp_path / "QNLI" / "dev.tsv", [["0", "q", "s", "entailment"], ["1", "q", "s", "not_entailment"]], header)
    assert [r["label"] for r in read_glue_tsv(GLUE_TASKS["qnli"], tmp_path, "validation")] == [0, 1]
    base = ["index", "promptID", "pairID", "genre", "a", "b", "c", "d", "sentence1", "sentence2"]
    rows = [["0", "1", "2", "fiction", "", "", "", "", "p", "h", *["x"] * 5, gold] for gold in ("entailment", "neutral", "contradiction")]
    write_tsv(tmp_path / "MNLI" / "dev_mismatched.tsv", rows, base + [f"label{k}" for k in range(1, 6)] + ["gold_label"])
    mm = read_glue_tsv(GLUE_TASKS["mnli"], tmp_path, "validation_mismatched")
    assert [r["label"] for r in mm] == [0, 1, 2] and mm[0]["premise"] == "p" and mm[0]["hypothesis"] == "h"


def test_stsb_score_is_float(tmp_path):
    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
    write_tsv(tmp_path / "STS-B" / "dev.tsv", [["0", "g", "f", "y", "0", "s", "s", "a b", "c d", "3.800"]], header)
    assert read_glue_tsv(GLUE_TASKS["stsb"], tmp_path, "validation") == [{"sentence1": "a b", "sentence2": "c d", "label": 3.8}]


def test_qqp_skips_incomplete_rows(tmp_path):
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    write_tsv(tmp_path / "QQP" / "train.tsv", [["0", "1", "2", "a?", "b?", "1"], ["1", "3", "4", "broken"]], header)
    assert read_glue_tsv(GLUE_TASKS["qqp"], tmp_path, "train") == [{"question1": "a?", "question2": "b?", "label": 1}]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"missing GLUE file .*RTE.*train\.tsv"):
        load_task_data(GLUE_TASKS["rte"], tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_task_data(GLUE_TASKS["rte"], tmp_path / "nope")


def test_malformed_files_are_clear_errors(tmp_path):
    # a short row in a task that does not allow them: file and line in the message
    write_tsv(tmp_path / "RTE" / "train.tsv", [["0", "a", "b", "entailment"], ["1", "only one"]], ["index", "sentence1", "sentence2", "label"])
    with pytest.raises(UserError, match=r"train\.tsv:3: 2 columns"):
        read_glue_tsv(GLUE_TASKS["rte"], tmp_path, "train")
    # a header from another task
    write_tsv(tmp_path / "SST-2" / "train.tsv", [["a", "1"]], ["text", "label"])
    with pytest.raises(UserError, match="header lacks column"):
        read_glue_tsv(GLUE_TASKS["sst2"], tmp_path, "train")
    # CoLA with a header line by mistake: the "label" is not a class
    write_tsv(tmp_path / "CoLA" / "train.tsv", [["src", "label", "orig", "sentence"], ["gj04", "1", "", "ok ."]])
    with pytest.raises(UserError, match=r"train\.tsv:1: label 'label'"):
        read_glue_tsv(GLUE_TASKS["cola"], tmp_path, "train")
    # an unknown label
    write_tsv(tmp_path / "WNLI" / "train.tsv", [["0", "a", "b", "2"]], ["index", "sentence1", "sentence2", "label"])
    with pytest.raises(UserError, match="not a class id 0..1"):
        read_glue_tsv(GLUE_TASKS["wnli"], tmp_path, "train")
    # an empty file
    write_tsv(tmp_path / "QNLI" / "train.tsv", [])
    (tmp_path / "QNLI" / "train.tsv").write_text("")
    with pytest.raises(UserError, match="empty"):
        read_glue_tsv(GLUE_TASKS["qnli"], tmp_path, "train")


def test_custom_csv_jsonl_and_task_file(tmp_path):
    (tmp_path / "train.csv").write_text('text,topic\n"hello, world",sport\nbye,tech\n')
    (tmp_path / "dev.jsonl").write_text(json.dumps({"text": "hi", "topic": "tech"}) + "\n\n" + json.dumps({"text": "yo", "topic": 0}) + "\n")
    (tmp_path / "task.toml").write_text(
        'name = "topics"\ntext_fields = ["text"]\nlabel_field = "topic"\nlabel_names = ["sport", "tech"]\n'
        'metrics = ["accuracy", "macro_f1"]\ntrain = "train.csv"\nvalidation = "dev.jsonl"\n[hparams]\nepochs = 5\n'
    )
    task = task_from_file(tmp_path / "task.toml")
    assert task.num_labels == 2 and task.hparams == {"epochs": 5} and task.metrics == ("accuracy", "macro_f1")
    data = load_task_data(task)
    assert data["train"] == [{"text": "hello, world", "label": 0}, {"text": "bye", "label": 1}]
    assert data["validation"] == [{"text": "hi", "label": 1}, {"text": "yo", "label": 0}]

    (tmp_path / "bad.jsonl").write_text('{"text": "a", "topic": 1}\n{oops\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON"):
        read_table_file(task, tmp_path / "bad.jsonl")
    (tmp_path / "nolabel.csv").write_text("text\nhello\n")
    with pytest.raises(UserError, match=r"header lacks column\(s\) \['topic'\]"):
        read_table_file(task, tmp_path / "nolabel.csv")
    (tmp_path / "bad.toml").write_text('name = "x"\ntext_fields = ["text"]\ntrain = "a"\nvalidation = "b"\nmetric = "f1"\n')
    with pytest.raises(UserError, match="unknown key"):
        task_from_file(tmp_path / "bad.toml")


@pytest.mark.parametrize("name", ["RTE/train.tsv", "mine.csv", "mine.jsonl"])
def test_a_file_that_is_not_utf8_is_named(tmp_path, name):
    """Latin-1 (or binary) bytes: one line naming the file and how to convert it, never a guess."""
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = {"RTE/train.tsv": b"index\tsentence1\tsentence2\tlabel\n0\tcaf\xe9\tb\tentailment\n",
            "mine.csv": b"text,label\ncaf\xe9,1\n", "mine.jsonl": b'{"text": "caf\xe9", "label": 1}\n'}
    path.write_bytes(rows[name])
    with pytest.raises(UserError, match=r"is not UTF-8 text \(byte b'\\xe9' cannot be decoded\): save it as UTF-8"):
        if name.startswith("RTE"):
            read_glue_tsv(GLUE_TASKS["rte"], tmp_path, "train")
        else:
            read_table_file(custom_task("mine", ["text"], 2), path)


def test_task_table_and_selection():
    assert [t.name for t in parse_tasks("all")] == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
    assert [t.name for t in parse_tasks("RTE, sst-2,rte")] == ["rte", "sst2"]
    with pytest.raises(UserError, match="unknown GLUE task 'squad'"):
        parse_tasks("rte,squad")
    # every table column names a real task, split and metric
    for col in TABLE_COLUMNS:
        task = GLUE_TASKS[col.task]
        assert col.split in task.eval_splits and col.metric in task.metrics
    with pytest.raises(UserError, match="unknown metric"):
        custom_task("x", ["text"], 2, metrics=["bleu"])


def test_hub_dataset_rows_become_the_same_examples():
    """The hub path (nyu-mll/glue through `datasets`) gives the same dicts as the TSV reader."""
    import datasets

    from mlm.eval.readers import hub_examples

    mnli = datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"premise": ["p"], "hypothesis": ["h"], "label": [2], "idx": [0]})
        for split in ("train", "validation_matched", "validation_mismatched")
    })
    data = hub_examples(GLUE_TASKS["mnli"], mnli, ["train", "validation_matched"])
    assert data == {"train": [{"premise": "p", "hypothesis": "h", "label": 2}],
                    "validation_matched": [{"premise": "p", "hypothesis": "h", "label": 2}]}
    with pytest.raises(UserError, match="no split 'validation'"):
        hub_examples(GLUE_TASKS["rte"], mnli, ["validation"])
    with pytest.raises(UserError, match="lacks column"):
        hub_examples(GLUE_TASKS["rte"], mnli, ["train"])


@pytest.mark.parametrize("key, value", [("label_names", '"ab"'), ("text_fields", '"text"'), ("metrics", '"accuracy"')])
def test_task_file_lists_must_be_lists(tmp_path, key, value):
    """A bare string would be read letter by letter (label_names = "ab" as ['a', 'b'])."""
    fields = {"name": '"t"', "text_fields": '["text"]', "num_labels": "2", "train": '"a.csv"', "validation": '"b.csv"'}
    fields[key] = value
    (tmp_path / "t.toml").write_text("".join(f"{k} = {v}\n" for k, v in fields.items()))
    with pytest.raises(UserError, match=f"{key} must be a list of strings"):
        task_from_file(tmp_path / "t.toml")


@pytest.mark.parametrize("key, value, message", [
    ("num_labels", '"five"', r"num_labels must be a whole number >= 1 \(1 for regression\), got 'five'"),
    ("num_labels", "0", r"num_labels must be a whole number >= 1"),
    ("num_labels", "2.5", r"num_labels must be a whole number >= 1"),
    ("train", "3", r"train must be a non-empty string, got 3"),
    ("label_field", '""', r"label_field must be a non-empty string"),
    ("hparams", '"fast"', r"hparams must be a table of settings"),
])
def test_task_file_fields_of_the_wrong_type_are_named(tmp_path, key, value, message):
    fields = {"name": '"t"', "text_fields": '["text"]', "num_labels": "2", "train": '"a.csv"', "validation": '"b.csv"'}
    fields[key] = value
    (tmp_path / "t.toml").write_text("".join(f"{k} = {v}\n" for k, v in fields.items()))
    with pytest.raises(UserError, match=message):
        task_from_file(tmp_path / "t.toml")


def test_the_readme_task_file_example_is_valid(tmp_path):
    from pathlib import Path

    readme = Path(__file__).parent.parent / "README.md"
    block = readme.read_text().split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "my_task.toml").write_text(block)
    (tmp_path / "train.csv").write_text("text,label\nshares fell,business\n")
    (tmp_path / "dev.jsonl").write_text('{"text": "a late goal", "label": "sport"}\n')
    task = task_from_file(tmp_path / "my_task.toml")
    assert (task.name, task.text_fields, task.label_names, task.metrics) == (
        "topics", ("text",), ("business", "sport"), ("accuracy", "macro_f1"))


def test_glue_from_an_unreachable_hub_is_one_line_at_once(monkeypatch):
    """No network (HF_ENDPOINT on a .invalid host, which never resolves): no minute of retries, the way out."""
    import time

    from mlm.eval.readers import read_hub

    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    start = time.time()
    with pytest.raises(UserError, match=r"could not load nyu-mll/glue/rte: the hub \(hub.invalid\) cannot be reached; "
                                        r"for offline use pass --glue-dir"):
        read_hub(GLUE_TASKS["rte"], ["train"])
    assert time.time() - start < 10


@pytest.mark.parametrize("score", ["nan", "inf", "-inf", "NaN"])
def test_a_regression_score_that_is_not_finite_is_refused(tmp_path, score):
    """float() takes 'nan' and 'inf': one such score made STS-B's Pearson NaN, in a result marked complete."""
    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
    rows = [["0", "g", "f", "y", "0", "s", "s", "a b", "c d", "3.8"], ["1", "g", "f", "y", "1", "s", "s", "e f", "g h", score]]
    write_tsv(tmp_path / "STS-B" / "train.tsv", rows, header)
    with pytest.raises(UserError) as e:
        read_glue_tsv(GLUE_TASKS["stsb"], tmp_path, "train")
    assert str(e.value) == (f"{tmp_path / 'STS-B' / 'train.tsv'}:3: label {score!r} is not a finite number "
                            "(task stsb is a regression): fix or remove the row")
    # the same in a file of your own (JSON writes NaN too)
    (tmp_path / "mine.jsonl").write_text('{"text": "a", "label": 1.5}\n{"text": "b", "label": NaN}\n')
    with pytest.raises(UserError, match=r"mine\.jsonl:2: label nan is not a finite number \(task mine is a regression\)"):
        read_table_file(custom_task("mine", ["text"], 1, metrics=["pearson"]), tmp_path / "mine.jsonl")


@pytest.mark.parametrize("field, value, message", [
    # a GLUE task's name, in any case or spelling: its results would fill GLUE's column beside the reference's
    ("name", '"rte"', "name 'rte' is a GLUE task's name: choose another name for a task of your own"),
    ("name", '"MNLI"', "name 'MNLI' is a GLUE task's name: choose another name for a task of your own"),
    ("name", '"sts-b"', "name 'sts-b' is a GLUE task's name: choose another name for a task of your own"),
    # the name is a file name (OUT/<name>.json): no way out of the results folder
    *[("name", f'"{bad}"', f"name '{bad}' is not a plain file name (it names the results file NAME.json): use "
       "letters, digits, '-', '_' and '.', not starting with '.'") for bad in ("../../evil", "a/b", ".hidden", "a b", "..")],
    ("metrics", "[]", "task t: metrics is empty: list one or more of accuracy, f1, macro_f1, mcc, pearson, spearman"),
    ("label_names", '["yes", "no", "yes"]', "task t: label_names lists 'yes' twice: each class needs its own name"),
])
def test_task_file_names_metrics_and_label_names_are_checked(tmp_path, field, value, message):
    fields = {"name": '"t"', "text_fields": '["text"]', "train": '"a.csv"', "validation": '"b.csv"'}
    fields[field] = value
    if field != "label_names":
        fields["num_labels"] = "2"
    (tmp_path / "t.toml").write_text("".join(f"{k} = {v}\n" for k, v in fields.items()))
    with pytest.raises(UserError) as e:
        task_from_file(tmp_path / "t.toml")
    assert str(e.value) == f"{tmp_path / 't.toml'}: {message}"


def test_a_plain_task_name_with_dots_digits_and_dashes_is_fine(tmp_path):
    assert custom_task("my-topics_v2.1", ["text"], 2).name == "my-topics_v2.1"
    assert custom_task("rte2", ["text"], 2).name == "rte2"  # near a GLUE name is fine
    with pytest.raises(UserError, match="is a GLUE task's name"):
        custom_task("CoLA", ["text"], 2)  # the same check for tasks built in Python
