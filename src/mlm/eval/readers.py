"""Read a task's examples: the original GLUE TSV download, the Hugging Face hub, or CSV / TSV / JSONL files.

Every reader returns {split: [example, ...]} where an example is a dict holding the
task's text fields and "label" (int class id, or float for regression), so the rest
of the code never knows where the data came from.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mlm.errors import UserError
from mlm.hub import hub_host, hub_reachable, offline_by_choice
from mlm.eval.tasks import TaskSpec, custom_task

# GLUE sentences hold quotes and very long fields; read them raw, as the GLUE scripts do.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def parse_label(task: TaskSpec, raw: object, where: str) -> int | float:
    """A label from a file (a class name, an id, or a score) -> int class id or float score."""
    if task.is_regression:
        try:
            score = float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise UserError(f"{where}: label {raw!r} is not a number (task {task.name} is a regression)") from None
        # float() takes "nan" and "inf": one such score makes the loss and Pearson NaN, with nothing said.
        if not math.isfinite(score):
            raise UserError(f"{where}: label {raw!r} is not a finite number (task {task.name} is a regression): "
                            "fix or remove the row")
        return score
    if isinstance(raw, str):
        text = raw.strip()
        if text in task.label_names:
            return task.label_names.index(text)
        try:
            raw = int(text)
        except ValueError:
            names = f" or one of {', '.join(task.label_names)}" if task.label_names else ""
            raise UserError(f"{where}: label {text!r} is not a class id 0..{task.num_labels - 1}{names}") from None
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < task.num_labels:
        raise UserError(f"{where}: label {raw!r} is not a class id 0..{task.num_labels - 1}")
    return raw


@contextmanager
def _utf8_only(path: Path) -> Iterator[None]:
    """Task files are read as UTF-8; another encoding is named instead of guessed (a guess changes the text)."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} cannot be decoded): "
                        "save it as UTF-8, e.g. iconv -f latin1 -t utf-8 FILE > NEW") from None


# ---- the original GLUE download ------------------------------------------------------------


def read_glue_tsv(task: TaskSpec, glue_dir: str | Path, split: str) -> list[dict]:
    """One split of a GLUE task from the original download layout, e.g. GLUE_DIR/MRPC/dev.tsv."""
    layout = task.tsv
    if layout is None or split not in layout.files:
        raise UserError(f"task {task.name} has no {split} split in the GLUE layout")
    path = Path(glue_dir) / layout.folder / layout.files[split]
    if not path.is_file():
        raise UserError(f"missing GLUE file {path} (expected the original GLUE layout under {glue_dir})")

    examples = []
    skipped = 0
    # utf-8-sig: the MRPC files start with a byte-order mark before "Quality".
    with _utf8_only(path), open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if layout.header:
            header = next(rows, None)
            if header is None:
                raise UserError(f"{path} is empty (expected a header line)")
            missing = [c for c in layout.columns.values() if c not in header]
            if missing:
                raise UserError(f"{path}: header lacks column(s) {missing}; found {header}")
            index = {field: header.index(col) for field, col in layout.columns.items()}  # type: ignore[arg-type]
        else:
            index = dict(layout.columns)  # type: ignore[arg-type]
        width = max(index.values()) + 1
        for row in rows:
            where = f"{path}:{rows.line_num}"
            if not row:
                continue
            if len(row) < width or row[index["label"]] == "":
                if layout.skip_short_rows:
                    skipped += 1
                    continue
                if len(row) < width:
                    raise UserError(f"{where}: {len(row)} columns, expected at least {width} (malformed {layout.folder} file?)")
                raise UserError(f"{where}: empty label")
            example = {field: row[i] for field, i in index.items() if field != "label"}
            example["label"] = parse_label(task, row[index["label"]], where)
            examples.append(example)
    if skipped:
        print(f"{path}: skipped {skipped} incomplete rows")
    if not examples:
        raise UserError(f"{path} holds no examples")
    return examples


# ---- the Hugging Face hub -------------------------------------------------------------------


def read_hub(task: TaskSpec, splits: list[str]) -> dict[str, list[dict]]:
    """Splits of a task from the hub dataset (e.g. nyu-mll/glue, config "mnli") through `datasets`."""
    if task.hub is None:
        raise UserError(f"task {task.name} has no hub dataset; give its files")
    import datasets  # imported here: slow to import, and not needed for local data

    path, config = task.hub
    if not offline_by_choice() and not hub_reachable():  # else ~25 s of retries per file before the same answer
        raise UserError(f"could not load {path}/{config}: the hub ({hub_host()}) cannot be reached; for offline use "
                        "pass --glue-dir with the original GLUE download (or HF_DATASETS_OFFLINE=1 for a cached copy)")
    try:
        dataset = datasets.load_dataset(path, config)
    except Exception as e:  # no network, unknown dataset...: one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(
            f"could not load {path}/{config} from the hub ({type(e).__name__}: {first}); "
            "for offline use pass --glue-dir with the original GLUE download"
        ) from None
    return hub_examples(task, dataset, splits, f"{path}/{config}")


def hub_examples(task: TaskSpec, dataset, splits: list[str], where: str = "dataset") -> dict[str, list[dict]]:
    """A `datasets.DatasetDict` -> {split: [example, ...]} (hub labels are already ids in the table's order)."""
    out = {}
    for split in splits:
        if split not in dataset:
            raise UserError(f"{where} has no split {split!r} (has {list(dataset)})")
        missing = [c for c in (*task.text_fields, "label") if c not in dataset[split].column_names]
        if missing:
            raise UserError(f"{where} split {split} lacks column(s) {missing}")
        columns = dataset[split].select_columns([*task.text_fields, "label"]).to_dict()
        out[split] = [
            {**{f: columns[f][i] for f in task.text_fields}, "label": columns["label"][i]}
            for i in range(len(columns["label"]))
        ]
    return out


# ---- files of your own ----------------------------------------------------------------------


def read_table_file(task: TaskSpec, path: str | Path) -> list[dict]:
    """A custom task's split from a .csv / .tsv (with a header) or a .jsonl file (one object per line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing data file {path}")
    needed = [*task.text_fields, task.label_field]
    if path.suffix.lower() in (".jsonl", ".json"):
        records = []
        with _utf8_only(path), open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append((f"{path}:{n}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    elif path.suffix.lower() in (".csv", ".tsv"):
        with _utf8_only(path), open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            missing = [c for c in needed if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{path}: header lacks column(s) {missing}; found {reader.fieldnames}")
            records = [(f"{path}:{reader.line_num}", row) for row in reader]
    else:
        raise UserError(f"{path}: unknown file type (use .csv, .tsv or .jsonl)")

    examples = []
    for where, record in records:
        if not isinstance(record, dict) or any(record.get(c) is None for c in needed):
            raise UserError(f"{where}: needs fields {needed}")
        for f in task.text_fields:  # a JSON number or list would be fine-tuned on as "5" or "['a', 'b']"
            if not isinstance(record[f], str):
                raise UserError(f"{where}: field {f!r} must be text (a JSON string), got {json.dumps(record[f])[:40]}")
        example = {f: record[f] for f in task.text_fields}
        example["label"] = parse_label(task, record[task.label_field], where)
        examples.append(example)
    if not examples:
        raise UserError(f"{path} holds no examples")
    return examples


def task_from_file(path: str | Path) -> TaskSpec:
    """A custom task described by a small TOML or JSON file; data paths are relative to that file.

        name = "topics"
        text_fields = ["text"]            # one or two columns
        label_field = "label"             # default "label"
        num_labels = 5                    # or label_names = [...]; 1 means regression
        metrics = ["accuracy", "macro_f1"]
        train = "train.csv"               # .csv, .tsv or .jsonl
        validation = "dev.jsonl"
        [hparams]                         # optional FinetuneConfig overrides
        epochs = 5
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing task file {path}")
    try:
        if path.suffix.lower() == ".json":
            spec = json.loads(path.read_text(encoding="utf-8"))
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            spec = tomllib.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise UserError(f"{path}: cannot parse task file ({e})") from None

    known = {"name", "text_fields", "label_field", "num_labels", "label_names", "metrics", "train", "validation", "hparams"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
    for key in ("name", "text_fields", "train", "validation"):
        if key not in spec:
            raise UserError(f"{path}: missing key {key!r}")
    for key in ("text_fields", "label_names", "metrics"):  # a bare string would be taken letter by letter
        if key in spec and not (isinstance(spec[key], list) and all(isinstance(v, str) for v in spec[key])):
            raise UserError(f"{path}: {key} must be a list of strings, e.g. [\"a\", \"b\"], got {spec[key]!r}")
    label_names = tuple(spec.get("label_names", ()))
    if "num_labels" not in spec and not label_names:
        raise UserError(f"{path}: give num_labels (1 for regression) or label_names")
    if "num_labels" in spec and not (type(spec["num_labels"]) is int and spec["num_labels"] >= 1):
        raise UserError(f"{path}: num_labels must be a whole number >= 1 (1 for regression), got {spec['num_labels']!r}")
    for key in ("name", "label_field", "train", "validation"):
        if key in spec and not (isinstance(spec[key], str) and spec[key]):
            raise UserError(f"{path}: {key} must be a non-empty string, got {spec[key]!r}")
    if not isinstance(spec.get("hparams", {}), dict):
        raise UserError(f"{path}: hparams must be a table of settings ([hparams] in TOML), got {spec['hparams']!r}")
    try:
        return custom_task(
            name=str(spec["name"]),
            text_fields=tuple(spec["text_fields"]),
            num_labels=int(spec.get("num_labels", len(label_names))),
            metrics=tuple(spec.get("metrics", ("accuracy",))),
            label_names=label_names,
            files={"train": str(path.parent / spec["train"]), "validation": str(path.parent / spec["validation"])},
            label_field=str(spec.get("label_field", "label")),
            hparams=dict(spec.get("hparams", {})),
        )
    except UserError as e:  # the task's own checks (name, metrics, label names): say which file
        raise UserError(f"{path}: {e}") from None


# ---- one entry point --------------------------------------------------------------------------


def load_task_data(task: TaskSpec, glue_dir: str | Path | None = None) -> dict[str, list[dict]]:
    """{"train": [...], <each eval split>: [...]} from the task's files, a GLUE directory, or the hub."""
    splits = ["train", *task.eval_splits]
    if task.files:
        missing = [s for s in splits if s not in task.files]
        if missing:
            raise UserError(f"task {task.name}: no file for split(s) {missing}")
        return {s: read_table_file(task, task.files[s]) for s in splits}
    if glue_dir is not None:
        if not Path(glue_dir).is_dir():
            raise UserError(f"GLUE directory {glue_dir} does not exist")
        return {s: read_glue_tsv(task, glue_dir, s) for s in splits}
    return read_hub(task, splits)
