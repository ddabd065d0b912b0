"""Learning-rate schedules (train.schedule linear, cosine, wsd) and the wsd runs they allow: one that grows
while its decay has not begun, and decays branched from its stable phase into folders of their own."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM

from mlm.config import PretrainConfig, TrainConfig, load_config, save_config
from mlm.errors import UserError
from mlm.train.metrics import read_metrics
from mlm.train.optim import decay_start, learning_rate, lr_factor
from mlm.train.pretrain import pretrain
from mlm.train.run_folder import CONFIG_FILE, recipe_differences

from conftest import tiny_config

QUIET = {"log": lambda _: None}


def rates(steps: int, **train) -> list[float]:
    cfg = TrainConfig(steps=steps, lr=1.0, **train)
    return [learning_rate(step, cfg) for step in range(steps)]


# ---- the schedules' values ----------------------------------------------------------------------------


def test_linear_is_the_reference():
    # 10 steps, 2 of warm-up: (k+1)/2, then (10-k)/8.
    assert rates(10, warmup_steps=2) == pytest.approx([0.5, 1, 1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    assert TrainConfig().schedule == "linear" and TrainConfig().min_lr == 0.0
    # Bit for bit the reference's peak × lr_factor (what the loop computed before there were schedules).
    for lr, warmup, steps in ((1e-3, 1800, 30_000), (2e-3, 3, 30), (5e-4, 0, 7), (1e-3, 10, 10)):
        cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=warmup)
        assert all(learning_rate(k, cfg) == lr * lr_factor(k, warmup, steps) for k in range(steps))


def test_cosine():
    # After 2 warm-up steps, half a cosine over 8: 0.5 (1 + cos(pi (k-2)/8)).
    expected = [0.5, 1, 1, 0.96194, 0.85355, 0.69134, 0.5, 0.30866, 0.14645, 0.03806]
    assert rates(10, warmup_steps=2, schedule="cosine") == pytest.approx(expected, abs=1e-5)


def test_wsd_linear_and_1_sqrt():
    # Warm-up 2, stable at the peak, decay over the last 4 steps (from step 6).
    assert rates(10, warmup_steps=2, schedule="wsd", decay_steps=4) == pytest.approx(
        [0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25])
    # 1 - sqrt(done): 1 - sqrt(1/4), 1 - sqrt(2/4), 1 - sqrt(3/4).
    assert rates(10, warmup_steps=2, schedule="wsd", decay_steps=4, decay_shape="1-sqrt") == pytest.approx(
        [0.5, 1, 1, 1, 1, 1, 1, 0.5, 0.29289, 0.13397], abs=1e-5)
    assert decay_start(TrainConfig(steps=10, warmup_steps=2, schedule="wsd", decay_steps=4)) == 6
    # A decay over everything after the warm-up is the linear schedule.
    assert rates(10, warmup_steps=2, schedule="wsd", decay_steps=8) == pytest.approx(rates(10, warmup_steps=2))


def test_min_lr_is_the_floor_every_decay_ends_at():
    # lr 1, min_lr 0.1: min_lr + 0.9 × the decay's share; the warm-up still starts from 0.
    assert rates(10, warmup_steps=2, min_lr=0.1)[:4] == pytest.approx([0.5, 1, 1, 0.1 + 0.9 * 0.875])
    assert rates(10, warmup_steps=2, min_lr=0.1, schedule="wsd", decay_steps=4)[6:] == pytest.approx(
        [1, 0.775, 0.55, 0.325])
    assert rates(10, warmup_steps=2, min_lr=0.1, schedule="cosine")[-1] == pytest.approx(0.1 + 0.9 * 0.03806, abs=1e-5)
    for schedule, extra in (("linear", {}), ("cosine", {}), ("wsd", {"decay_steps": 4})):
        cfg = TrainConfig(steps=10, lr=1.0, warmup_steps=2, min_lr=0.1, schedule=schedule, **extra)
        assert learning_rate(10, cfg) == pytest.approx(0.1)  # where the run ends
        assert min(learning_rate(k, cfg) for k in range(2, 10)) > 0.1


@pytest.mark.parametrize("overrides, message", [
    (["--train.schedule=step"], "train.schedule: unknown schedule 'step' (choose linear, cosine, wsd)"),
    (["--train.schedule=wsd"], "train.schedule=wsd needs train.decay_steps"),
    (["--train.schedule=wsd", "--train.decay_steps=1", "--train.decay_shape=sqrt"],
     "train.decay_shape: unknown shape 'sqrt' (choose linear, 1-sqrt)"),
    (["--train.decay_steps=100"], "train.decay_steps applies to train.schedule=wsd only (this run's is linear)"),
    (["--train.schedule=cosine", "--train.decay_shape=1-sqrt"], "train.decay_shape applies to train.schedule=wsd only"),
    (["--train.schedule=wsd", "--train.steps=100", "--train.warmup_steps=10", "--train.decay_steps=91"],
     "train.warmup_steps + train.decay_steps = 10 + 91 is more than train.steps=100"),
    (["--train.schedule=wsd", "--train.decay_steps=-1"], "train.decay_steps must be >= 0, got -1"),
    (["--train.min_lr=0.1"], "train.min_lr must be in [0, train.lr=0.001], got 0.1"),
    (["--train.min_lr=nan"], "train.min_lr must be a finite number, got nan"),
])
def test_bad_schedule_settings_are_one_line(overrides, message):
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


# ---- runs that grow, decays that branch ---------------------------------------------------------------


def losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


def logged_lrs(run_dir) -> dict[int, float]:
    return {m["step"]: m["lr"] for m in read_metrics(run_dir) if "lr" in m}


def wsd_config(data_dir, out_dir, steps: int, decay_steps: int = 5, **train) -> PretrainConfig:
    """The tiny recipe under wsd (warm-up 3, checkpoints every 10 steps), dropout 0: the losses depend only
    on the data, the masks and the rates."""
    cfg = tiny_config(data_dir, out_dir, steps=steps, schedule="wsd", decay_steps=decay_steps, **train)
    cfg.model.dropout = 0.0
    return cfg


def folder_bytes(folder: Path) -> dict[str, str]:
    """Every file under `folder` by relative path: its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return AutoModelForMaskedLM.from_pretrained(str(checkpoint)).state_dict()


def stopped_copy(run: Path, step: int, to: Path) -> Path:
    """The folder `run` had right after its checkpoint of `step`: that checkpoint, config.json, the records."""
    to.mkdir()
    shutil.copytree(run / f"checkpoint-{step}", to / f"checkpoint-{step}")
    shutil.copy(run / CONFIG_FILE, to / CONFIG_FILE)
    records = [line for line in (run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (to / "metrics.jsonl").write_text("".join(line + "\n" for line in records))
    return to


@pytest.fixture(scope="module")
def wsd_runs(data_dirs, tmp_path_factory) -> dict[str, Path]:
    """A wsd run of 20 steps (decay over the last 5, from step 15) and one planned 30 steps from the start."""
    root = tmp_path_factory.mktemp("wsd")
    for name, steps in (("short", 20), ("planned", 30)):
        pretrain(wsd_config(data_dirs["roberta"], root / name, steps), **QUIET)
    return {"short": root / "short", "planned": root / "planned", "root": root}


def test_a_wsd_run_grown_in_its_stable_phase_trains_like_one_planned_that_long(wsd_runs, data_dirs, tmp_path):
    # The 20-step run stopped after its step-10 checkpoint (its decay begins at step 15), resumed towards 30.
    grown = stopped_copy(wsd_runs["short"], 10, tmp_path / "grown")
    longer = wsd_config(data_dirs["roberta"], grown, steps=30)
    pretrain(longer, resume="latest", **QUIET)
    planned = wsd_runs["planned"]
    assert losses(grown) == losses(planned) and sorted(losses(grown)) == list(range(1, 31))
    assert logged_lrs(grown) == logged_lrs(planned)
    assert json.loads((grown / CONFIG_FILE).read_text())["train"]["steps"] == 30  # the run records its new length
    final, expected = weights(grown / "checkpoint-30"), weights(planned / "checkpoint-30")
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_growing_after_the_decay_began_is_refused_in_one_line(wsd_runs, data_dirs, tmp_path):
    """The finished 20-step run's newest checkpoint is past its decay's start (step 15): growing it is refused,
    naming the stable-phase checkpoint to branch from; nothing in the folder changes."""
    run = tmp_path / "short"
    shutil.copytree(wsd_runs["short"], run)
    before = folder_bytes(run)
    cfg = wsd_config(data_dirs["roberta"], run, steps=30)
    overrides = [f"--{section}.{key}={json.dumps(value)}" for section, values in cfg.recipe().items()
                 for key, value in values.items() if key not in ("betas", "init_from") and value != ""]
    overrides += ["--system.device=cpu", "--system.compile=off", "--system.micro_batch=8", f"--run.out_dir={run}",
                  "--run.progress=false"]
    result = subprocess.run([sys.executable, "-m", "mlm", "pretrain", *overrides, "--resume"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: --resume: the wsd run in ") and "checkpoint-20: its decay began at step 15 " \
        "(train.steps - train.decay_steps = 20 - 5), before step 20" in lines[0], lines[0]
    assert f"--resume={run / 'checkpoint-10'} --run.out_dir=NEW_FOLDER --train.steps=M" in lines[0]
    assert f"--model.init_from={run / 'checkpoint-20'} --run.out_dir=NEW_FOLDER" in lines[0]
    assert folder_bytes(run) == before and sorted(p.name for p in run.iterdir()) == sorted(
        p.name for p in wsd_runs["short"].iterdir())


def test_a_new_end_must_leave_the_steps_taken_before_its_decay(wsd_runs, data_dirs, tmp_path):
    stopped = stopped_copy(wsd_runs["short"], 10, tmp_path / "stopped")
    before = folder_bytes(stopped)
    with pytest.raises(UserError, match=r"train.steps=12 with train.decay_steps=5 would begin the decay at step 7, "
                                        r"before step 10: give train.steps of at least 15"):
        pretrain(wsd_config(data_dirs["roberta"], stopped, steps=12), resume="latest", **QUIET)
    with pytest.raises(UserError, match=r"holds this wsd run with another end \(differs in train.steps\): pass --resume"):
        pretrain(wsd_config(data_dirs["roberta"], stopped, steps=30), **QUIET)
    # An older checkpoint of a folder holding later ones: the new end goes to a folder of its own.
    run = tmp_path / "short"
    shutil.copytree(wsd_runs["short"], run)
    with pytest.raises(UserError, match=r"holds checkpoints after checkpoint-10 \(up to checkpoint-20\), trained for "
                                        r"the recorded end: .*--resume=.*checkpoint-10 --run.out_dir=NEW_FOLDER"):
        pretrain(wsd_config(data_dirs["roberta"], run, steps=30), resume=str(run / "checkpoint-10"), **QUIET)
    assert folder_bytes(stopped) == before and folder_bytes(run) == folder_bytes(wsd_runs["short"])
    # A config.json edited by hand is named, never a traceback.
    recorded = json.loads((stopped / CONFIG_FILE).read_text())
    recorded["train"]["decay_steps"] = "five"
    (stopped / CONFIG_FILE).write_text(json.dumps(recorded))
    with pytest.raises(UserError, match=r"its config.json records no whole train.steps and train.decay_steps"):
        pretrain(wsd_config(data_dirs["roberta"], stopped, steps=30), resume="latest", **QUIET)
    # Another schedule is another recipe, as before.
    with pytest.raises(UserError, match=r"already holds a different run \(differs in .*train.schedule, "):
        pretrain(tiny_config(data_dirs["roberta"], stopped, steps=20), resume="latest", **QUIET)


def test_a_decay_branched_from_the_stable_phase_trains_in_its_own_folder(wsd_runs, data_dirs, tmp_path):
    """checkpoint-10 of the 30-step run (its decay begins at 25) branches a 1-sqrt decay over steps 10-14 into a
    new folder, with the optimizer state: it trains exactly as a run planned 15 steps, and the source run's
    files stay byte for byte as they were."""
    source = wsd_runs["planned"]
    before = folder_bytes(source)
    branch = wsd_config(data_dirs["roberta"], tmp_path / "branch", steps=15, decay_shape="1-sqrt")
    pretrain(branch, resume=str(source / "checkpoint-10"), **QUIET)
    assert folder_bytes(source) == before
    planned = wsd_config(data_dirs["roberta"], tmp_path / "planned-15", steps=15, decay_shape="1-sqrt")
    pretrain(planned, **QUIET)
    branched = losses(tmp_path / "branch")
    assert sorted(branched) == list(range(11, 16))
    assert branched == {step: loss for step, loss in losses(tmp_path / "planned-15").items() if step > 10}
    final, expected = weights(tmp_path / "branch" / "checkpoint-15"), weights(tmp_path / "planned-15" / "checkpoint-15")
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    recorded = json.loads((tmp_path / "branch" / CONFIG_FILE).read_text())["train"]
    assert (recorded["steps"], recorded["decay_shape"]) == (15, "1-sqrt")


def test_a_branch_from_inside_the_decay_is_refused(wsd_runs, data_dirs, tmp_path):
    source = wsd_runs["short"]  # its decay began at step 15: checkpoint-20 is past it
    before = folder_bytes(source)
    with pytest.raises(UserError, match=r"--resume: .*checkpoint-20 cannot start a run of another end \(differs in "
                                        r"train.steps\) from the wsd run in .*: its decay began at step 15 .*; branch from a checkpoint "
                                        r"before its decay \(the latest: .*checkpoint-10\), or start a new run from its "
                                        r"weights with --model.init_from=.*checkpoint-20$"):
        pretrain(wsd_config(data_dirs["roberta"], tmp_path / "branch", steps=40), resume=str(source / "checkpoint-20"),
                 **QUIET)
    # From the stable phase too, the branch's own decay must begin at or after the checkpoint ...
    with pytest.raises(UserError, match=r"train.steps=12 with train.decay_steps=5 would begin the decay at step 7, "
                                        r"before step 10: give train.steps of at least 15"):
        pretrain(wsd_config(data_dirs["roberta"], tmp_path / "branch", steps=12), resume=str(source / "checkpoint-10"),
                 **QUIET)
    # ... and a branch changes only where and how the run ends.
    other_lr = wsd_config(data_dirs["roberta"], tmp_path / "branch", steps=15, lr=1e-3)
    with pytest.raises(UserError, match=r"belongs to the run in .*, which differs from this one .* in train.steps, train.lr: "):
        pretrain(other_lr, resume=str(source / "checkpoint-10"), **QUIET)
    assert not (tmp_path / "branch").exists() and folder_bytes(source) == before


def test_a_run_recorded_before_the_schedules_existed_is_the_same_recipe(tmp_path):
    cfg = tiny_config(tmp_path / "data", tmp_path / "run")
    save_config(cfg, tmp_path / CONFIG_FILE)
    recorded = json.loads((tmp_path / CONFIG_FILE).read_text())
    for key in ("schedule", "decay_steps", "decay_shape", "min_lr"):
        del recorded["train"][key]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(recorded))
    assert recipe_differences(tmp_path / CONFIG_FILE, cfg) == []
    cfg.train.min_lr = 1e-4
    assert recipe_differences(tmp_path / CONFIG_FILE, cfg) == ["train.min_lr"]


# ---- DeepSpeed: one rate, ours ------------------------------------------------------------------------

ZERO2 = Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / "zero2.json"


def deepspeed_config(*overrides: str) -> PretrainConfig:
    return load_config(None, ["--train.steps=100", "--train.warmup_steps=10", "--train.global_batch=32",
                              "--train.lr=5e-4", "--system.micro_batch=4", "--system.precision=bf16", *overrides])


@pytest.mark.parametrize("schedule", [
    ["--train.schedule=wsd", "--train.decay_steps=20"],
    ["--train.schedule=cosine"],
    ["--train.min_lr=1e-5"],
])
def test_deepspeed_s_auto_scheduler_leaves_every_schedule_to_mlm(schedule, tmp_path):
    """The shipped file's WarmupDecayLR ("auto" values) is dropped under every schedule: DeepSpeed steps no
    scheduler and the loop sets learning_rate() on its optimizer every step. Explicit values describe DeepSpeed's
    linear decay to 0, which is not this run's: refused by name."""
    from mlm.train.deepspeed_config import resolve_deepspeed_config

    cfg = deepspeed_config(*schedule)
    assert "scheduler" not in resolve_deepspeed_config(ZERO2, cfg, 2, "cuda")
    explicit = json.loads(ZERO2.read_text())
    explicit["scheduler"]["params"]["total_num_steps"] = 100  # equal to train.steps, but a linear decay to 0
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(explicit))
    with pytest.raises(UserError) as e:
        resolve_deepspeed_config(path, cfg, 2, "cuda")
    assert f"{path}: scheduler.params.total_num_steps=100: an explicit WarmupDecayLR describes a linear decay to 0, " \
           "not this run's train.schedule=" in str(e.value) and 'write "auto"' in str(e.value)
    # Under the reference schedule the same explicit values are ours, as before.
    assert "scheduler" not in resolve_deepspeed_config(path, deepspeed_config(), 2, "cuda")


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason='needs the deepspeed extra: pip install -e ".[deepspeed]"')
def test_deepspeed_trains_a_wsd_run_at_mlm_s_rates(data_dirs, tmp_path):
    """The shipped ZeRO-2 file (fp32 here) under wsd with a 1-sqrt decay: the same losses as one plain process,
    step for step through the decay, so DeepSpeed applied learning_rate() and no scheduler of its own."""
    config = json.loads(ZERO2.read_text())
    config["bf16"]["enabled"] = False
    zero2_fp32 = tmp_path / "zero2-fp32.json"
    zero2_fp32.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}

    def run(out: str, *extra: str) -> dict[int, float]:
        args = [f"--data.data_dir={data_dirs['roberta']}", "--model.size=tiny", "--model.max_positions=64",
                "--model.dropout=0.0", "--data.seq_len=32", "--train.steps=8", "--train.global_batch=16",
                "--train.lr=2e-3", "--train.warmup_steps=2", "--train.schedule=wsd", "--train.decay_steps=4",
                "--train.decay_shape=1-sqrt", "--train.min_lr=2e-4", "--system.micro_batch=4", "--system.device=cpu",
                "--system.compile=off", f"--run.out_dir={tmp_path / out}", "--run.log_every=1",
                "--run.checkpoint_every=8", "--run.progress=false", "--eval.every=0", *extra]
        result = subprocess.run([sys.executable, "-m", "mlm", "pretrain", *args], capture_output=True, text=True,
                                env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return losses(tmp_path / out)

    plain = run("plain")
    deepspeed = run("deepspeed", "--system.strategy=deepspeed", f"--system.deepspeed_config={zero2_fp32}")
    assert sorted(deepspeed) == list(range(1, 9))
    assert [deepspeed[s] for s in range(1, 9)] == pytest.approx([plain[s] for s in range(1, 9)], abs=1e-5)
    cfg = load_config(None, ["--train.steps=8", "--train.lr=2e-3", "--train.warmup_steps=2", "--train.schedule=wsd",
                             "--train.decay_steps=4", "--train.decay_shape=1-sqrt", "--train.min_lr=2e-4"])
    assert logged_lrs(tmp_path / "deepspeed") == {s: learning_rate(s - 1, cfg.train) for s in range(1, 9)}


@pytest.mark.slow
def test_the_schedules_plot_is_drawn_from_the_loop_s_function(tmp_path):
    """scripts/plot_schedules.py (docs/schedules.png, shown in the README) runs and draws a PNG."""
    out = tmp_path / "schedules.png"
    script = Path(__file__).resolve().parents[1] / "scripts" / "plot_schedules.py"
    result = subprocess.run([sys.executable, str(script), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "from mlm.train.optim import learning_rate" in script.read_text()
