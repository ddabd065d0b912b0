import dataclasses
import datetime
import json
import re
import shutil

import pytest
import torch
from transformers import AutoModelForMaskedLM

from mlm.config import load_config, save_config
from mlm.errors import UserError
from mlm.train.metrics import read_metrics
from mlm.train.pretrain import pretrain

from conftest import tiny_config

QUIET = {"log": lambda _: None}


def losses(run_dir):
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def test_tiny_run_loss_falls_and_writes_hf_checkpoints(data_dirs, family, tmp_path):
    cfg = tiny_config(data_dirs[family], tmp_path / "run", family, steps=40)
    summary = pretrain(cfg, **QUIET)
    train = losses(tmp_path / "run")
    assert sorted(train) == list(range(1, 41))
    assert sum(list(train.values())[-5:]) / 5 < sum(list(train.values())[:5]) / 5 - 1.0
    val = [m["val_loss"] for m in read_metrics(tmp_path / "run") if "val_loss" in m]
    assert len(val) == 5 and val[-1] < val[0] - 1.0  # step 0, 10, 20, 30, 40
    assert summary["val_loss"] == val[-1]
    assert [p.name for p in sorted((tmp_path / "run").glob("checkpoint-*"))] == [
        "checkpoint-10", "checkpoint-20", "checkpoint-30", "checkpoint-40"
    ]
    model = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "run" / "checkpoint-40"))
    assert model.config.model_type == family
    assert (tmp_path / "run" / "tensorboard").is_dir()
    assert not list((tmp_path / "run").glob(".*tmp*"))


def test_a_resume_between_logged_steps_logs_the_unbroken_means(data_dirs, tmp_path):
    """Checkpoints every 3 steps, a logged loss every 2: resumed from step 3, the mean logged at step 4 still
    covers steps 3 and 4 (the checkpoint carries the part of the window before it)."""
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "a", steps=8)
    cfg.run.checkpoint_every, cfg.run.log_every, cfg.train.warmup_steps = 3, 2, 1
    pretrain(cfg, **QUIET)
    stopped = tmp_path / "b"  # as the run was right after its step-3 checkpoint
    stopped.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", stopped / "checkpoint-3")
    shutil.copy(tmp_path / "a" / "config.json", stopped / "config.json")
    cfg_b = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(stopped)))
    pretrain(cfg_b, resume="latest", **QUIET)
    assert losses(stopped) == {step: loss for step, loss in losses(tmp_path / "a").items() if step > 3}


def test_resume_gives_identical_losses(data_dirs, tmp_path):
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "a", steps=20)
    pretrain(cfg, **QUIET)
    # A run stopped right after its step-10 checkpoint: same folder as the unbroken run had then.
    stopped = tmp_path / "b"
    stopped.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-10", stopped / "checkpoint-10")
    shutil.copy(tmp_path / "a" / "config.json", stopped / "config.json")
    (stopped / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[:15])
    )
    cfg_b = tiny_config(data_dirs["roberta"], stopped, steps=20)
    pretrain(cfg_b, resume="latest", **QUIET)
    a, b = losses(tmp_path / "a"), losses(stopped)
    assert sorted(b) == list(range(1, 21))  # no repeated or missing records
    assert [a[s] for s in range(11, 21)] == [b[s] for s in range(11, 21)]
    final_a = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "a" / "checkpoint-20")).state_dict()
    final_b = AutoModelForMaskedLM.from_pretrained(str(stopped / "checkpoint-20")).state_dict()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_gradient_accumulation_matches_one_big_batch(data_dirs, tmp_path):
    """micro_batch only changes speed (with dropout 0): 1×16 and 2×8 (and 4×4) give the same training and
    validation losses."""
    runs, validation = {}, {}
    for micro in (16, 8, 4):
        cfg = tiny_config(data_dirs["bert"], tmp_path / f"m{micro}", "bert", steps=5)
        cfg.system.micro_batch = micro
        cfg.model.dropout = 0.0
        pretrain(cfg, **QUIET)
        runs[micro] = losses(tmp_path / f"m{micro}")
        validation[micro] = {m["step"]: m["val_loss"] for m in read_metrics(tmp_path / f"m{micro}") if "val_loss" in m}
    for micro in (8, 4):  # same data, same masks; only the order of float sums differs
        assert runs[micro] == pytest.approx(runs[16], abs=1e-4)
        assert validation[micro] == pytest.approx(validation[16], abs=1e-5)


def test_with_dropout_on_the_micro_batch_changes_the_losses(data_dirs, tmp_path):
    """What the README says: with dropout the draws depend on the micro-batch, so the losses differ."""
    runs = {}
    for micro in (16, 8):
        cfg = tiny_config(data_dirs["bert"], tmp_path / f"m{micro}", "bert", steps=3)
        cfg.system.micro_batch, cfg.model.dropout, cfg.eval.every = micro, 0.1, 0
        pretrain(cfg, **QUIET)
        runs[micro] = losses(tmp_path / f"m{micro}")
    assert abs(runs[8][3] - runs[16][3]) > 1e-4


# ---- bad input: one clear error, nothing half-written ---------------------------------------------


def test_unknown_key_and_bad_value_are_named(tmp_path):
    with pytest.raises(UserError, match="unknown config key 'train.learning_rate'"):
        load_config(None, ["--train.learning_rate=1e-3"])
    with pytest.raises(UserError, match=r"unknown config key 'train.lrr' \(did you mean train.lr\?\)"):
        load_config(None, ["--train.lrr=1e-3"])
    with pytest.raises(UserError, match=r"unknown config key 'trian' \(did you mean train\?\)"):
        load_config(None, ["--trian.lr=1e-3"])
    with pytest.raises(UserError, match="train.steps: expected int, got 'many'"):
        load_config(None, ["--train.steps=many"])
    with pytest.raises(UserError, match="model.size: unknown roberta size .huge."):
        load_config(None, ["--model.size=huge"])
    with pytest.raises(UserError, match="model.family: unknown family .gpt."):
        load_config(None, ["--model.family=gpt"])
    with pytest.raises(UserError, match=r"system.strategy: unknown engine 'zero' \(choose auto, ddp, fsdp, deepspeed\)"):
        load_config(None, ["--system.strategy=zero"])
    with pytest.raises(UserError, match="system.strategy=deepspeed needs system.deepspeed_config"):
        load_config(None, ["--system.strategy=deepspeed"])
    with pytest.raises(UserError, match="system.deepspeed_config is set but system.strategy=auto"):
        load_config(None, ["--system.deepspeed_config=configs/deepspeed/zero2.json"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = 10\nwarmup = 3\n")
    with pytest.raises(UserError, match="unknown config key 'train.warmup'"):
        load_config(bad)


def test_the_shipped_recipes_load():
    for name in ("tiny", "roberta-medium", "bert-medium"):
        cfg = load_config(f"configs/{name}.toml")
        assert cfg.system.micro_batch == "auto" or cfg.train.global_batch % cfg.system.micro_batch == 0
    medium = load_config("configs/roberta-medium.toml")
    assert (medium.train.steps, medium.train.global_batch, medium.data.seq_len, medium.train.lr) == (30000, 8192, 512, 1e-3)
    assert (medium.train.betas, medium.train.eps, medium.train.weight_decay, medium.train.warmup_steps) == ([0.9, 0.98], 1e-6, 0.01, 1800)
    assert load_config("configs/bert-medium.toml").model.family == "bert"


def test_data_prepared_with_another_tokenizer(data_dirs, tokenizer_dirs, tmp_path):
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run")
    cfg.data.tokenizer = str(tokenizer_dirs["bert"])
    cfg.model.family = "bert"
    with pytest.raises(UserError, match="prepared with tokenizer"):
        pretrain(cfg, **QUIET)
    assert not (tmp_path / "run").exists()


def test_family_must_match_the_tokenizer(data_dirs, tmp_path):
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run", family="bert")
    with pytest.raises(UserError, match="model.family=bert but the tokenizer uses roberta"):
        pretrain(cfg, **QUIET)


def test_corpus_too_small_for_one_sequence(tmp_path, tokenizer_dirs):
    from mlm.data.prepare import PrepareConfig, prepare

    (tmp_path / "c.txt").write_text("The cat sees a red ball.\n")
    prepare(PrepareConfig([str(tmp_path / "c.txt")], str(tokenizer_dirs["roberta"]), str(tmp_path / "d"), workers=1), **QUIET)
    with pytest.raises(UserError, match="corpus is too small"):
        pretrain(tiny_config(tmp_path / "d", tmp_path / "run"), **QUIET)
    assert not (tmp_path / "run").exists()


def test_resume_without_checkpoint(data_dirs, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no checkpoint yet .*start without --resume, or use --resume=auto"):
        pretrain(tiny_config(data_dirs["roberta"], tmp_path / "run"), resume=str(tmp_path / "empty"), **QUIET)


def test_out_dir_holding_a_different_run(data_dirs, tmp_path):
    pretrain(tiny_config(data_dirs["roberta"], tmp_path / "run", steps=10), **QUIET)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    other = tiny_config(data_dirs["roberta"], tmp_path / "run", steps=10)
    other.train.lr = 1e-4
    with pytest.raises(UserError, match=r"already holds a different run \(differs in train.lr\).*--model.init_from=.*checkpoint-10"):
        pretrain(other, **QUIET)
    with pytest.raises(UserError, match="pass --resume"):
        pretrain(tiny_config(data_dirs["roberta"], tmp_path / "run", steps=10), **QUIET)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    (tmp_path / "run" / "config.json").write_text("[]")  # valid JSON, not a run's settings
    with pytest.raises(UserError, match=r"config.json does not hold a run's settings \(a JSON object\): restore it"):
        pretrain(tiny_config(data_dirs["roberta"], tmp_path / "run", steps=10), resume="auto", **QUIET)


def test_batch_arithmetic_must_divide(data_dirs, tmp_path):
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run")
    cfg.system.micro_batch = 5
    with pytest.raises(UserError, match="not a multiple of system.micro_batch=5"):
        pretrain(cfg, **QUIET)


def test_resume_auto_starts_or_continues(data_dirs, tmp_path):
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run", steps=10)
    pretrain(cfg, resume="auto", **QUIET)  # nothing to resume: starts
    assert (tmp_path / "run" / "checkpoint-10").is_dir()
    again = tiny_config(data_dirs["roberta"], tmp_path / "run", steps=10)
    pretrain(again, resume="auto", **QUIET)  # finished run: resumes at its last step and stops
    assert sorted(losses(tmp_path / "run")) == list(range(1, 11))


def test_wandb_requested_but_missing(data_dirs, tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run")
    cfg.run.wandb = True
    with pytest.raises(UserError, match="wandb package is not installed"):
        pretrain(cfg, **QUIET)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_compiled_model_trains_like_eager(data_dirs, tmp_path):
    runs = {}
    for mode in ("off", "on"):
        cfg = tiny_config(data_dirs["roberta"], tmp_path / mode, steps=4)
        cfg.system.compile, cfg.model.dropout = mode, 0.0
        pretrain(cfg, **QUIET)
        runs[mode] = losses(tmp_path / mode)
    assert runs["on"] == pytest.approx(runs["off"], abs=1e-3)
    # Saved from the unwrapped model: no `_orig_mod.` prefixes.
    assert not any("_orig_mod" in k for k in AutoModelForMaskedLM.from_pretrained(str(tmp_path / "on" / "checkpoint-4")).state_dict())


@pytest.mark.slow
def test_glue_every_scores_checkpoints_in_a_separate_process(data_dirs, tmp_path):
    import json
    import time

    from glue_fixtures import write_glue_dir

    glue_dir = write_glue_dir(tmp_path / "glue_data")
    cfg = tiny_config(data_dirs["bert"], tmp_path / "run", "bert", steps=40)
    cfg.eval.glue_every, cfg.eval.glue_tasks, cfg.eval.glue_dir = 2, "rte", str(glue_dir)
    cfg.eval.glue_args, cfg.eval.glue_device = "--seeds 1 --epochs 1 --max-length 32", "cpu"
    # Only the newest checkpoint is kept, but not one a GLUE job still has to read: the job for step 20
    # starts (seconds of imports) long after training has written checkpoint-30.
    cfg.run.keep_checkpoints = 1
    pretrain(cfg, **QUIET)  # checkpoints at 10, 20, 30, 40; 20 and 40 are scored
    results = [tmp_path / "run" / "glue" / f"checkpoint-{step}" / "rte.json" for step in (20, 40)]
    deadline = time.time() + 300
    while not all(r.is_file() for r in results) and time.time() < deadline:
        time.sleep(1)
    for result in results:
        assert result.is_file(), (tmp_path / "run" / "glue" / "glue.log").read_text()
        assert "accuracy" in json.dumps(json.loads(result.read_text()))
    assert not (tmp_path / "run" / "glue" / "checkpoint-10").exists()
    assert not (tmp_path / "run" / "checkpoint-10").exists() and not (tmp_path / "run" / "checkpoint-30").exists()


def test_second_phase_from_first_phase_weights(data_dirs, tmp_path):
    """A 32-token phase, then a 48-token phase initialised from its last checkpoint (same prepared data)."""
    pretrain(tiny_config(data_dirs["roberta"], tmp_path / "phase1", steps=10), **QUIET)
    phase2 = tiny_config(data_dirs["roberta"], tmp_path / "phase2", steps=10)
    phase2.data.seq_len, phase2.model.init_from = 48, str(tmp_path / "phase1" / "checkpoint-10")
    pretrain(phase2, **QUIET)
    first = losses(tmp_path / "phase1")
    assert losses(tmp_path / "phase2")[1] < first[1] - 0.5  # starts from trained weights, not from scratch
    # RoBERTa's positions are a table: a longer phase than the model's 64 positions is refused, whatever
    # model.max_positions says (the model brings its positions).
    too_long = tiny_config(data_dirs["roberta"], tmp_path / "phase3", steps=10)
    too_long.data.seq_len, too_long.model.max_positions = 128, 128
    too_long.model.init_from = str(tmp_path / "phase1" / "checkpoint-10")  # made with 64 positions
    with pytest.raises(UserError, match=r"data.seq_len=128 is longer than the 64 positions of the model in "
                                        r".*checkpoint-10"):
        pretrain(too_long, **QUIET)
    # The model brings its shape: model.size is named and not used, and config.json records what was trained.
    lines = []
    other = tiny_config(data_dirs["roberta"], tmp_path / "phase3", steps=2)
    other.model.size, other.model.init_from = "mini", str(tmp_path / "phase1" / "checkpoint-10")
    pretrain(other, log=lines.append)
    assert any("model.size=mini is not used" in line for line in lines)
    recorded = json.loads((tmp_path / "phase3" / "config.json").read_text())["model"]
    assert (recorded["size"], recorded["layers"], recorded["hidden"]) == ("", 2, 128)


# ---- a run folder never leaves the user at a dead end ------------------------------------------------


def test_extending_a_finished_run_names_the_way(data_dirs, tmp_path):
    pretrain(tiny_config(data_dirs["roberta"], tmp_path / "run", steps=10), **QUIET)
    longer = tiny_config(data_dirs["roberta"], tmp_path / "run", steps=20)
    with pytest.raises(UserError, match=r"another length \(differs in train.steps\).*fresh schedule: "
                                        r"--model.init_from=.*checkpoint-10 --run.out_dir=NEW_FOLDER"):
        pretrain(longer, resume="latest", **QUIET)
    # The way it names works.
    longer.run.out_dir, longer.model.init_from = str(tmp_path / "more"), str(tmp_path / "run" / "checkpoint-10")
    pretrain(longer, **QUIET)
    assert (tmp_path / "more" / "checkpoint-20").is_dir()


def test_a_run_stopped_before_its_first_checkpoint(data_dirs, tmp_path):
    """Its folder holds config.json and metrics but no checkpoint: the same run starts over in it, --resume
    says to start without it, and another run is told to delete the folder or choose another."""
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run", steps=10)
    cfg.run.checkpoint_every = 1000
    (tmp_path / "run").mkdir()
    save_config(cfg, tmp_path / "run" / "config.json")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 0, "val_loss": 9.9}\n{"step": 1, "loss": 9.9}\n')
    with pytest.raises(UserError, match="holds no checkpoint yet .*start without --resume"):
        pretrain(cfg, resume="latest", **QUIET)
    other = tiny_config(data_dirs["roberta"], tmp_path / "run", steps=10)
    other.train.lr = 1e-4
    with pytest.raises(UserError, match=r"stopped before its first checkpoint: delete that folder \(rm -r .*run\)"):
        pretrain(other, **QUIET)
    pretrain(cfg, **QUIET)  # starts over: the earlier records are gone, none repeated
    assert sorted(losses(tmp_path / "run")) == list(range(1, 11))
    assert [m["step"] for m in read_metrics(tmp_path / "run") if "val_loss" in m] == [0, 10]


def test_resume_from_another_run_must_be_explicit(data_dirs, tmp_path):
    pretrain(tiny_config(data_dirs["roberta"], tmp_path / "a", steps=10), **QUIET)
    other = tiny_config(data_dirs["roberta"], tmp_path / "b", steps=10)
    other.train.lr = 1e-4
    with pytest.raises(UserError, match=r"checkpoint-10 belongs to the run in .*a, which differs from this one "
                                        r"\(run.out_dir=.*b\) in train.lr.*--model.init_from="):
        pretrain(other, resume=str(tmp_path / "a" / "checkpoint-10"), **QUIET)
    assert not (tmp_path / "b").exists()
    # A checkpoint folder moved away from its run is checked against the model it holds.
    shutil.copytree(tmp_path / "a" / "checkpoint-10", tmp_path / "moved" / "checkpoint-10")
    no_dropout = tiny_config(data_dirs["roberta"], tmp_path / "c", steps=20)  # longer: checkpoint-10 is not its end
    no_dropout.model.dropout = 0.0
    with pytest.raises(UserError, match=r"model in .*checkpoint-10 is not the configured one \(hidden_dropout_prob "
                                        r"0.1 vs 0.0; attention_probs_dropout_prob 0.1 vs 0.0"):
        pretrain(no_dropout, resume=str(tmp_path / "moved" / "checkpoint-10"), **QUIET)


def test_plain_progress_lines_without_a_terminal(data_dirs, tmp_path):
    lines = []
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run", steps=20)
    cfg.run.progress, cfg.run.log_every = True, 10  # pytest's captured stdout is not a terminal
    pretrain(cfg, log=lines.append)
    steps = [line for line in lines if line.startswith("step ") and "| loss" in line]
    assert [line.split(" |")[0] for line in steps] == ["step 10/20", "step 20/20"]
    assert re.fullmatch(r"step 10/20 \| loss \d+\.\d{4} \| lr \S+ \| [\d,]+ tokens/s \| ETA \d+:\d\d:\d\d", steps[0])
    assert "step 10: validation loss" in " ".join(lines)


def test_a_run_that_would_take_days_is_warned_at_its_measured_speed(data_dirs, tmp_path, monkeypatch):
    """After the second logging window (the first holds compilation): the ETA at the measured speed, once."""
    from mlm.train import pretrain as pretrain_module

    monkeypatch.setattr(pretrain_module, "LONG_RUN", datetime.timedelta(seconds=-1))  # any run is "long"
    lines = []
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run", steps=6)
    cfg.run.log_every, cfg.train.warmup_steps = 2, 1
    pretrain(cfg, log=lines.append)
    warnings = [line for line in lines if "this run ends in about" in line]
    assert len(warnings) == 1 and re.match(r"warning: at the measured [\d,]+ tokens/s this run ends in about "
                                           r"\d+:\d\d:\d\d; more GPUs \(mlm launch\)", warnings[0])


def test_a_recipe_far_too_long_for_its_data_is_warned(data_dirs, tmp_path):
    from mlm import dist
    from mlm.train.pretrain import setup

    lines = []
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run", steps=5000)  # 5000 × 16 / 1175 sequences
    cfg.train.warmup_steps = 10
    try:
        setup(cfg, log=lines.append)
    finally:
        dist.cleanup()
    assert any(re.search(r"warning: 5,000 steps of 16 sequences see the training data [\d.]+ times", line) for line in lines)


def test_no_validation_split_is_warned(tmp_path, tokenizer_dirs):
    from mlm import dist
    from mlm.data.prepare import PrepareConfig, prepare
    from mlm.train.pretrain import setup

    from conftest import make_documents

    (tmp_path / "c.txt").write_text("\n".join(make_documents(300)))
    prepare(PrepareConfig([str(tmp_path / "c.txt")], str(tokenizer_dirs["roberta"]), str(tmp_path / "d"),
                          val_fraction=0.0, workers=1), **QUIET)
    lines = []
    try:
        setup(tiny_config(tmp_path / "d", tmp_path / "run"), log=lines.append)
    finally:
        dist.cleanup()
    assert any("has no validation sequence of 32 tokens, so no validation loss will be reported" in line for line in lines)


def test_pretrain_help_lists_every_setting(capsys):
    import dataclasses

    from mlm.cli import main
    from mlm.config import PretrainConfig

    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for section in dataclasses.fields(PretrainConfig):
        for f in dataclasses.fields(getattr(PretrainConfig(), section.name)):
            assert f"--{section.name}.{f.name}=" in text
    assert "--train.lr=0.001\n      Peak learning rate." in text


# ---- never lose work: one process per run folder, no checkpoint of a diverged state ------------------


def test_a_second_process_on_a_run_folder_is_refused(data_dirs, tmp_path):
    import os
    import subprocess
    import sys
    import time

    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run", steps=100000)
    first = subprocess.Popen(
        [sys.executable, "-m", "mlm", "pretrain", f"--data.data_dir={data_dirs['roberta']}", "--model.size=tiny",
         "--model.max_positions=64", "--data.seq_len=32", "--train.steps=100000", "--train.global_batch=16",
         "--train.lr=2e-3", "--train.warmup_steps=3", "--system.micro_batch=8", "--system.device=cpu",
         "--system.compile=off", f"--run.out_dir={tmp_path / 'run'}", "--run.log_every=1", "--run.checkpoint_every=10",
         "--run.progress=false", "--eval.every=10", "--eval.sequences=32", "--system.threads=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "checkpoint-10").is_dir() and time.time() < deadline:
            time.sleep(0.1)
        before = (tmp_path / "run" / "metrics.jsonl").read_text()
        with pytest.raises(UserError, match=rf"run is in use by another mlm pretrain \(host \S+, pid {first.pid}\)"):
            pretrain(cfg, resume="auto", **QUIET)
        assert (tmp_path / "run" / "metrics.jsonl").read_text().startswith(before)  # nothing truncated
    finally:
        first.kill()
        first.wait()


def test_a_diverged_run_stops_without_writing_checkpoints(data_dirs, tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run", steps=40)
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.grad_clip = 1e6, 0, 0.0
    cfg.run.checkpoint_every, cfg.run.log_every = 1, 5
    with pytest.raises(UserError, match=r"training diverged: \d+ steps? in a row had a NaN or infinite loss or gradient norm by step \d+"):
        pretrain(cfg, **QUIET)
    for checkpoint in (tmp_path / "run").glob("checkpoint-*"):  # the ones written before it diverged are sound
        assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / "model.safetensors")).values())


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated weights": (lambda c: _truncate(c / "model.safetensors"), "SafetensorError"),
    "missing weights": (lambda c: (c / "model.safetensors").unlink(), "model.safetensors is missing"),
    "empty training state": (lambda c: (c / "training_state.pt").write_bytes(b""), "training_state.pt is empty or cut short"),
    "truncated training state": (lambda c: _truncate(c / "training_state.pt"), "training_state.pt is empty or cut short|RuntimeError|Unpickling"),
    "invalid config.json": (lambda c: (c / "config.json").write_text("{oops"), "JSONDecodeError"),
    "pickled objects": (lambda c: torch.save({"step": datetime.datetime.now()}, c / "training_state.pt"),
                        "training_state.pt holds objects other than tensors and numbers \\(refused"),
    "truncated engine shard": (lambda c: _truncate(next((c / "engine").glob("*.distcp"))), r"__0_0.distcp is truncated"),
    # Same size, sound headers: only the checksums written with the checkpoint can tell.
    "a flipped byte in the weights": (lambda c: _flip_a_byte(c / "model.safetensors"),
                                      r"model.safetensors does not match its checksum"),
    "a flipped byte in an engine shard": (lambda c: _flip_a_byte(next((c / "engine").glob("*.distcp"))),
                                          r"engine/__0_0.distcp does not match its checksum"),
    "missing checksums": (lambda c: (c / "checksums.json").unlink(), "checksums.json is missing"),
    # A checkpoint-<step> folder is only ever made whole (renamed from a temporary one): without its training
    # state it is damaged, and named, rather than passed by in silence.
    "missing training state": (lambda c: (c / "training_state.pt").unlink(), "training_state.pt is missing"),
    "checksums not an object": (lambda c: (c / "checksums.json").write_text("[]"), r"checksums.json is damaged"),
    # What folders renamed or swapped by hand look like: the state of step 10 under the name checkpoint-20.
    "another step's state": (lambda c: shutil.copy(c.parent / "checkpoint-10" / "training_state.pt", c),
                             "it holds step 10, not 20 as its name says"),
}


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0x01  # past the header, inside the tensors
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def finished_run(data_dirs, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    pretrain(tiny_config(data_dirs["roberta"], run, steps=20), **QUIET)
    return run


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_and_auto_resume_falls_back(damage, finished_run, data_dirs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for line in ("metrics.jsonl",):  # as if killed at step 20, with the checkpoint write damaged
        (run / line).write_text("".join(l + "\n" for l in (finished_run / line).read_text().splitlines() if json.loads(l)["step"] <= 20))
    breaks, message = DAMAGE[damage]
    breaks(run / "checkpoint-20")
    cfg = tiny_config(data_dirs["roberta"], run, steps=20)
    with pytest.raises(UserError, match=rf"--resume: .*checkpoint-20 is damaged \(.*(?:{message}).*\): give an earlier "
                                        r"checkpoint, or use --resume=auto"):
        pretrain(cfg, resume="latest", **QUIET)
    lines = []
    pretrain(cfg, resume="auto", log=lines.append)
    assert any(re.search(rf"warning: .*checkpoint-20 is damaged \(.*(?:{message}).*\): skipping it", line) for line in lines)
    assert losses(run) == losses(finished_run)  # continued from checkpoint-10 exactly as the unbroken run


def test_init_from_a_checkpoint_with_custom_code_is_refused(data_dirs, tmp_path):
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "config.json").write_text(json.dumps(
        {"model_type": "evil", "auto_map": {"AutoModelForMaskedLM": "modeling_evil.EvilForMaskedLM"}}))
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run")
    cfg.model.init_from = str(tmp_path / "evil")
    with pytest.raises(UserError, match=r"evil: cannot load it as a model without running its code"):
        pretrain(cfg, **QUIET)
    assert not (tmp_path / "run").exists()


def test_glue_jobs_run_one_at_a_time(tmp_path):
    """Checkpoints that come while a GLUE job runs wait and go together into the next job; none is lost."""
    from mlm.train.pretrain import GlueQueue

    class Job:
        def __init__(self, steps):
            self.steps, self.done = steps, False

        def poll(self):
            return 0 if self.done else None

    started = []
    cfg = load_config(None, ["--eval.glue_every=1", "--run.checkpoint_every=10"])
    queue = GlueQueue(cfg, tmp_path, launch=lambda steps: started.append(Job(list(steps))) or started[-1])
    queue.add(10)
    queue.add(20)
    queue.add(30)  # the first job still runs: 20 and 30 wait
    assert [job.steps for job in started] == [[10]]
    assert queue.busy_steps() == {10, 20, 30}  # run.keep_checkpoints leaves these alone
    started[0].done = True
    queue.start_if_idle()
    assert [job.steps for job in started] == [[10], [20, 30]]
    queue.add(40)
    queue.finish()  # training is over: 40 starts now
    assert [job.steps for job in started] == [[10], [20, 30], [40]]
    every_other = GlueQueue(load_config(None, ["--eval.glue_every=2", "--run.checkpoint_every=10"]), tmp_path,
                            launch=lambda steps: started.append(Job(list(steps))) or started[-1])
    for step in (10, 20, 30, 40):
        every_other.add(step)
    every_other.finish()
    assert [job.steps for job in started[3:]] == [[20], [40]]


def test_a_token_budget_fixes_the_steps_and_scales_warm_up(data_dirs, tmp_path):
    # 16 sequences × 32 tokens = 512 tokens per step: 10,000 tokens fit 19 steps; warm-up keeps 3/30 of them.
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run", steps=30, budget="1e4 tokens")
    summary = pretrain(cfg, **QUIET)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert summary["steps"] == recorded["steps"] == 19 and recorded["warmup_steps"] == 2
    assert recorded["budget"] == "1e4 tokens"
    assert sorted(losses(tmp_path / "run")) == list(range(1, 20))


@pytest.mark.slow
def test_a_time_budget_trains_exactly_like_the_steps_it_fixed(data_dirs, tmp_path):
    """The timing steps are taken back: the budgeted run equals a plain run of the steps it chose, and a
    resumed budgeted run keeps them."""

    def config(out, **train):
        cfg = tiny_config(data_dirs["roberta"], tmp_path / out, seed=3, **train)
        cfg.model.dropout = 0.1  # the dropout stream is set back too
        cfg.run.checkpoint_every = 10_000  # the last step only
        return cfg

    logged = []
    summary = pretrain(config("budget", steps=30, budget="15s"), log=logged.append)
    steps = summary["steps"]
    recorded = json.loads((tmp_path / "budget" / "config.json").read_text())["train"]
    assert recorded["steps"] == steps > 3
    assert recorded["warmup_steps"] == round(3 * steps / 30)
    assert any(line.startswith("budget 15s: ") and f"train.steps={steps:,}" in line for line in logged)
    assert logged[-2].startswith(f"budget 15s: training used ") and f" + {steps} steps and " in logged[-2]

    plain = config("plain", steps=steps)
    plain.train.warmup_steps = recorded["warmup_steps"]
    pretrain(plain, **QUIET)
    assert losses(tmp_path / "budget") == losses(tmp_path / "plain")

    # Resuming with the same budget keeps the fixed schedule instead of measuring again: the run is finished.
    resumed = pretrain(config("budget", steps=30, budget="15s"), resume="latest", **QUIET)
    assert resumed["finished"] and resumed["steps"] == steps


def test_bad_and_impossible_budgets_are_one_line(data_dirs, tmp_path):
    with pytest.raises(UserError, match="train.budget: cannot read '8 parsecs'"):
        load_config(None, ["--train.budget=8 parsecs"])
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run", budget="100 tokens")
    with pytest.raises(UserError, match="does not fit one step"):
        pretrain(cfg, **QUIET)


def test_a_checkpoint_tokenizer_carries_the_model_length(data_dirs, family, tmp_path):
    """Plain transformers: truncation=True cuts to the model's positions, and fill-mask takes a text longer
    than the model (it would index past the position table otherwise)."""
    from transformers import AutoTokenizer, pipeline

    from conftest import make_documents

    cfg = tiny_config(data_dirs[family], tmp_path / "run", family, steps=2)
    pretrain(cfg, **QUIET)
    checkpoint = str(tmp_path / "run" / "checkpoint-2")
    tok = AutoTokenizer.from_pretrained(checkpoint)
    assert tok.model_max_length == 64  # model.max_positions of tiny_config
    long_text = f"The cat {tok.mask_token} a red ball. " + " ".join(make_documents(100))
    assert len(tok(long_text, truncation=True)["input_ids"]) == 64
    fill = pipeline("fill-mask", model=checkpoint, device="cpu")
    assert len(fill(long_text, top_k=3, tokenizer_kwargs={"truncation": True})) == 3


class ControlledClock:
    """A clock the test moves: each timed step and evaluation advances it by a set number of seconds."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_time_budget_leaves_first_step_and_first_evaluation_costs_out_of_its_estimate(data_dirs, tmp_path):
    """Step 0 and the first evaluation pay for compilation and allocation: the estimate counts neither, times
    at least 5 steps after the first over 5% of the budget, and the evaluations at every eval.every steps."""
    from mlm.train import pretrain as loop
    from mlm.train.budget import fit_to_budget

    clock = ControlledClock()
    step_costs = iter([3.0] + [1.0] * 100)  # step 0 compiles; then 1 s a step
    eval_costs = iter([4.0, 2.0])  # the first evaluation allocates; then 2 s

    def train_step(s, step):
        clock.now += next(step_costs)
        return loop.train_step(s, step)

    def evaluate(s):
        clock.now += next(eval_costs)
        return loop.evaluate(s)

    s = loop.setup(tiny_config(data_dirs["roberta"], tmp_path / "run", steps=30, budget="100s"), **QUIET)
    try:
        logged = []
        plan = fit_to_budget(s, logged.append, train_step, evaluate, clock=clock)
    finally:
        s.batches.close()
        s.run_lock.release()
    # Timing: 3 + 5 × 1 s of steps (5 s = 5% of the budget reached), then evaluations of 4 and 2 s: 14 s.
    assert (plan.timing_s, plan.step_s, plan.eval_s) == (14.0, 1.0, 2.0)
    # 86 s left; 2 s for the evaluations at step 0 and the last; each step 1 s + 2 s / eval.every (10).
    assert plan.steps == s.cfg.train.steps == int((86 - 2 * 2) // 1.2) == 68
    assert s.cfg.train.warmup_steps == round(3 * 68 / 30)
    assert "timing 6 steps at 1s per step and 2s per evaluation; the step count is fixed from this speed" in logged[0]
    assert len(logged) == 1  # steady steps: no warning


def test_a_time_budget_timed_on_unsteady_steps_says_the_budget_may_be_missed(data_dirs, tmp_path):
    from mlm.train import pretrain as loop
    from mlm.train.budget import fit_to_budget

    clock = ControlledClock()
    step_costs = iter([2.0, 1.0, 3.0] * 10)  # another process takes a core now and then

    def train_step(s, step):
        clock.now += next(step_costs)
        return loop.train_step(s, step)

    s = loop.setup(tiny_config(data_dirs["roberta"], tmp_path / "run", steps=30, budget="100s"), **QUIET)
    s.cfg.eval.every = 0
    try:
        logged = []
        plan = fit_to_budget(s, logged.append, train_step, loop.evaluate, clock=clock)
    finally:
        s.batches.close()
        s.run_lock.release()
    assert plan.step_s == 2.0  # the median of 1, 3, 2, 1, 3
    assert logged[1] == ("warning: the timed steps were 3.0× apart (slowest / fastest): the machine's load is changing, "
                         "so the run may end well before or after its budget; on a machine shared with other work, "
                         "fewer threads (system.threads=1) may give a steadier speed")


def test_a_time_budget_stops_timing_slow_steps_at_a_fifth_of_the_budget(data_dirs, tmp_path):
    from mlm.train import pretrain as loop
    from mlm.train.budget import fit_to_budget

    clock = ControlledClock()

    def train_step(s, step):
        clock.now += 6.0
        return loop.train_step(s, step)

    s = loop.setup(tiny_config(data_dirs["roberta"], tmp_path / "run", steps=30, budget="60s"), **QUIET)
    s.cfg.eval.every = 0
    try:
        plan = fit_to_budget(s, lambda _: None, train_step, loop.evaluate, clock=clock)
    finally:
        s.batches.close()
        s.run_lock.release()
    assert plan.timing_s == 12.0 and plan.steps == int(48 // 6)  # two steps: 12 s ≥ 20% of 60 s


def test_the_end_of_a_budgeted_run_says_the_budget_the_time_used_and_why_they_differ():
    from mlm.train.budget import BudgetPlan, budget_report

    plan = BudgetPlan("90s", 90.0, timing_s=14.0, step_s=3.5, eval_s=0.0, steps=21)
    line = budget_report(plan, trained_s=11.5, steps=21, evaluations=0)
    assert line.startswith("budget 90s: training used 25.5s (timing 14.0s + 21 steps and 0 evaluations 11.5s): "
                           "less than the budget because the steps took 0.548s each")
    assert "against the 3.5s measured at the start" in line and "fixed from the speed measured at the start" in line
    assert budget_report(plan, trained_s=74.0, steps=21, evaluations=0).endswith(", within 10% of the budget")
    assert "1 step and 1 evaluation" in budget_report(plan, trained_s=200.0, steps=1, evaluations=1)
    assert "more than the budget" in budget_report(plan, trained_s=200.0, steps=21, evaluations=0)


def test_a_run_ends_with_its_time_losses_final_checkpoint_and_loss_curve(data_dirs, tmp_path):
    logged = []
    summary = pretrain(tiny_config(data_dirs["roberta"], tmp_path / "run", steps=12), log=logged.append)
    assert re.fullmatch(
        rf"finished 12 steps in 0:00:\d\d: train loss {summary['train_loss']:.4f}, validation loss "
        rf"{summary['val_loss']:.4f}; final checkpoint {re.escape(str(tmp_path / 'run' / 'checkpoint-12'))}",
        logged[-1])
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 0


def test_the_loss_curve_draws_every_validation_source():
    from mlm.train.metrics import loss_curves

    records = [{"step": 0, "val_loss": 9.0, "val_loss/wiki": 9.2}, {"step": 1, "loss": 8.0},
               {"step": 2, "loss": 7.0, "val_loss": 7.4, "val_loss/books": 7.5, "val_loss/wiki": 7.3}]
    assert loss_curves(records) == {
        "training": [(1, 8.0), (2, 7.0)], "validation": [(0, 9.0), (2, 7.4)],
        "validation (books)": [(2, 7.5)], "validation (wiki)": [(0, 9.2), (2, 7.3)],
    }


def test_a_budget_run_resumes_without_repeating_the_budget_and_a_finished_one_says_so(data_dirs, tmp_path):
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run", steps=30, budget="1e4 tokens")  # 19 steps
    pretrain(cfg, **QUIET)
    shutil.rmtree(tmp_path / "run" / "checkpoint-19")  # as if stopped after checkpoint-10
    again = tiny_config(data_dirs["roberta"], tmp_path / "run", steps=30)  # the recipe, without --train.budget
    logged = []
    assert pretrain(again, resume="latest", log=logged.append)["steps"] == 19
    assert any("resuming from" in line and "at step 10" in line for line in logged)
    assert sorted(losses(tmp_path / "run")) == list(range(1, 20))

    for resume in ("latest", "auto"):
        logged = []
        summary = pretrain(again, resume=resume, log=logged.append)
        assert summary["finished"] and summary["steps"] == 19
        assert len(logged) == 1  # said before the model is built: one line
        assert logged[-1] == (
            f"{tmp_path / 'run'} is finished: {tmp_path / 'run' / 'checkpoint-19'} holds its last step (19 of "
            "train.steps=19), so there is nothing to resume. To train on, start a new run from its weights with a "
            f"fresh schedule: --model.init_from={tmp_path / 'run' / 'checkpoint-19'} --run.out_dir=NEW_FOLDER")


@pytest.mark.parametrize("budget", ["1 token", "0.001s"])
def test_a_budget_that_fits_no_step_leaves_no_run_folder(data_dirs, tmp_path, budget):
    cfg = tiny_config(data_dirs["roberta"], tmp_path / "run", budget=budget)
    with pytest.raises(UserError, match=f"train.budget={budget} does not fit one step"):
        pretrain(cfg, **QUIET)
    assert not (tmp_path / "run").exists()
