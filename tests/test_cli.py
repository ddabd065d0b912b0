"""The command line as a user meets it: bad input gives one line on stderr and exit status 2."""

import subprocess
import sys

import pytest


def mlm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mlm", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(result, fragment) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_end_to_end_through_the_cli(tmp_path, corpus_file):
    tok, data, run = tmp_path / "tok", tmp_path / "data", tmp_path / "run"
    r = mlm("tokenizer", "--corpus", str(corpus_file), "--family", "bert", "--vocab-size", "400", "--out", str(tok))
    assert r.returncode == 0, r.stderr
    r = mlm("prepare", "--corpus", str(corpus_file), "--tokenizer", str(tok), "--out", str(data), "--workers", "1")
    assert r.returncode == 0, r.stderr
    overrides = [
        f"--data.data_dir={data}", "--model.family=bert", "--model.size=tiny", "--model.max_positions=64",
        "--data.seq_len=32", "--train.steps=4", "--train.global_batch=8", "--train.warmup_steps=1",
        "--system.micro_batch=4", "--system.device=cpu", f"--run.out_dir={run}", "--run.checkpoint_every=2",
        "--eval.every=2", "--run.progress=false",
    ]
    r = mlm("pretrain", *overrides)
    assert r.returncode == 0, r.stderr
    assert "micro_batch 4 × accumulation 2 × ranks 1 = global batch 8" in r.stdout
    assert "parameters" in r.stdout
    assert (run / "checkpoint-4" / "model.safetensors").is_file()
    r = mlm("pretrain", *[o.replace("--train.steps=4", "--train.steps=6") for o in overrides])
    assert_one_line_error(r, "is a run of another length (differs in train.steps)")
    r = mlm("pretrain", *overrides, "--resume")  # already finished: says so in one line, trains nothing, exit 0
    assert r.returncode == 0 and r.stdout.startswith(f"{run} is finished: {run / 'checkpoint-4'} holds its last step")
    assert len(r.stdout.splitlines()) == 1 and "resuming from" not in r.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["prepare", "--corpus", "/no/such/file.txt", "--tokenizer", "x", "--out", "d"], "does not exist"),
        (["tokenizer", "--corpus", "demo", "--family", "gpt", "--out", "t"], "unknown model family 'gpt'"),
        (["pretrain", "--train.lr=fast"], "train.lr: expected float, got 'fast'"),
        (["pretrain", "--trian.lr=1"], "unknown config key 'trian'"),
        (["pretrain", "missing.toml"], "config file missing.toml does not exist"),
        (["pretrain", "--data.data_dir=nowhere"], "nowhere"),
        (["pretrain", "--resume=nowhere"], "holds no checkpoint"),
        (["pretrain", "--train.budget=fast"], "train.budget: cannot read 'fast'"),
        (["pretrain", "--run.out_dir="], "run.out_dir is empty: name the run's folder"),
        (["pretrain", "--resume="], "--resume= is empty: give a checkpoint folder, latest (a bare --resume) or auto"),
        (["tokenizer", "--vocab", "300", "--out", "t"], "unrecognized arguments: --vocab 300 (see mlm tokenizer --help)"),
        (["demo", "--minutes", "0"], "--minutes must be a positive number, got 0.0"),
        (["demo", "--minutes", "inf"], "--minutes must be a positive number, got inf"),
        (["tokenizer", "--vocab-size", "1.5", "--out", "t"], "argument --vocab-size: invalid int value: '1.5' (see mlm tokenizer --help)"),
        ([], "the following arguments are required: command (see mlm --help)"),
        (["prepare", "--corpus", "c.txt", "--tokenizer", "t", "--out", "d", "--unit-mb", "nan"],
         "--unit-mb must be a number of MiB (0: automatic), got nan"),
        (["demo", "--steps", "0"], "--steps must be positive"),
        (["tokenizer", "--corpus", "demo", "--min-frequency", "-1", "--out", "t"], "--min-frequency must be >= 0, got -1"),
        (["tokenizer", "--corpus", "demo", "--model-max-length", "0", "--out", "t"],
         "--model-max-length must be between 1 and 1,000,000, got 0"),
        (["tokenizer", "--corpus", "demo", "--model-max-length", "99999999999999999999", "--out", "t"],
         "--model-max-length must be between 1 and 1,000,000, got 99999999999999999999"),
        (["prepare", "--corpus", "c.txt", "--tokenizer", "t", "--out", "d", "--workers", "100000"],
         "workers must be between 1 and 1024, got 100000"),
        (["prepare", "--corpus", "c.txt", "--tokenizer", "t", "--out", "d", "--text-field", ""],
         "--text-field is empty: name the field of .jsonl/.parquet records that holds the text"),
        (["prepare", "--finalize", "d", "--corpus", "c.txt"],
         "--finalize DIR takes no --corpus, --tokenizer or --out"),
    ],
)
def test_bad_input_one_line(tmp_path, args, fragment):
    assert_one_line_error(mlm(*args, cwd=tmp_path), fragment)
    assert not any(p.name not in ("missing.toml",) for p in tmp_path.iterdir())  # nothing written


def test_booleans_have_one_spelling_across_commands():
    from mlm.cli import build_parser

    parse = build_parser().parse_known_args
    assert parse(["glue", "--model", "m", "--progress=false"])[0].progress is False
    assert parse(["glue", "--model", "m", "--no-progress"])[0].progress is False
    assert parse(["glue", "--model", "m"])[0].progress is True
    r = mlm("pretrain", "--no-progress", "--train.stepz=3")  # the alias reaches the config, then the typo is named
    assert r.returncode == 2 and "unknown config key 'train.stepz' (did you mean train.steps?)" in r.stderr


@pytest.mark.parametrize("override, message", [
    ("--train.lr=nan", "train.lr must be a finite number, got nan"),
    ("--train.eps=nan", "train.eps must be a finite number, got nan"),
    ("--train.seed=-1", "train.seed must be >= 0, got -1"),
    ("--system.threads=-1", "system.threads must be >= 0"),
    ('--eval.glue_args="--seeds \\"1"', "eval.glue_args cannot be parsed as command-line flags"),
    ("--train.lr=1e300", "train.lr must be at most 3.4e+38 (a float32), got 1e+300"),
    ("--train.eps=0", "train.eps must be positive, got 0.0"),
    ("--train.grad_clip=-1", "train.grad_clip must be >= 0, got -1.0"),
    ('--train.budget="1e30 tokens"', "train.budget: '1e30 tokens' is more than 1e+16 tokens, beyond any real run"),
    ("--system.threads=100000", "system.threads must be at most 1024, got 100000"),
    ("--eval.sequences=0", "eval.sequences must be positive, got 0"),
    ("--eval.glue_tasks=foo", "eval.glue_tasks: unknown GLUE task 'foo'"),
    ("--data.data_dir=", "data.data_dir is empty: name the folder `mlm prepare` wrote"),
])
def test_config_values_torch_would_reject_later_are_refused_first(override, message, tmp_path):
    r = mlm("pretrain", override, f"--run.out_dir={tmp_path / 'run'}")
    assert_one_line_error(r, message)
    assert not (tmp_path / "run").exists()


def test_an_override_with_spaces_is_not_taken_for_a_file():
    r = mlm("pretrain", "--train.lr 1e-3")
    assert_one_line_error(r, "bad override '--train.lr 1e-3': use --section.key=value")


def test_an_unwritable_output_is_one_line_and_mlm_debug_shows_the_traceback(tmp_path):
    import os

    (tmp_path / "file").write_text("x")  # a folder below a file cannot be made, even by root
    args = ("tokenizer", "--corpus", "demo", "--vocab-size", "300", "--out", str(tmp_path / "file" / "tok"))
    r = mlm(*args)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert str(tmp_path / "file") in r.stderr and "Traceback" not in r.stderr
    debug = subprocess.run([sys.executable, "-m", "mlm", *args], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "MLM_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe[train]\n", "is not UTF-8 text (byte b'\\xff' at 0): save it as UTF-8"),
    (b"[[train]]\nlr = 1\n", ": [[train]] is an array of tables: write [train]"),
    (b"[train\n", "is not valid TOML"),
    (None, "is a folder: give a .toml file"),
])
def test_a_config_file_that_cannot_be_read_is_named(tmp_path, content, message):
    path = tmp_path / "recipe.toml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    result = mlm("pretrain", str(path))
    assert_one_line_error(result, message)
    assert f"config file {path}" in result.stderr


@pytest.mark.parametrize("below, message", [("", " is a file, not a folder: choose another path"),
                                            ("/run", "/run: part of this path is a file, not a folder: choose another path")])
def test_an_output_path_through_a_file_is_named(tmp_path, data_dirs, tokenizer_dirs, corpus_file, below, message):
    (tmp_path / "file").write_text("x")
    out = f"{tmp_path / 'file'}{below}"
    result = mlm("pretrain", f"--data.data_dir={data_dirs['roberta']}", "--model.size=tiny", "--model.max_positions=64",
                 "--data.seq_len=32", "--system.device=cpu", f"--run.out_dir={out}")
    assert_one_line_error(result, f"{tmp_path / 'file'}{message}")
    result = mlm("prepare", "--corpus", str(corpus_file), "--tokenizer", str(tokenizer_dirs["roberta"]), "--out", out)
    assert "is a file" in assert_one_line_error(result, str(tmp_path / "file"))
