"""`mlm glue` end to end on tiny checkpoints and a tiny GLUE directory: JSON, tables, curve, reuse, errors."""

import csv
import json
import shutil

import pytest
import torch
from glue_fixtures import make_checkpoint, write_glue_dir, write_tsv

from mlm.cli import main
from mlm.eval.finetune import FinetuneConfig
from mlm.eval.glue import evaluate_model, parse_overrides, task_config
from mlm.eval.tasks import GLUE_TASKS, parse_tasks

QUICK = ["--seeds", "2", "--lr", "1e-3", "--max-length", "48", "--no-progress"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue_run")
    write_glue_dir(root / "GLUE", n_train=32, n_dev=12)
    make_checkpoint(root / "run" / "checkpoint-100")
    for step in (200, 300):  # later checkpoints share the tokenizer (as in a real run)
        shutil.copytree(root / "run" / "checkpoint-100", root / "run" / f"checkpoint-{step}")
    return root


def test_model_writes_task_json_and_tables(workspace):
    out = workspace / "out_model"
    main(["glue", "--model", str(workspace / "run" / "checkpoint-100"), "--glue-dir", str(workspace / "GLUE"),
          "--tasks", "rte,mnli,cola", "--out", str(out), *QUICK])
    mnli = json.loads((out / "mnli.json").read_text())
    assert mnli["complete"] and mnli["model"] == "run" and mnli["step"] == 100 and mnli["seeds"] == [0, 1]
    assert [r["seed"] for r in mnli["per_seed"]] == [0, 1]
    assert set(mnli["scores"]) == {"validation_matched", "validation_mismatched"}
    assert mnli["recipe"]["lr"] == 1e-3 and mnli["recipe"]["max_length"] == 48
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["Model"] for r in rows] == ["run"] and rows[0]["Step"] == "100"
    # CoLA apart, then every metric the reference columns leave out
    assert list(rows[0]) == ["Model", "Step", "Protocol", "MNLI-m", "MNLI-mm", "RTE-Acc", "Avg", "CoLA-MCC", "CoLA-Acc"]
    assert rows[0]["Protocol"] == "custom" and mnli["protocol"] == "custom"  # --lr and --max-length changed it
    assert mnli["custom_because"] == "lr 0.001 (fast: 2e-05), max_length 48 (fast: 512), seeds [0, 1] (fast: [0, 1, 2])"
    avg = (float(rows[0]["MNLI-m"]) + float(rows[0]["MNLI-mm"]) + float(rows[0]["RTE-Acc"])) / 3
    assert float(rows[0]["Avg"]) == pytest.approx(avg, abs=0.01)
    md = (out / "results.md").read_text()
    assert "| Model | Step | Protocol | MNLI-m | MNLI-mm | RTE-Acc | Avg | CoLA-MCC | CoLA-Acc |" in md
    assert "| RoBERTa-medium (reference) | – | reference |" in md
    assert not list(out.glob("*.tmp"))


def test_run_scores_every_checkpoint_reuses_results_and_draws_the_curve(workspace, capsys):
    run, glue = workspace / "run", workspace / "GLUE"
    # checkpoint-100 was scored earlier "by pretraining"; plant a marker to see that --run reuses it
    main(["glue", "--model", str(run / "checkpoint-100"), "--glue-dir", str(glue), "--tasks", "rte,mrpc", *QUICK])
    saved = run / "glue" / "checkpoint-100" / "rte.json"
    result = json.loads(saved.read_text())
    for r in result["per_seed"]:
        r["scores"]["validation"]["accuracy"] = 0.123
    result["scores"]["validation"]["accuracy"] = 0.123
    saved.write_text(json.dumps(result))

    main(["glue", "--run", str(run), "--steps", "100,300", "--glue-dir", str(glue), "--tasks", "rte,mrpc", *QUICK])
    out = run / "glue"
    assert (out / "glue_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["Step"] for r in rows] == ["100", "300"]
    assert rows[0]["RTE-Acc"] == "12.3"  # reused, not recomputed
    assert not (out / "checkpoint-200").exists()  # not asked for

    # other settings: refused (one line naming the difference), then replaced with --force
    other = ["glue", "--run", str(run), "--steps", "100", "--glue-dir", str(glue), "--tasks", "rte",
             "--seeds", "1", "--lr", "2e-3", "--max-length", "48", "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main(other)
    assert exit_info.value.code == 2
    assert "holds results made with other settings (lr " in capsys.readouterr().err
    assert json.loads(saved.read_text())["scores"]["validation"]["accuracy"] == 0.123  # untouched
    main([*other, "--force"])
    assert json.loads(saved.read_text())["scores"]["validation"]["accuracy"] != 0.123

    # a run folder given as --model: named, with the way forward
    with pytest.raises(SystemExit):
        main(["glue", "--model", str(run), "--glue-dir", str(glue), "--tasks", "rte"])
    assert f"--model {run} is a pretraining run folder, not a checkpoint: use --run {run}" in capsys.readouterr().err

    # gathering only: all checkpoints with results, nothing computed
    (out / "glue_curve.png").unlink()
    main(["glue", "--run", str(run), "--gather-only", "--tasks", "rte,mrpc"])
    assert (out / "glue_curve.png").exists()


def test_tokenized_tasks_are_shared_across_seeds_and_checkpoints(workspace, tmp_path):
    cache: dict = {}
    tasks = parse_tasks("rte,sst2")
    for step in (200, 300):
        evaluate_model(str(workspace / "run" / f"checkpoint-{step}"), tasks, tmp_path / str(step),
                       glue_dir=str(workspace / "GLUE"), seeds=2, base=FinetuneConfig(max_length=48),
                       cache=cache, progress=False)
    assert sum(1 for k in cache if k[0] == "encoded") == len(tasks)  # once per task, not per seed or checkpoint


def test_settings_precedence():
    over = parse_overrides(["lr=3e-5", "rte.epochs=10", "rte.adam_betas=0.9,0.98", "max_train_samples=none"])
    rte = task_config(GLUE_TASKS["rte"], FinetuneConfig(), over)
    assert (rte.lr, rte.epochs, rte.adam_betas, rte.max_train_samples) == (3e-5, 10, (0.9, 0.98), None)
    assert task_config(GLUE_TASKS["mrpc"], FinetuneConfig(), over).epochs == 3


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/checkpoint-5", "--tasks", "rte"], "missing checkpoint"),
    (["--model", "x", "--tasks", "rte,squad"], "unknown GLUE task 'squad'"),
    (["--model", "x", "--set", "rte.speed=3"], "bad override"),
    (["--model", "x", "--set", "lr=fast"], "not a valid"),
    (["--run", "/nonexistent/run"], "does not exist"),
    (["--model", "x", "--tasks", ""], "--tasks is empty"),
    (["--model", "x", "--protocol", "mine"], "--protocol: unknown protocol 'mine' (choose fast, reference)"),
    (["--model", "x", "--set", "lr=nan"], "lr must be a number > 0"),
    (["--model", "x", "--set", "rte.lr=inf"], "lr must be a number > 0"),
    (["--model", "x", "--set", "adam_eps=-1"], "adam_eps must be a number >= 0, got -1.0"),
    (["--model", "x", "--device", "bogus"], "device: unknown device 'bogus' (use auto, cpu, cuda or cuda:N)"),
    pytest.param(["--model", "x", "--device", "cuda"], "device cuda but no CUDA GPU is available (use cpu)",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")),
    # a setting for a task that is not run would be ignored
    (["--model", "x", "--tasks", "rte", "--set", "xyz.epochs=1"],
     "--set xyz.epochs=1: task 'xyz' is not among the tasks run (rte): correct the name or add the task to --tasks"),
    (["--model", "x", "--tasks", "rte,mrpc", "--set", "lr=1e-4", "--set", "sst2.lr=1e-3"],
     "--set sst2.lr=1e-3: task 'sst2' is not among the tasks run (rte, mrpc)"),
    # an empty --steps (an unset shell variable?) is not "every step"
    (["--run", "/nonexistent/run", "--steps", ""],
     "--steps is empty: give comma-separated steps (e.g. 1000,2000), or leave it out for all"),
    (["--run", "/nonexistent/run", "--steps", " , "], "--steps is empty"),
    (["--model", "x", "--steps", ""], "--steps and --gather-only go with --run"),
])
def test_cli_errors_are_one_clear_line(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)  # where ./glue_results would go
    with pytest.raises(SystemExit) as exit_info:
        main(["glue", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []  # nothing left behind (an empty glue_results/<name>/ was)


def test_cli_missing_glue_file_and_missing_step(workspace, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["glue", "--model", str(workspace / "run" / "checkpoint-100"), "--glue-dir", str(tmp_path),
              "--tasks", "rte", "--out", str(tmp_path / "o"), *QUICK])
    assert "missing GLUE file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["glue", "--run", str(workspace / "run"), "--steps", "999", "--glue-dir", str(workspace / "GLUE")])
    assert "no checkpoint-999" in capsys.readouterr().err


def test_task_of_your_own_runs_through_the_same_code(workspace, tmp_path):
    from glue_fixtures import keyword_examples

    lines = ["text,topic"] + [f"{ex['sentence']},{'neg' if ex['label'] else 'pos'}" for ex in keyword_examples(40)]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps({"text": ex["sentence"], "topic": ex["label"]}) + "\n"
                                                for ex in keyword_examples(12, seed=9)))
    (tmp_path / "task.toml").write_text('name = "topics"\ntext_fields = ["text"]\nlabel_field = "topic"\n'
                                        'label_names = ["pos", "neg"]\nmetrics = ["macro_f1", "accuracy"]\n'
                                        'train = "train.csv"\nvalidation = "dev.jsonl"\n')
    out = tmp_path / "out"
    main(["glue", "--model", str(workspace / "run" / "checkpoint-100"), "--task-file", str(tmp_path / "task.toml"),
          "--out", str(out), *QUICK])
    assert json.loads((out / "topics.json").read_text())["train_examples"] == 40
    rows = list(csv.DictReader((out / "results.csv").open()))
    # every metric of the task, and no reference column, so no average
    assert list(rows[0]) == ["Model", "Step", "Protocol", "topics-macro_f1", "topics-accuracy"]


def test_a_small_model_at_the_reference_lr_gets_a_hint(workspace, capsys):
    args = ["glue", "--model", str(workspace / "run" / "checkpoint-100"), "--glue-dir", str(workspace / "GLUE"),
            "--tasks", "rte", "--seeds", "1", "--epochs", "1", "--max-length", "48", "--no-progress"]
    main([*args, "--out", str(workspace / "hint")])  # the reference's lr 2e-5 on a 32-wide model
    assert "rte: note: lr 2e-05 (the reference's, for 512-wide models) often leaves a 32-wide model at chance" in capsys.readouterr().out
    main([*args, "--out", str(workspace / "no_hint"), "--lr", "1e-3"])
    assert "note: lr" not in capsys.readouterr().out


def test_the_max_length_used_is_saved_beside_the_requested_one(workspace):
    out = workspace / "capped"
    main(["glue", "--model", str(workspace / "run" / "checkpoint-100"), "--glue-dir", str(workspace / "GLUE"),
          "--tasks", "rte", "--seeds", "1", "--epochs", "1", "--lr", "1e-3", "--max-length", "4096", "--no-progress",
          "--out", str(out)])
    saved = json.loads((out / "rte.json").read_text())
    assert saved["recipe"]["max_length"] == 4096 and saved["max_length_used"] < 4096


def test_an_unwritable_results_folder_fails_before_fine_tuning(workspace, tmp_path, capsys):
    (tmp_path / "file").write_text("x")  # a folder below a file cannot be made, even by root
    with pytest.raises(SystemExit) as exit_info:
        main(["glue", "--model", str(workspace / "run" / "checkpoint-100"), "--glue-dir", str(workspace / "GLUE"),
              "--tasks", "rte", "--out", str(tmp_path / "file" / "out"), *QUICK])
    assert exit_info.value.code == 2
    err = capsys.readouterr()
    assert f"error: cannot write results to {tmp_path / 'file' / 'out'}" in err.err
    assert "seed" not in err.out  # nothing was fine-tuned


def test_reference_protocol_is_run_glue_under_trainer(tmp_path):
    """--protocol reference has the effective settings of the reference's run_glue.py command under
    Trainer (--learning_rate 2e-5 --num_train_epochs 3 --per_device_train_batch_size 4 on 8 GPUs
    --max_seq_length 512 --seed 42, Trainer defaults otherwise), and the same learning rate at every step."""
    import torch
    from transformers import TrainingArguments, get_scheduler

    from mlm.eval.finetune import PROTOCOLS, lr_multiplier

    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=2e-5, num_train_epochs=3,
                             per_device_train_batch_size=4, seed=42, report_to=[])
    ours, seeds = PROTOCOLS["reference"]
    assert (ours.lr, ours.epochs, ours.batch_size, ours.max_length) == (args.learning_rate, args.num_train_epochs,
                                                                         args.per_device_train_batch_size * 8, 512)
    assert seeds == [args.seed]
    assert (ours.weight_decay, ours.adam_betas, ours.adam_eps, ours.max_grad_norm) == (
        args.weight_decay, (args.adam_beta1, args.adam_beta2), args.adam_epsilon, args.max_grad_norm)
    # transformers 4 says group_by_length=False; 5 says train_sampling_strategy="random"
    grouped = getattr(args, "group_by_length", None) or getattr(args, "train_sampling_strategy", "") == "group_by_length"
    assert ours.group_by_length == grouped is False
    assert getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type) == "linear"
    total = 3 * 123  # steps of 3 epochs of some task
    warmup = args.get_warmup_steps(total)
    assert warmup == round(total * ours.warmup_ratio) == 0
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    trainer_schedule = get_scheduler("linear", optimizer, num_warmup_steps=warmup, num_training_steps=total)
    for step in range(total):
        assert trainer_schedule.get_last_lr()[0] == pytest.approx(lr_multiplier(step, warmup, total), abs=1e-12)
        optimizer.step()
        trainer_schedule.step()


def test_the_protocol_is_named_and_the_median_seed_reports_all_its_metrics(workspace):
    from mlm.eval.glue import median_seed

    runs = [{"seed": s, "scores": {"validation": {"f1": f1, "accuracy": acc}}}
            for s, f1, acc in ((0, 0.80, 0.70), (1, 0.90, 0.60), (2, 0.85, 0.75))]
    assert median_seed(runs)["seed"] == 2  # F1 0.85 is the median; its accuracy comes with it
    assert median_seed(runs[:2])["seed"] == 0  # an even count: the lower middle one

    out = workspace / "out_reference"
    main(["glue", "--model", str(workspace / "run" / "checkpoint-100"), "--glue-dir", str(workspace / "GLUE"),
          "--tasks", "rte", "--protocol", "reference", "--out", str(out), "--no-progress"])
    rte = json.loads((out / "rte.json").read_text())
    assert rte["protocol"] == "reference" and rte["seeds"] == [42] and rte["reported_seed"] == 42
    assert rte["recipe"]["warmup_ratio"] == 0 and rte["recipe"]["weight_decay"] == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert rows[0]["Protocol"] == "reference"


def _break_rte_train(glue, how):
    """Spoil RTE's train.tsv in one of the ways a download or an edit goes wrong."""
    path = glue / "RTE" / "train.tsv"
    header = ["index", "sentence1", "sentence2", "label"]
    if how == "missing column":
        write_tsv(path, [["0", "a b", "entailment"]], ["index", "sentence1", "label"])
    elif how == "empty":
        path.write_text("")
    elif how == "header only":
        write_tsv(path, [], header)
    elif how == "bad label":
        write_tsv(path, [["0", "a b", "c d", "maybe"]], header)
    return path


BROKEN = {
    "missing column": "header lacks column(s) ['sentence2']",
    "empty": "is empty (expected a header line)",
    "header only": "holds no examples",
    "bad label": "train.tsv:2: label 'maybe' is not a class id 0..1 or one of entailment, not_entailment",
    "no glue dir": "GLUE directory nonexistent does not exist",
    "no model": "missing checkpoint directory ./nonexistent/ckpt",
}


@pytest.mark.parametrize("how", list(BROKEN))
def test_a_failed_evaluation_leaves_no_empty_results_folder(workspace, tmp_path, monkeypatch, capsys, how):
    """The results folder this call made is gone again when nothing could be written into it; a folder that
    was there before stays."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(workspace / "run" / "checkpoint-100", tmp_path / "ckpt")  # not in a run: ./glue_results/ckpt
    glue = write_glue_dir(tmp_path / "GLUE", n_train=8, n_dev=4)
    if how not in ("no glue dir", "no model"):
        _break_rte_train(glue, how)
    args = ["glue", "--model", "./nonexistent/ckpt" if how == "no model" else "ckpt",
            "--glue-dir", "nonexistent" if how == "no glue dir" else "GLUE", "--tasks", "rte", *QUICK]
    before = sorted(tmp_path.rglob("*"))
    for out in ([], ["--out", "made/by/this/call"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, *out])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and BROKEN[how] in err and err.count("\n") == 1
        assert sorted(tmp_path.rglob("*")) == before  # no glue_results/ckpt/, no made/by/this/call/

    (tmp_path / "mine").mkdir()  # a results folder that was there before: kept, even empty
    with pytest.raises(SystemExit):
        main([*args, "--out", "mine"])
    assert (tmp_path / "mine").is_dir() and not list((tmp_path / "mine").iterdir())


def test_a_results_folder_with_results_in_it_is_kept_when_a_later_task_fails(workspace, tmp_path, capsys):
    glue = write_glue_dir(tmp_path / "GLUE", n_train=8, n_dev=4)
    write_tsv(glue / "SST-2" / "train.tsv", [], ["sentence", "label"])  # header only
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        main(["glue", "--model", str(workspace / "run" / "checkpoint-100"), "--glue-dir", str(glue),
              "--tasks", "rte,sst2", "--out", str(out), "--seeds", "1", "--epochs", "1", "--lr", "1e-3", "--no-progress"])
    assert "SST-2/train.tsv holds no examples" in capsys.readouterr().err
    assert json.loads((out / "rte.json").read_text())["complete"]  # RTE's results stay, to be reused


def test_a_failed_run_evaluation_leaves_no_empty_glue_folder(workspace, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(workspace / "run" / "checkpoint-100", run / "checkpoint-100")
    with pytest.raises(SystemExit):
        main(["glue", "--run", str(run), "--glue-dir", str(tmp_path / "nonexistent"), "--tasks", "rte", *QUICK])
    assert f"GLUE directory {tmp_path / 'nonexistent'} does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-100"]  # no run/glue/checkpoint-100/


def test_a_pretraining_run_folder_as_model_points_to_run(workspace, tmp_path, monkeypatch, capsys):
    """A run folder holds the pretraining recipe as config.json beside its checkpoints, but no model."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(workspace / "run" / "checkpoint-100", run / "checkpoint-100")
    shutil.copytree(workspace / "run" / "checkpoint-100", run / "checkpoint-200")
    (run / "config.json").write_text(json.dumps({"model": {"family": "bert", "size": "tiny"}, "train": {"steps": 200}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["glue", "--model", "run", "--glue-dir", str(workspace / "GLUE"), "--tasks", "rte", *QUICK])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: --model run is a pretraining run folder, not a checkpoint: use --run run "
                                       "to score its checkpoints, or --model run/checkpoint-200 for the newest one\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no glue_results/run/


def test_a_task_file_cannot_write_outside_the_results_folder(workspace, tmp_path, capsys):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "train.csv").write_text("text,label\nhello,0\nbye,1\n")
    task = tmp_path / "a" / "b" / "task.toml"
    task.write_text('name = "../../evil"\ntext_fields = ["text"]\nnum_labels = 2\ntrain = "train.csv"\n'
                    'validation = "train.csv"\n')
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main(["glue", "--model", str(workspace / "run" / "checkpoint-100"), "--task-file", str(task),
              "--out", str(tmp_path / "a" / "b" / "out"), *QUICK])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"error: {task}: name '../../evil' is not a plain file name (it names the results "
                                       "file NAME.json): use letters, digits, '-', '_' and '.', not starting with '.'\n")
    assert sorted(tmp_path.rglob("*")) == before  # no evil.json above the results folder, no results folder


def test_two_task_files_of_one_name_are_refused(workspace, tmp_path, capsys):
    for sub in ("one", "two"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "task.toml").write_text('name = "topics"\ntext_fields = ["text"]\nnum_labels = 2\n'
                                                  'train = "a.csv"\nvalidation = "b.csv"\n')
    with pytest.raises(SystemExit):
        main(["glue", "--model", str(workspace / "run" / "checkpoint-100"), "--task-file", str(tmp_path / "one" / "task.toml"),
              "--task-file", str(tmp_path / "two" / "task.toml"), "--out", str(tmp_path / "out"), *QUICK])
    assert capsys.readouterr().err == "error: two task files are named 'topics': give each task its own name\n"
    assert not (tmp_path / "out").exists()


def test_a_nan_score_in_stsb_is_refused_end_to_end(workspace, tmp_path, capsys):
    """It gave "pearson": NaN in a result marked complete."""
    glue = write_glue_dir(tmp_path / "GLUE", n_train=8, n_dev=4)
    path = glue / "STS-B" / "train.tsv"
    lines = path.read_text().splitlines()
    lines[3] = lines[3].rsplit("\t", 1)[0] + "\tnan"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["glue", "--model", str(workspace / "run" / "checkpoint-100"), "--glue-dir", str(glue), "--tasks", "stsb",
              "--out", str(tmp_path / "out"), *QUICK])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"error: {path}:4: label 'nan' is not a finite number (task stsb is a "
                                       "regression): fix or remove the row\n")
    assert not (tmp_path / "out").exists()


def test_a_task_file_made_custom_says_why_and_a_log_file_gets_plain_lines(workspace, tmp_path, capsys):
    """--protocol reference with a task whose [hparams] set epochs: the log and the JSON name the setting; off a
    terminal the fine-tuning progress is plain lines, no carriage returns; a run of that task alone draws no
    GLUE-average panel."""
    from glue_fixtures import keyword_examples

    rows = [{"text": ex["sentence"], "label": ex["label"]} for ex in keyword_examples(24)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "task.toml").write_text('name = "topics"\ntext_fields = ["text"]\nnum_labels = 2\nmetrics = ["accuracy", "macro_f1"]\n'
                                        'train = "train.jsonl"\nvalidation = "train.jsonl"\n[hparams]\nepochs = 1\n')
    out = tmp_path / "out"
    main(["glue", "--run", str(workspace / "run"), "--steps", "100", "--task-file", str(tmp_path / "task.toml"),
          "--protocol", "reference", "--max-length", "512", "--out", str(out)])
    captured = capsys.readouterr()
    assert "topics: protocol custom: epochs 1 (reference: 3)" in captured.out
    saved = json.loads((out / "checkpoint-100" / "topics.json").read_text())
    assert saved["protocol"] == "custom" and saved["custom_because"] == "epochs 1 (reference: 3)"
    assert "topics seed 42: epoch 1/1 | loss " in captured.out
    assert "\r" not in captured.out + captured.err
    png = (out / "glue_curve.png").read_bytes()
    assert int.from_bytes(png[16:20], "big") == 7 * 120  # one panel (7 inches at 120 dpi), not two


def test_a_modernbert_run_is_scored_like_any_other(workspace, tmp_path):
    """mlm glue --run on a ModernBERT run: sentence pairs without token type ids, every checkpoint, the curve."""
    run = tmp_path / "modernbert-run"
    make_checkpoint(run / "checkpoint-10", "modernbert")
    shutil.copytree(run / "checkpoint-10", run / "checkpoint-20")
    main(["glue", "--run", str(run), "--glue-dir", str(workspace / "GLUE"), "--tasks", "rte,sst2", *QUICK])
    rows = list(csv.DictReader((run / "glue" / "results.csv").open()))
    assert [r["Step"] for r in rows] == ["10", "20"]
    assert all(0.0 <= float(r["RTE-Acc"]) <= 100.0 and 0.0 <= float(r["SST-2-Acc"]) <= 100.0 for r in rows)
    assert (run / "glue" / "glue_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
