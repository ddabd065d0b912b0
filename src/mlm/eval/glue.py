"""GLUE orchestration: checkpoints × tasks × seeds → per-task JSON → results table (markdown, CSV) → curve.

Output of one model (`evaluate_model`, `mlm glue --model CKPT --out DIR`):
    DIR/<task>.json     every seed's scores, the median, and the recipe that made them
    DIR/results.md      one row: Model, Step, Protocol, the reference's nine columns, Avg, then CoLA-MCC and
                        every other metric (MRPC-Acc, STS-B-Spearman, each metric of a task of your own)
    DIR/results.csv
A pretraining run (`evaluate_run`, `mlm glue --run RUN_DIR`) keeps one such DIR per checkpoint,
RUN_DIR/glue/checkpoint-<step>/, and writes the table over steps and glue_curve.png in RUN_DIR/glue/.
Saved seeds are reused when their recipe matches, so interrupted or earlier evaluations are not repeated.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import re
import time
from contextlib import contextmanager
from pathlib import Path

from mlm.atomic import write_file
from mlm.errors import UserError
from mlm.eval.finetune import (PROTOCOLS, FinetuneConfig, encode, finetune_encoded, load_config, load_tokenizer,
                               protocol_name, subsample, usable_max_length, uses_token_types)
from mlm.eval.plot import plot_curve
from mlm.eval.readers import load_task_data, task_from_file
from mlm.eval.tasks import COLA_COLUMN, REFERENCE_PROTOCOLS, REFERENCE_ROWS, TABLE_COLUMNS, Column, TaskSpec, parse_tasks

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
RESULTS_SUBDIR = "glue"
"""Sub-folder of a run directory holding GLUE results: RUN_DIR/glue/checkpoint-<step>/."""


# ---- small helpers ----------------------------------------------------------------------------


SMALL_HIDDEN = 256  # models this narrow or narrower usually need a larger fine-tuning lr than 2e-5


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, text)


@contextmanager
def results_folder(out_dir: Path):
    """Make the results folder (and missing parents) for the block inside; if the block fails, remove again
    those this call made and that are still empty, so a mistake (a bad file, a wrong path) leaves nothing
    behind. A folder that was there before is never removed, nor one holding anything."""
    made = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # deepest first
    try:
        check_writable(out_dir)
        yield
    except BaseException:
        for folder in made:
            try:
                folder.rmdir()  # only ever removes an empty folder
            except OSError:
                break  # not empty (results of tasks that succeeded) or gone: keep it and those above
        raise


def check_writable(out_dir: Path) -> None:
    """Fail before hours of fine-tuning, not after them, when the results folder cannot be written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        write_file(probe, "")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write results to {out_dir} ({e.strerror or e}): choose another --out") from None


def describe_model(model_path: str) -> tuple[str, int | None]:
    """(name, step): a run's checkpoint-<step> folder gives (run name, step); other folders their name; hub ids themselves."""
    path = Path(model_path)
    if path.is_dir():
        path = path.resolve()
        match = CHECKPOINT_RE.fullmatch(path.name)
        if match:
            return path.parent.name, int(match.group(1))
        return path.name, None
    return model_path, None


def checkpoint_results_dir(run_dir: str | Path, step: int) -> Path:
    """Where the results of a run's checkpoint-<step> go (and where `--run` looks for them)."""
    return Path(run_dir) / RESULTS_SUBDIR / f"checkpoint-{step}"


def default_out_dir(model_path: str) -> Path:
    """A run's checkpoint -> RUN_DIR/glue/checkpoint-<step>; anything else -> ./glue_results/<name>."""
    path = Path(model_path)
    if path.is_dir():
        match = CHECKPOINT_RE.fullmatch(path.resolve().name)
        if match:
            return checkpoint_results_dir(path.resolve().parent, int(match.group(1)))
    return Path("glue_results") / re.sub(r"[^A-Za-z0-9._-]+", "_", describe_model(model_path)[0])


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
"""The files of a Hugging Face checkpoint's weights (one file, or an index of shards)."""


def has_model_files(folder: Path) -> bool:
    """Whether a folder holds a Hugging Face model itself: its config.json and weights."""
    return (folder / "config.json").is_file() and any((folder / name).is_file() for name in WEIGHT_FILES)


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """[(step, folder)] of a run's checkpoint-<step> folders, by step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    found = []
    for p in run_dir.iterdir():
        match = CHECKPOINT_RE.fullmatch(p.name)
        if match and p.is_dir():
            found.append((int(match.group(1)), p))
    return sorted(found)


def parse_steps(spec: str | None) -> list[int] | None:
    """'1000,2000' -> [1000, 2000]; None (no --steps) -> None (all). An empty --steps is refused: it is more
    likely an unset shell variable than a wish for every step."""
    if spec is None:
        return None
    try:
        steps = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise UserError(f"--steps wants comma-separated integers, got {spec!r}") from None
    if not steps:
        raise UserError("--steps is empty: give comma-separated steps (e.g. 1000,2000), or leave it out for all")
    return steps


def parse_overrides(items: list[str], tasks: list[str] | None = None) -> dict[str, dict[str, object]]:
    """["lr=3e-5", "rte.epochs=10"] -> {"*": {"lr": 3e-5}, "rte": {"epochs": 10}} (values typed by FinetuneConfig).
    With `tasks` (the names of the tasks run), a setting for another task is refused: it would be ignored."""
    types = {f.name: f.type for f in dataclasses.fields(FinetuneConfig)}
    out: dict[str, dict[str, object]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        task, _, name = key.strip().rpartition(".")
        if not sep or name not in types:
            raise UserError(f"bad override {item!r}: want [TASK.]FIELD=VALUE with FIELD one of {', '.join(types)}")
        if tasks is not None and task and task not in tasks:
            raise UserError(f"--set {item}: task {task!r} is not among the tasks run ({', '.join(tasks)}): "
                            "correct the name or add the task to --tasks")
        out.setdefault(task or "*", {})[name] = _coerce(name, str(types[name]), value.strip())
    return out


def _coerce(name: str, type_name: str, value: str) -> object:
    try:
        if "None" in type_name and value.lower() in ("none", "null", ""):
            return None
        if type_name.startswith("tuple"):
            return tuple(float(v) for v in value.split(","))
        if type_name.startswith("bool"):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if type_name.startswith("int"):
            return int(value)
        if type_name.startswith("float"):
            return float(value)
        return value
    except ValueError:
        raise UserError(f"override {name}={value!r}: not a valid {type_name}") from None


def task_config(task: TaskSpec, base: FinetuneConfig, overrides: dict[str, dict[str, object]]) -> FinetuneConfig:
    """Settings for one task: base, then the task row's hparams, then overrides for all tasks ("*"), then for this task."""
    merged = {**task.hparams, **overrides.get("*", {}), **overrides.get(task.name, {})}
    unknown = set(merged) - {f.name for f in dataclasses.fields(FinetuneConfig)}
    if unknown:
        raise UserError(f"task {task.name}: unknown fine-tuning setting(s) {sorted(unknown)}")
    return dataclasses.replace(base, **merged)


def _tokenizer_fingerprint(tokenizer, model_path: str) -> str:
    """Checkpoints of one run share a tokenizer: the same fingerprint lets them share the tokenized tasks."""
    try:
        text = tokenizer.backend_tokenizer.to_str()
    except AttributeError:  # a slow tokenizer: no cheap fingerprint, do not share
        text = str(Path(model_path).resolve())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- one model --------------------------------------------------------------------------------


def prepare_task(model_path: str, task: TaskSpec, cfg: FinetuneConfig, glue_dir: str | None, cache: dict):
    """(model config, tokenized train split, {eval split: tokenized}, the max length used: the requested one
    capped by the model's positions). Raw data is read once per task and
    tokenized once per (tokenizer, task, length): seeds and the checkpoints of a run share it through `cache`."""
    tokenizer = load_tokenizer(model_path)
    config = load_config(model_path, task)
    max_length = usable_max_length(config, tokenizer, cfg.max_length)
    if max_length < cfg.max_length:
        print(f"{task.name}: max_length {cfg.max_length} capped to {max_length} (the model's limit)")
    data_key = ("data", task.name, glue_dir, tuple(sorted(task.files.items())))
    if data_key not in cache:
        cache[data_key] = load_task_data(task, glue_dir)
    data = cache[data_key]
    token_types = uses_token_types(config)
    enc_key = ("encoded", _tokenizer_fingerprint(tokenizer, model_path), data_key, max_length, token_types,
               cfg.max_train_samples, cfg.max_eval_samples)
    if enc_key not in cache:
        t0 = time.time()
        cache[enc_key] = (
            encode(task, subsample(data["train"], cfg.max_train_samples), tokenizer, max_length, token_types),
            {s: encode(task, subsample(data[s], cfg.max_eval_samples), tokenizer, max_length, token_types)
             for s in task.eval_splits},
        )
        print(f"{task.name}: tokenized in {time.time() - t0:.1f}s")
    train, evals = cache[enc_key]
    return config, train, evals, max_length


def evaluate_task(
    model_path: str, task: TaskSpec, cfg: FinetuneConfig, seeds: list[int], out_dir: Path,
    glue_dir: str | None = None, name: str | None = None, step: int | None = None,
    cache: dict | None = None, force: bool = False, progress: bool = True,
) -> dict:
    """Fine-tune and score one task for each seed not saved yet; writes OUT/<task>.json after every seed
    (so an interrupted evaluation resumes) and returns its content, with the median seed's scores."""
    path = out_dir / f"{task.name}.json"
    recipe = cfg.recipe()
    saved = {} if force else _load_saved(path, recipe)
    done = {r["seed"]: r for r in saved.get("per_seed", [])}
    local = Path(model_path).is_dir()
    result = {
        "model": name, "model_path": str(Path(model_path).resolve()) if local else model_path,
        "step": step, "task": task.name, "seeds": seeds, "recipe": recipe, "protocol": protocol_name(recipe, seeds),
        "custom_because": custom_because(recipe, seeds),
        "data": glue_dir or ("files" if task.files else "hub"),
        "train_examples": saved.get("train_examples"), "eval_examples": saved.get("eval_examples"),
        "per_seed": [done[s] for s in seeds if s in done], "complete": False,
    }
    todo = [s for s in seeds if s not in done]
    if result["custom_because"]:
        print(f"{task.name}: protocol custom: {result['custom_because']}")
    if todo:
        config, train, evals, max_length = prepare_task(model_path, task, cfg, glue_dir, {} if cache is None else cache)
        result["max_length_used"] = max_length  # the recipe keeps the requested one, which decides reuse
        if getattr(config, "hidden_size", 1024) <= SMALL_HIDDEN and cfg.lr <= 2e-5:
            print(f"{task.name}: note: lr {cfg.lr:g} (the reference's, for 512-wide models) often leaves a "
                  f"{config.hidden_size}-wide model at chance: try --lr 1e-4 or more")
        result["train_examples"] = len(train)
        result["eval_examples"] = {s: len(e) for s, e in evals.items()}
        for seed in todo:
            t0 = time.time()
            scores = finetune_encoded(model_path, task, config, train, evals, cfg, seed, progress=progress)
            result["per_seed"] = sorted([*result["per_seed"], {"seed": seed, "scores": scores,
                                                               "seconds": round(time.time() - t0, 1)}],
                                        key=lambda r: r["seed"])
            print(f"{name} step {step} | {task.name} seed {seed}: {_fmt(scores)} ({time.time() - t0:.0f}s)")
            write_atomic(path, json.dumps(result, indent=2))
    reported = median_seed(result["per_seed"])
    result["reported_seed"], result["scores"] = reported["seed"], reported["scores"]
    result["complete"] = True
    write_atomic(path, json.dumps(result, indent=2))
    return result


def custom_because(recipe: dict, seeds: list[int]) -> str | None:
    """Why results of this recipe and these seeds are "custom": the settings that differ from the nearest
    protocol ("epochs 5 (reference: 3)"), or None for a protocol's own."""
    if protocol_name(recipe, seeds) != "custom":
        return None
    differences = {}
    for name, (cfg, protocol_seeds) in PROTOCOLS.items():
        theirs = {**cfg.recipe(), "seeds": protocol_seeds}
        ours = {**recipe, "seeds": list(seeds)}
        differences[name] = [f"{k} {ours.get(k)!r} ({name}: {v!r})" for k, v in theirs.items() if ours.get(k) != v]
    nearest = min(differences, key=lambda name: len(differences[name]))  # the order of PROTOCOLS breaks ties
    return ", ".join(differences[nearest])


def _load_saved(path: Path, recipe: dict) -> dict:
    """Earlier results in `path` if made with the same recipe; results of other settings are never silently
    replaced (another --out keeps both, --force replaces them)."""
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    if saved.get("recipe") != recipe:
        theirs = saved.get("recipe") or {}
        differ = [f"{k} {theirs.get(k)!r} vs {v!r}" for k, v in recipe.items() if theirs.get(k) != v]
        raise UserError(
            f"{path} holds results made with other settings ({'; '.join(differ) or 'unknown'}, saved vs now): "
            "give another --out to keep both, or --force to replace them"
        )
    return saved


def median_seed(per_seed: list[dict]) -> dict:
    """The seed whose headline (the task's first metric on its first split) is the median over seeds (the
    lower middle one of an even count). All its metrics are reported together, so MRPC's F1 and accuracy
    come from one fine-tuning run (fine-tuning small tasks is noisy)."""
    def headline(r: dict) -> float:
        split_scores = next(iter(r["scores"].values()))
        return next(iter(split_scores.values()))

    ranked = sorted(per_seed, key=lambda r: (headline(r), r["seed"]))
    return ranked[(len(ranked) - 1) // 2]


def _fmt(scores: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{split} {m} {v:.4f}" for split, ms in scores.items() for m, v in ms.items())


def evaluate_model(
    model_path: str,
    tasks: list[TaskSpec],
    out_dir: str | Path | None = None,
    glue_dir: str | None = None,
    seeds: int | list[int] = 3,
    base: FinetuneConfig | None = None,
    overrides: dict[str, dict[str, object]] | None = None,
    name: str | None = None,
    cache: dict | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Fine-tune and score one checkpoint on each task; writes OUT/<task>.json and OUT/results.{md,csv}.
    Returns the results-table row ({"Model", "Step", column header: percent, ...})."""
    if not tasks:
        raise UserError("no task to evaluate")
    if any(t.name == "results" for t in tasks):
        raise UserError("a task may not be called 'results' (the name of the table files)")
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seeds:
        raise UserError("at least one seed is needed")
    model_name, step = describe_model(model_path)
    name = name or model_name
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(model_path)
    base = base or FinetuneConfig()
    overrides = overrides or {}
    with results_folder(out_dir):
        for task in tasks:
            cfg = task_config(task, base, overrides)
            evaluate_task(model_path, task, cfg, seeds, out_dir, glue_dir, name, step, cache, force, progress)
    # The table shows every task scored in this folder, including those of earlier calls.
    row = add_average([table_row(gather_task_results(out_dir), name, step)])[0]
    write_tables([row], out_dir)
    print(f"results in {out_dir}\n" + markdown_table([row]))
    return row


# ---- tables -----------------------------------------------------------------------------------


def gather_task_results(out_dir: Path) -> list[dict]:
    """Every complete <task>.json in a results folder."""
    found = []
    for path in sorted(Path(out_dir).glob("*.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            print(f"skipping unreadable {path}")
            continue
        if isinstance(result, dict) and result.get("complete") and "task" in result:
            found.append(result)
    return found


def _extra_columns(results: list[dict]) -> list[Column]:
    """A column for every metric the reference table does not show: MRPC's accuracy, STS-B's Spearman, each
    metric of a task of your own ("<task>-<metric>", with the split when a task has several)."""
    fixed = {(c.task, c.split, c.metric) for c in (*TABLE_COLUMNS, COLA_COLUMN)}
    cols = []
    for r in results:
        scores = r.get("scores") or {}
        for split, metrics in scores.items():
            for metric in metrics:
                if (r["task"], split, metric) not in fixed:
                    name, shown = GLUE_NAMES.get(r["task"], r["task"]), GLUE_METRIC_NAMES.get(metric, metric)
                    if r["task"] not in GLUE_NAMES:
                        shown = metric  # a task of your own: its metrics as its file names them
                    header = f"{name}-{split}-{shown}" if len(scores) > 1 else f"{name}-{shown}"
                    cols.append(Column(header, r["task"], split, metric))
    return cols


# How the results table spells GLUE tasks and metrics (as the reference's columns do: MRPC-F1, SST-2-Acc).
GLUE_NAMES = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "qqp": "QQP", "mnli": "MNLI",
              "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}
GLUE_METRIC_NAMES = {"accuracy": "Acc", "f1": "F1", "pearson": "Pearson", "spearman": "Spearman", "mcc": "MCC"}


def table_row(results: list[dict], name: str | None = None, step: int | None = None) -> dict:
    """Per-task results of one model -> {"Model", "Step", <header>: score in percent or None}."""
    by_task = {r["task"]: r for r in results}
    first = results[0] if results else {}
    row: dict = {"Model": name or first.get("model"), "Step": step if step is not None else first.get("step"),
                 "Protocol": "/".join(sorted({r.get("protocol", "custom") for r in results})) or None}
    for col in (*TABLE_COLUMNS, COLA_COLUMN, *_extra_columns(results)):
        value = by_task.get(col.task, {}).get("scores", {}).get(col.split, {}).get(col.metric)
        row[col.header] = None if value is None else 100 * value
    return row


def add_average(rows: list[dict]) -> list[dict]:
    """Set each row's "Avg": the mean over the reference columns present in the table (CoLA and tasks of
    your own apart). A row missing one of them gets None, so every plotted average means the same thing."""
    shown = [c.header for c in TABLE_COLUMNS if any(r.get(c.header) is not None for r in rows)]
    for r in rows:
        values = [r.get(h) for h in shown]
        r["Avg"] = sum(values) / len(values) if shown and None not in values else None
    return rows


def _headers(rows: list[dict]) -> list[str]:
    """Model, Step, Protocol, the reference's columns present, Avg, then CoLA and custom columns present."""
    def has(h):
        return any(r.get(h) is not None for r in rows)

    reference = [c.header for c in TABLE_COLUMNS]
    main = [h for h in reference if has(h)]
    extra = [h for r in rows for h in r if h not in ("Model", "Step", "Protocol", "Avg", *reference) and has(h)]
    return ["Model", "Step", "Protocol", *main, *(["Avg"] if main else []), *dict.fromkeys(extra)]


def markdown_table(rows: list[dict], with_reference: bool = True) -> str:
    """The results as a markdown table; published reference rows (averaged over the same columns) below."""
    headers = _headers(rows)
    shown = [h for h in headers if h in {c.header for c in TABLE_COLUMNS}]

    def cell(v):
        return "–" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(h)) for h in headers) + " |")
    if with_reference and shown:
        for ref_name, ref in REFERENCE_ROWS.items():
            ref_row = {"Model": ref_name, "Protocol": REFERENCE_PROTOCOLS[ref_name], **ref,
                       "Avg": sum(ref[h] for h in shown) / len(shown)}
            lines.append("| " + " | ".join(cell(ref_row.get(h)) for h in headers) + " |")
    note = ""
    if 0 < len(shown) < len(TABLE_COLUMNS):
        note = f"\nAvg is over the {len(shown)} of {len(TABLE_COLUMNS)} reference columns shown (reference rows too)."
    return "\n".join(lines) + "\n" + note + ("\n" if note else "")


def csv_table(rows: list[dict]) -> str:
    headers = _headers(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(headers)
    for r in rows:
        writer.writerow(["" if r.get(h) is None else (round(r[h], 2) if isinstance(r[h], float) else r[h]) for h in headers])
    return buf.getvalue()


def write_tables(rows: list[dict], out_dir: Path) -> None:
    write_atomic(Path(out_dir) / "results.md", markdown_table(rows))
    write_atomic(Path(out_dir) / "results.csv", csv_table(rows))


# ---- a pretraining run ------------------------------------------------------------------------


def evaluate_run(
    run_dir: str | Path,
    tasks: list[TaskSpec],
    steps: list[int] | None = None,
    out_dir: str | Path | None = None,
    gather_only: bool = False,
    name: str | None = None,
    **kwargs,
) -> list[dict]:
    """Score each checkpoint-<step> of a run (or those in `steps`), then write the table over steps
    (results.md / results.csv) and glue_curve.png into RUN_DIR/glue (or out_dir). Results already in
    RUN_DIR/glue/checkpoint-<step>/ with the same recipe are reused; gather_only computes nothing.
    kwargs go to `evaluate_model` (glue_dir, seeds, base, overrides, force, progress)."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / RESULTS_SUBDIR
    name = name or run_dir.resolve().name
    checkpoints = list_checkpoints(run_dir)
    if steps is not None:
        have = {s for s, _ in checkpoints}
        missing = [s for s in steps if s not in have]
        if missing and not gather_only:
            raise UserError(f"no checkpoint-{missing[0]} in {run_dir} (steps there: {sorted(have) or 'none'})")
        checkpoints = [(s, p) for s, p in checkpoints if s in steps]
    if not gather_only:
        if not checkpoints:
            raise UserError(f"no checkpoint-<step> folders in {run_dir}")
        cache: dict = {}  # tokenized tasks, shared by all checkpoints of the run
        with results_folder(out):
            for step, path in checkpoints:
                print(f"== {name} checkpoint-{step}")
                evaluate_model(str(path), tasks, out / f"checkpoint-{step}", name=name, cache=cache, **kwargs)

    # Gather every checkpoint's results for the tasks asked, including those of checkpoints since deleted.
    wanted = {t.name for t in tasks}
    rows = []
    for sub in sorted(out.glob("checkpoint-*")) if out.is_dir() else []:
        match = CHECKPOINT_RE.fullmatch(sub.name)
        if match and sub.is_dir() and (steps is None or int(match.group(1)) in steps):
            results = [r for r in gather_task_results(sub) if r["task"] in wanted]
            if results:
                rows.append(table_row(results, name=name, step=int(match.group(1))))
    if not rows:
        raise UserError(f"no GLUE results under {out}")
    rows = add_average(sorted(rows, key=lambda r: r["Step"]))
    write_tables(rows, out)
    plot_curve(rows, out / "glue_curve.png", title=f"GLUE over pretraining: {name}")
    print(f"results in {out} (results.md, results.csv, glue_curve.png)\n" + markdown_table(rows))
    return rows


# ---- the command --------------------------------------------------------------------------------


def glue_command(
    model: str | None = None,
    run: str | None = None,
    steps: str | None = None,
    tasks: str | None = None,
    task_files: list[str] | None = None,
    glue_dir: str | None = None,
    out: str | None = None,
    seeds: int | None = None,
    name: str | None = None,
    protocol: str = "fast",
    lr: float | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    max_length: int | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    settings: list[str] | None = None,
    force: bool = False,
    gather_only: bool = False,
    progress: bool = True,
) -> list[dict]:
    """`mlm glue`: turn command-line values into tasks and settings, then evaluate a model or a run."""
    if (model is None) == (run is None):
        raise UserError("give exactly one of --model PATH or --run RUN_DIR")
    if model is not None and (steps is not None or gather_only):
        raise UserError("--steps and --gather-only go with --run")
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol: unknown protocol {protocol!r} (choose {', '.join(PROTOCOLS)})")
    base, protocol_seeds = PROTOCOLS[protocol]
    if seeds is not None and seeds < 1:
        raise UserError("--seeds must be >= 1")
    # N seeds count on from the protocol's first (0 or 42); another count than the protocol's makes the
    # results "custom" in the tables.
    seed_list = protocol_seeds if seeds is None else list(range(protocol_seeds[0], protocol_seeds[0] + seeds))
    if tasks is not None and not tasks.strip(" ,"):
        raise UserError("--tasks is empty: give task names (e.g. rte,mrpc) or all")
    # GLUE tasks (all by default, none by default when tasks of your own are given), then your own.
    task_list = parse_tasks(tasks or "all") if tasks or not task_files else []
    task_list += [task_from_file(f) for f in task_files or []]
    names = [t.name for t in task_list]
    twice = [n for i, n in enumerate(names) if n in names[:i]]
    if twice:  # one results file <name>.json for two tasks: the second would reuse the first's scores
        raise UserError(f"two task files are named {twice[0]!r}: give each task its own name")
    overrides = parse_overrides(settings or [], names)
    flags = {"lr": lr, "epochs": epochs, "batch_size": batch_size, "max_length": max_length,
             "max_train_samples": max_train_samples, "max_eval_samples": max_eval_samples,
             "device": device, "dtype": dtype}
    overrides["*"] = {**{k: v for k, v in flags.items() if v is not None}, **overrides.get("*", {})}
    for t in task_list:
        task_config(t, base, overrides)  # bad values fail now, not after hours of other tasks
    common = dict(glue_dir=glue_dir, seeds=seed_list, base=base, overrides=overrides, force=force, progress=progress)
    if model is not None and Path(model).is_dir() and not has_model_files(Path(model)):
        # A run folder has checkpoint-<step> folders and a config.json of its own (the pretraining recipe,
        # not a model's), but no weights.
        found = list_checkpoints(model)
        if found:
            raise UserError(
                f"--model {model} is a pretraining run folder, not a checkpoint: use --run {model} to score its "
                f"checkpoints, or --model {found[-1][1]} for the newest one"
            )
        if not (Path(model) / "config.json").is_file():
            raise UserError(f"--model {model} is not a Hugging Face checkpoint (no config.json)")
    if model is not None:
        return [evaluate_model(model, task_list, out, name=name, **common)]
    return evaluate_run(run, task_list, parse_steps(steps), out, gather_only=gather_only, name=name, **common)
