"""The GLUE task table: each task is a row of data, not a class.

A row says which text fields an example has, how many labels (1 = regression), which
metrics to compute, where the data lives (Hugging Face hub config and the original
GLUE download layout), and any hyper-parameters that differ from `FinetuneConfig`.

Examples are plain dicts: the task's text fields (named as in the hub dataset
`nyu-mll/glue`, so hub and local files give the same dicts) plus "label"
(an int class id, or a float for regression).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mlm.errors import UserError


@dataclass(frozen=True)
class TsvLayout:
    """Where a task lives in the original GLUE download, and how its TSV files are laid out."""

    folder: str
    """Sub-folder of the GLUE directory, e.g. "CoLA"."""
    files: dict[str, str]
    """Split name -> file name inside `folder`, e.g. {"train": "train.tsv", "validation": "dev.tsv"}."""
    columns: dict[str, int | str]
    """Example field (text fields and "label") -> column: a header name, or an index when there is no header."""
    header: bool = True
    """Whether the first line names the columns (CoLA train/dev are the only GLUE files without one)."""
    skip_short_rows: bool = False
    """Skip rows with missing fields instead of failing (QQP train has a few such rows)."""


@dataclass(frozen=True)
class TaskSpec:
    """One task: a row of the task table. Build your own for custom data (see `custom_task`)."""

    name: str
    """Short lower-case name, used in file names and the results table, e.g. "mrpc"."""
    text_fields: tuple[str, ...]
    """Example keys holding the text: one (single sentence) or two (sentence pair)."""
    num_labels: int
    """Number of classes; 1 means regression (e.g. STS-B)."""
    metrics: tuple[str, ...]
    """Metric names from `mlm.eval.metrics.METRICS`; the first one picks the median seed and is the headline."""
    label_names: tuple[str, ...] = ()
    """Class names in id order; string labels in files are mapped through this (ids also accepted)."""
    eval_splits: tuple[str, ...] = ("validation",)
    """Splits scored after fine-tuning (MNLI has matched and mismatched)."""
    hub: tuple[str, str] | None = None
    """(dataset path, config name) on the Hugging Face hub, e.g. ("nyu-mll/glue", "cola")."""
    tsv: TsvLayout | None = None
    """Layout in the original GLUE download (used with --glue-dir)."""
    files: dict[str, str] = field(default_factory=dict)
    """For custom tasks: split name -> CSV / TSV / JSONL file."""
    label_field: str = "label"
    """Column holding the label in custom files."""
    hparams: dict[str, object] = field(default_factory=dict)
    """FinetuneConfig fields that differ for this task, e.g. {"epochs": 10}."""

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    def __post_init__(self) -> None:
        from mlm.eval.metrics import METRICS  # late import: metrics imports nothing from here

        if not 1 <= len(self.text_fields) <= 2:
            raise UserError(f"task {self.name}: needs one or two text fields, got {list(self.text_fields)}")
        if self.num_labels < 1:
            raise UserError(f"task {self.name}: num_labels must be >= 1")
        if self.label_names and len(self.label_names) != self.num_labels:
            raise UserError(f"task {self.name}: {len(self.label_names)} label names for {self.num_labels} labels")
        # A name listed twice would map every label of that name to its first id: a silently wrong task.
        twice = [n for i, n in enumerate(self.label_names) if n in self.label_names[:i]]
        if twice:
            raise UserError(f"task {self.name}: label_names lists {twice[0]!r} twice: each class needs its own name")
        if not self.metrics:
            raise UserError(f"task {self.name}: metrics is empty: list one or more of {', '.join(METRICS)}")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise UserError(f"task {self.name}: unknown metric(s) {unknown}; known: {', '.join(METRICS)}")


def _glue_pair(folder: str, a: str, b: str, label: str = "label") -> TsvLayout:
    return TsvLayout(folder, {"train": "train.tsv", "validation": "dev.tsv"}, {a: a, b: b, "label": label})


# The GLUE table. Text field names and label order follow the hub dataset nyu-mll/glue;
# the TSV columns follow the original GLUE download (download_glue_data.py).
GLUE_TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec(
            "cola", ("sentence",), 2, ("mcc", "accuracy"), ("unacceptable", "acceptable"),
            hub=("nyu-mll/glue", "cola"),
            # No header; columns: source, label, original label (or empty), sentence.
            tsv=TsvLayout("CoLA", {"train": "train.tsv", "validation": "dev.tsv"},
                          {"sentence": 3, "label": 1}, header=False),
        ),
        TaskSpec(
            "sst2", ("sentence",), 2, ("accuracy",), ("negative", "positive"),
            hub=("nyu-mll/glue", "sst2"),
            tsv=TsvLayout("SST-2", {"train": "train.tsv", "validation": "dev.tsv"},
                          {"sentence": "sentence", "label": "label"}),
        ),
        TaskSpec(
            "mrpc", ("sentence1", "sentence2"), 2, ("f1", "accuracy"), ("not_equivalent", "equivalent"),
            hub=("nyu-mll/glue", "mrpc"),
            # Header: Quality, #1 ID, #2 ID, #1 String, #2 String.
            tsv=TsvLayout("MRPC", {"train": "train.tsv", "validation": "dev.tsv"},
                          {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"}),
        ),
        TaskSpec(
            "stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearman"),
            hub=("nyu-mll/glue", "stsb"),
            # Header: index, genre, filename, year, old_index, source1, source2, sentence1, sentence2, score.
            tsv=_glue_pair("STS-B", "sentence1", "sentence2", label="score"),
        ),
        TaskSpec(
            "qqp", ("question1", "question2"), 2, ("f1", "accuracy"), ("not_duplicate", "duplicate"),
            hub=("nyu-mll/glue", "qqp"),
            # Header: id, qid1, qid2, question1, question2, is_duplicate.
            tsv=TsvLayout("QQP", {"train": "train.tsv", "validation": "dev.tsv"},
                          {"question1": "question1", "question2": "question2", "label": "is_duplicate"},
                          skip_short_rows=True),
        ),
        TaskSpec(
            "mnli", ("premise", "hypothesis"), 3, ("accuracy",), ("entailment", "neutral", "contradiction"),
            eval_splits=("validation_matched", "validation_mismatched"),
            hub=("nyu-mll/glue", "mnli"),
            # Header: index, promptID, pairID, genre, 4 parse columns, sentence1, sentence2,
            # label1 (train) or label1..label5 (dev), gold_label.
            tsv=TsvLayout("MNLI", {"train": "train.tsv", "validation_matched": "dev_matched.tsv",
                                   "validation_mismatched": "dev_mismatched.tsv"},
                          {"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"}),
        ),
        TaskSpec(
            "qnli", ("question", "sentence"), 2, ("accuracy",), ("entailment", "not_entailment"),
            hub=("nyu-mll/glue", "qnli"),
            # Header: index, question, sentence, label.
            tsv=_glue_pair("QNLI", "question", "sentence"),
        ),
        TaskSpec(
            "rte", ("sentence1", "sentence2"), 2, ("accuracy",), ("entailment", "not_entailment"),
            hub=("nyu-mll/glue", "rte"),
            # Header: index, sentence1, sentence2, label.
            tsv=_glue_pair("RTE", "sentence1", "sentence2"),
        ),
        TaskSpec(
            "wnli", ("sentence1", "sentence2"), 2, ("accuracy",), ("not_entailment", "entailment"),
            hub=("nyu-mll/glue", "wnli"),
            # Header: index, sentence1, sentence2, label (0/1).
            tsv=_glue_pair("WNLI", "sentence1", "sentence2"),
        ),
    ]
}

# Accepted spellings on the command line -> table name.
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "sts": "stsb"}


@dataclass(frozen=True)
class Column:
    """One column of the results table: a task's metric on one evaluation split."""

    header: str
    task: str
    split: str
    metric: str


# The reference's table, in its order. These nine columns make the average; CoLA is apart.
TABLE_COLUMNS: tuple[Column, ...] = (
    Column("MRPC-F1", "mrpc", "validation", "f1"),
    Column("STS-B-Pearson", "stsb", "validation", "pearson"),
    Column("SST-2-Acc", "sst2", "validation", "accuracy"),
    Column("QQP-F1", "qqp", "validation", "f1"),
    Column("MNLI-m", "mnli", "validation_matched", "accuracy"),
    Column("MNLI-mm", "mnli", "validation_mismatched", "accuracy"),
    Column("QNLI-Acc", "qnli", "validation", "accuracy"),
    Column("WNLI-Acc", "wnli", "validation", "accuracy"),
    Column("RTE-Acc", "rte", "validation", "accuracy"),
)
COLA_COLUMN = Column("CoLA-MCC", "cola", "validation", "mcc")

# Published scores (dev sets, in percent) from the reference, for comparison in tables and plots.
REFERENCE_ROWS: dict[str, dict[str, float]] = {
    "RoBERTa-medium (reference)": {
        "MRPC-F1": 83.6, "STS-B-Pearson": 82.7, "SST-2-Acc": 89.7, "QQP-F1": 89.0, "MNLI-m": 79.7,
        "MNLI-mm": 80.1, "QNLI-Acc": 89.3, "WNLI-Acc": 31.0, "RTE-Acc": 57.4,
    },
    "BERT-medium (Google)": {
        "MRPC-F1": 86.3, "STS-B-Pearson": 87.7, "SST-2-Acc": 88.9, "QQP-F1": 89.4, "MNLI-m": 80.6,
        "MNLI-mm": 81.0, "QNLI-Acc": 89.2, "WNLI-Acc": 29.6, "RTE-Acc": 63.9,
    },
}


# How each published row was fine-tuned, shown in the tables' Protocol column.
REFERENCE_PROTOCOLS = {
    "RoBERTa-medium (reference)": "reference",
    "BERT-medium (Google)": "best of a sweep",  # lr 3e-4…3e-5 × batch 8…128, 4 epochs, best per task
}


def parse_tasks(spec: str) -> list[TaskSpec]:
    """'all' or a comma-separated list such as 'cola,sst2,mnli' -> task rows, in the given order."""
    if spec.strip().lower() == "all":
        return list(GLUE_TASKS.values())
    tasks = []
    for raw in spec.split(","):
        name = _ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if not name:
            continue
        if name not in GLUE_TASKS:
            raise UserError(f"unknown GLUE task {raw.strip()!r}; known: all, {', '.join(GLUE_TASKS)}")
        if GLUE_TASKS[name] not in tasks:
            tasks.append(GLUE_TASKS[name])
    if not tasks:
        raise UserError("no task given (use --tasks all or e.g. --tasks rte,mrpc)")
    return tasks


SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
"""A task's name is the file name of its results (OUT/<name>.json): no path separators, no leading dot."""


def check_task_name(name: str) -> None:
    """A task of your own needs a name that is a plain file name and not a GLUE task's (its results would
    show in GLUE's column, beside the reference's published scores)."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise UserError(f"name {name!r} is not a plain file name (it names the results file NAME.json): use "
                        "letters, digits, '-', '_' and '.', not starting with '.'")
    if name.lower() in GLUE_TASKS or name.lower() in _ALIASES:
        raise UserError(f"name {name!r} is a GLUE task's name: choose another name for a task of your own")


def custom_task(
    name: str,
    text_fields: tuple[str, ...] | list[str],
    num_labels: int,
    metrics: tuple[str, ...] | list[str] = ("accuracy",),
    label_names: tuple[str, ...] | list[str] = (),
    files: dict[str, str] | None = None,
    label_field: str = "label",
    hparams: dict[str, object] | None = None,
) -> TaskSpec:
    """A task of your own: e.g. custom_task("bbc", ["text"], 5) for 5-topic classification of dict examples
    {"text": ..., "label": 0..4}. `files` ({"train": ..., "validation": ...}) is only needed to read from disk."""
    check_task_name(name)
    return TaskSpec(
        name=name, text_fields=tuple(text_fields), num_labels=num_labels, metrics=tuple(metrics),
        label_names=tuple(label_names), files=dict(files or {}), label_field=label_field,
        hparams=dict(hparams or {}),
    )
