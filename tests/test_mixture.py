"""data.sources: several prepared folders, each an exact share of every step's global batch, in its own seeded
epochs; per-source validation losses; refusals (tokenizers, weights, a resume with another mixture).

The sources are made here: "wiki" and "news" from the shared template corpus, "books" from another one (other
words, so that its loss differs), all prepared with the shared roberta tokenizer."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mlm import dist
from mlm.config import load_config
from mlm.data.loader import BatchLoader
from mlm.data.mixture import MixtureSampler, batch_shares
from mlm.data.prepare import PrepareConfig, prepare, read_manifest
from mlm.errors import UserError
from mlm.tokenizer import train_tokenizer
from mlm.train.metrics import loss_curves, read_metrics
from mlm.train.pretrain import evaluate, fit, load_data, make_sampler, pretrain, setup

from conftest import make_documents, tiny_config

QUIET = {"log": lambda _: None}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def make_book_documents(n: int, seed: int) -> list[str]:
    """Documents of another kind than conftest's: the source whose loss must differ."""
    rng = random.Random(seed)
    people = ["the knight", "a queen", "the young sailor", "an old wizard"]
    deeds = ["rides to", "dreams of", "sails past", "guards"]
    places = ["the castle", "a dark forest", "the northern sea", "the silver tower"]
    return [" ".join(f"Chapter {rng.randint(1, 40)}. {rng.choice(people).capitalize()} {rng.choice(deeds)} "
                     f"{rng.choice(places)}." for _ in range(rng.randint(2, 6))) for _ in range(n)]


def prepare_folder(root: Path, name: str, documents: list[str], tokenizer: Path) -> Path:
    (root / f"{name}.txt").write_text("\n".join(documents) + "\n")
    prepare(PrepareConfig([str(root / f"{name}.txt")], str(tokenizer), str(root / name), val_fraction=0.05, workers=1),
            **QUIET)
    return root / name


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer_dirs) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {
        "books": prepare_folder(root, "books", make_book_documents(400, 1), tokenizer_dirs["roberta"]),
        "news": prepare_folder(root, "news", make_documents(300, 3), tokenizer_dirs["roberta"]),
        "wiki": prepare_folder(root, "wiki", make_documents(800, 2), tokenizer_dirs["roberta"]),
    }


def mixture_config(sources: dict[str, Path], weights: dict[str, float], out_dir: Path, steps: int = 6, **train):
    cfg = tiny_config(sources["wiki"], out_dir, steps=steps, **train)
    return dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, data_dir="data", sources={str(sources[name]): weight for name, weight in weights.items()}))


def as_overrides(cfg) -> list[str]:
    """The config as --section.key=value flags, data.sources as a TOML inline table."""
    flags = []
    for section, values in dataclasses.asdict(cfg).items():
        for key, value in values.items():
            if isinstance(value, dict):
                value = "{" + ", ".join(f"{json.dumps(k)} = {v}" for k, v in value.items()) + "}"
            else:
                value = json.dumps(value)
            flags.append(f"--{section}.{key}={value}")
    return flags


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in records]


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    return {m["step"]: m[key] for m in read_metrics(run_dir) if key in m}


# ---- the sampler: exact shares per step, epochs per source, the same for any ranks ----------------------------


@pytest.mark.parametrize("weights, global_batch, shares", [
    ([1, 3], 16, [4, 12]),
    ([1, 1, 2], 16, [4, 4, 8]),
    ([2, 6], 16, [4, 12]),  # only the proportions count
    ([1, 3], 10, [3, 7]),  # 2.5 and 7.5: the tie goes to the earlier source
    ([1, 1, 1], 16, [6, 5, 5]),
    ([0.1, 0.2, 0.7], 10, [1, 2, 7]),  # exact arithmetic: 0.1 + 0.2 is not 0.3 in floats
])
def test_largest_remainder_shares_add_up_to_the_global_batch(weights, global_batch, shares):
    assert batch_shares(weights, global_batch) == shares


@pytest.mark.parametrize("weights, shares", [([1, 3], [4, 12]), ([1, 1, 2], [4, 4, 8])])
def test_every_step_takes_exactly_its_share_from_each_source(weights, shares):
    counts = [37, 101, 64][: len(weights)]
    sampler = MixtureSampler([f"s{i}" for i in range(len(weights))], counts, weights, global_batch=16, seed=3)
    offsets = np.cumsum([0] + counts)
    seen = [[] for _ in counts]
    for step in range(40):
        ids = sampler.global_batch_ids(step)
        assert len(ids) == 16
        for i, share in enumerate(shares):
            mine = ids[(ids >= offsets[i]) & (ids < offsets[i + 1])]
            assert len(mine) == share  # at every step, not on average
            assert (ids[sum(shares[:i]) : sum(shares[: i + 1])] == mine).all()  # concatenated in source order
            seen[i] += (mine - offsets[i]).tolist()
    for i, count in enumerate(counts):  # each source goes through its own epochs: every window once per epoch
        epochs = len(seen[i]) // count
        for epoch in range(epochs):
            assert sorted(seen[i][epoch * count : (epoch + 1) * count]) == list(range(count))
        assert sampler.epochs(40)[f"s{i}"] == pytest.approx(40 * shares[i] / count)


def test_a_step_is_found_without_the_steps_before_it():
    """Resume is O(1): step t's windows come from (seed, t) alone, whatever sampler computed steps before."""
    def make():
        return MixtureSampler(["a", "b"], [37, 101], [1, 3], global_batch=16, seed=5)
    walked = make()
    for step in range(30):
        walked.global_batch_ids(step)
    assert (make().global_batch_ids(29) == walked.global_batch_ids(29)).all()
    assert len(make().global_batch_ids(10**12)) == 16  # far into the run, at once
    assert not (make().global_batch_ids(3) == MixtureSampler(["a", "b"], [37, 101], [1, 3], 16, seed=6)
                .global_batch_ids(3)).all()


def test_a_weight_that_gets_no_window_is_refused():
    with pytest.raises(UserError, match=r"data.sources: b \(weight 1\) gets no sequence of a global batch of 16: "
                                        r"raise its weight, or train.global_batch to at least 101"):
        MixtureSampler(["a", "b"], [50, 50], [100, 1], global_batch=16, seed=0)
    MixtureSampler(["a", "b"], [50, 50], [100, 1], global_batch=101, seed=0)


def test_one_and_two_ranks_read_the_same_windows(sources, tmp_path):
    """The global batch of every step is the same token rows for 1 rank or the two ranks' slices together."""
    cfg = mixture_config(sources, {"wiki": 1, "books": 3}, tmp_path / "run")
    manifest = read_manifest(cfg.data.folders[0])
    from mlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(Path(cfg.data.folders[0]) / "tokenizer")
    train, _ = load_data(cfg, manifest, tokenizer)
    sampler = make_sampler(cfg, train)
    assert sampler.shares == [12, 4]
    one = BatchLoader(train, sampler, 0, 1, torch.device("cpu"), prefetch=False)
    two = [BatchLoader(train, sampler, rank, 2, torch.device("cpu"), prefetch=False) for rank in (0, 1)]
    for step in (0, 1, 7, 50):
        assert torch.equal(one.get(step), torch.cat([loader.get(step) for loader in two]))
    assert train.names == ["books", "wiki"]  # sorted by path: the order of the table changes nothing


# ---- training -----------------------------------------------------------------------------------------------


def test_micro_batch_4_and_8_train_alike(sources, tmp_path):
    """With dropout 0, the same windows and masks whatever the micro-batch: the same losses, per source too."""
    runs = {}
    for micro in (8, 4):
        cfg = mixture_config(sources, {"wiki": 1, "books": 3}, tmp_path / f"m{micro}", steps=4)
        cfg.system.micro_batch, cfg.model.dropout, cfg.eval.every = micro, 0.0, 4
        pretrain(cfg, **QUIET)
        runs[micro] = read_metrics(tmp_path / f"m{micro}")
    assert [m["step"] for m in runs[4]] == [m["step"] for m in runs[8]]
    for a, b in zip(runs[4], runs[8]):
        assert set(a) == set(b)
        for key in a:
            if key not in ("tokens_per_s", "step"):
                assert a[key] == pytest.approx(b[key], abs=1e-4), key


def test_a_mixture_of_one_folder_trains_as_data_dir(sources, tmp_path):
    one = tiny_config(sources["wiki"], tmp_path / "one", steps=5)
    mixed = mixture_config(sources, {"wiki": 2.5}, tmp_path / "mixed", steps=5)
    pretrain(one, **QUIET)
    pretrain(mixed, **QUIET)
    assert losses(tmp_path / "mixed") == losses(tmp_path / "one")
    assert losses(tmp_path / "mixed", "val_loss") == losses(tmp_path / "one", "val_loss")
    assert losses(tmp_path / "mixed", "val_loss/wiki") == losses(tmp_path / "one", "val_loss")


def test_epochs_and_validation_losses_per_source_are_logged(sources, tmp_path):
    cfg = mixture_config(sources, {"wiki": 1, "books": 1, "news": 2}, tmp_path / "run", steps=10)
    lines = []
    pretrain(cfg, log=lines.append)
    train, _ = load_data(cfg, read_manifest(cfg.data.folders[0]), _tokenizer(cfg))
    counts = dict(zip(train.names, (p.count for p in train.parts)))
    text = "\n".join(lines)
    assert "data: 3 sources; every step's 16 sequences: 4 from books (weight 1), 8 from news (weight 2), " \
           "4 from wiki (weight 1)" in text
    assert f"  news ({sources['news']}): {counts['news']:,} training sequences" in text
    assert f"10 steps = {10 * 8 / counts['news']:.2f} epochs" in text
    records = read_metrics(tmp_path / "run")
    for m in records:
        if "loss" in m:
            assert m["epochs/news"] == pytest.approx(m["step"] * 8 / counts["news"])
            assert m["epochs/books"] == pytest.approx(m["step"] * 4 / counts["books"])
    validation = [m for m in records if "val_loss" in m]
    assert [m["step"] for m in validation] == [0, 10]
    assert all({"val_loss/books", "val_loss/news", "val_loss/wiki"} <= set(m) for m in validation)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"val_loss", "val_loss/books", "val_loss/news", "val_loss/wiki", "epochs/news"} <= set(events.Tags()["scalars"])
    # The run's loss curve draws each source's validation loss.
    assert {"validation (books)", "validation (news)", "validation (wiki)"} <= set(loss_curves(records))
    assert (tmp_path / "run" / "loss_curve.png").is_file()


def test_a_source_seen_too_many_times_is_warned_about_by_name(sources, tmp_path):
    cfg = mixture_config(sources, {"wiki": 1, "news": 30}, tmp_path / "run", steps=1)
    train, _ = load_data(cfg, read_manifest(cfg.data.folders[0]), _tokenizer(cfg))
    news = train.parts[train.names.index("news")].count
    cfg.train.steps = cfg.train.warmup_steps = 60 * news // 15 + 1  # news: 15 of 16 sequences a step, > 50 epochs
    lines = []
    try:
        s = setup(cfg, log=lines.append)
        s.batches.close()
        s.run_lock.release()
    finally:
        dist.cleanup()
    warnings = [line for line in lines if "see the training data" in line]
    assert len(warnings) == 1 and "see the training data of news" in warnings[0] and "a lower weight" in warnings[0]


def test_per_source_validation_losses_equal_the_losses_computed_source_by_source(sources, tmp_path):
    """After training on wiki and books, each val_loss/<name> is the loss a one-folder evaluation of that folder
    gives (the model as trained, eval.sequences split 7 + 6), and val_loss their mean over the 13 sequences."""
    cfg = mixture_config(sources, {"wiki": 1, "books": 1}, tmp_path / "run", steps=8)
    cfg.eval.every, cfg.eval.sequences = 8, 13
    s = setup(cfg, **QUIET)
    try:
        fit(s, **QUIET)
        logged = [m for m in read_metrics(tmp_path / "run") if m["step"] == 8 and "val_loss" in m][0]
        by_source = {}
        for name, sequences in (("books", 7), ("wiki", 6)):  # sorted by path: books first, and its extra sequence
            one = tiny_config(sources[name], tmp_path / name)
            one.eval.sequences = sequences
            _, validation = load_data(one, read_manifest(sources[name]), s.tokenizer)
            by_source[name] = evaluate(dataclasses.replace(s, cfg=one, validation=validation))["val_loss"]
    finally:
        s.batches.close()
        s.run_lock.release()
        dist.cleanup()
    assert logged["val_loss/books"] == pytest.approx(by_source["books"], abs=1e-6)
    assert logged["val_loss/wiki"] == pytest.approx(by_source["wiki"], abs=1e-6)
    assert abs(by_source["books"] - by_source["wiki"]) > 0.05  # the two differ: a swap would show
    assert logged["val_loss"] == pytest.approx((7 * by_source["books"] + 6 * by_source["wiki"]) / 13, abs=1e-6)


def _tokenizer(cfg):
    from mlm.tokenizer import load_tokenizer

    return load_tokenizer(Path(cfg.data.folders[0]) / "tokenizer")


# ---- refusals -------------------------------------------------------------------------------------------------


def test_sources_as_a_toml_table_and_inline_on_the_command_line(tmp_path):
    recipe = tmp_path / "mix.toml"
    recipe.write_text('[data.sources]\n"data/wiki" = 1\n"data/books" = 3\n')
    assert load_config(recipe).data.sources == {"data/wiki": 1.0, "data/books": 3.0}
    inline = load_config(None, ['--data.sources={"data/wiki" = 1, "data/books" = 3}'])
    assert inline.data.sources == {"data/wiki": 1.0, "data/books": 3.0}
    assert inline.data.folders == ["data/books", "data/wiki"]
    # Over a shipped recipe, which names its one folder: --data.data_dir= leaves it out.
    over = load_config("configs/roberta-medium.toml", ["--data.data_dir=", '--data.sources={"data/wiki" = 1}'])
    assert over.data.folders == ["data/wiki"] and over.data.data_dir == "data"
    with pytest.raises(UserError, match="data.data_dir=data/roberta and data.sources are both set"):
        load_config("configs/roberta-medium.toml", ['--data.sources={"data/wiki" = 1}'])
    with pytest.raises(UserError, match="data.data_dir is empty"):
        load_config(None, ["--data.data_dir="])


@pytest.mark.parametrize("overrides, message", [
    (['--data.sources={"data/wiki" = 1}', "--data.data_dir=data/books"],
     "data.data_dir=data/books and data.sources are both set: list every folder in data.sources and leave "
     "data.data_dir out (over a recipe that sets it: --data.data_dir=)"),
    (['--data.sources={"data/wiki" = 0}'], "data.sources: the weight of data/wiki must be a positive finite number, got 0.0"),
    (['--data.sources={"data/wiki" = -1}'], "must be a positive finite number, got -1.0"),
    (['--data.sources={"data/wiki" = inf}'], "must be a positive finite number, got inf"),
    (['--data.sources={"data/wiki" = nan}'], "must be a positive finite number, got nan"),
    (['--data.sources={"data/wiki" = "x"}'], "data.sources 'data/wiki': expected float, got 'x'"),
    (["--data.sources=3"], "data.sources: expected a table of str = float"),
    (['--data.sources={"a/wiki" = 1, "b/wiki" = 1}'], "a/wiki and b/wiki are both named 'wiki'"),
    (['--data.sources={"." = 1}'], "'.' names no folder of its own"),
])
def test_bad_sources_are_refused_in_one_line(overrides, message):
    with pytest.raises(UserError) as error:
        load_config(None, overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_fewer_validation_sequences_than_sources_are_refused(sources, tmp_path):
    cfg = mixture_config(sources, {"wiki": 1, "books": 1, "news": 1}, tmp_path / "run")
    cfg.eval.sequences = 2
    with pytest.raises(UserError, match=r"eval.sequences=2 is fewer than the 3 folders of data.sources with validation "
                                        r"data: each folder's validation loss needs a sequence"):
        pretrain(cfg, **QUIET)
    assert not (tmp_path / "run").exists()


def test_sources_prepared_with_different_tokenizers_are_refused(sources, tmp_path, tokenizer_dirs):
    other = tmp_path / "tok-other"
    train_tokenizer(make_documents(1500), "roberta", 300, other)
    folder = prepare_folder(tmp_path, "zz-other", make_documents(200, 9), other)  # sorts after wiki
    cfg = mixture_config(sources, {"wiki": 1}, tmp_path / "run")
    cfg.data.sources[str(folder)] = 1.0
    with pytest.raises(UserError) as error:
        pretrain(cfg, **QUIET)
    first = sorted(cfg.data.sources)[0]
    message = str(error.value)
    assert message.startswith(f"data.sources: {folder} was prepared with tokenizer {str(other)!r} (fingerprint ")
    assert f"but {first} with {str(tokenizer_dirs['roberta'])!r} (fingerprint " in message
    assert "\n" not in message and not (tmp_path / "run").exists()


def test_a_resume_with_other_weights_is_refused_and_a_new_phase_may_change_them(sources, tmp_path):
    cfg = mixture_config(sources, {"wiki": 1, "books": 3}, tmp_path / "run", steps=4)
    cfg.run.checkpoint_every = 2
    pretrain(cfg, **QUIET)
    other = mixture_config(sources, {"wiki": 1, "books": 1}, tmp_path / "run", steps=4)
    other.run.checkpoint_every = 2
    with pytest.raises(UserError, match=r"already holds a different run \(differs in data.sources\)"):
        pretrain(other, resume="auto", **QUIET)
    fewer = mixture_config(sources, {"wiki": 1}, tmp_path / "run", steps=4)
    with pytest.raises(UserError, match=r"differs in data.sources"):
        pretrain(fewer, resume="latest", **QUIET)
    # A new phase from its weights: any mixture.
    phase = mixture_config(sources, {"news": 1, "books": 1}, tmp_path / "phase", steps=2)
    phase.model.init_from = str(tmp_path / "run" / "checkpoint-4")
    pretrain(phase, **QUIET)
    assert sorted(losses(tmp_path / "phase")) == [1, 2]


@pytest.mark.slow
def test_kill_9_then_resume_auto_gives_the_unbroken_runs_losses(sources, tmp_path):
    """A 2-source run killed with SIGKILL after its step-6 checkpoint, then started again with --resume=auto,
    ends with the metrics (every loss, val_loss/<name> and epochs/<name>) and weights of an unbroken run."""
    from safetensors.torch import load_file

    cfg = mixture_config(sources, {"wiki": 1, "books": 3}, tmp_path / "run", steps=14)
    cfg.run.checkpoint_every, cfg.eval.every, cfg.system.threads = 3, 5, 1
    unbroken = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(tmp_path / "unbroken")))
    pretrain(unbroken, **QUIET)
    command = [sys.executable, "-m", "mlm", "pretrain", *as_overrides(cfg), "--resume=auto"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "run" / "checkpoint-6").is_dir() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "checkpoint-14").exists()
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout
    assert without_timing(read_metrics(tmp_path / "run")) == without_timing(read_metrics(tmp_path / "unbroken"))
    final, expected = (load_file(str(run / "checkpoint-14" / "model.safetensors")) for run in (tmp_path / "run", tmp_path / "unbroken"))
    assert all(torch.equal(final[k], expected[k]) for k in expected)


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_under_every_engine_train_a_mixture_as_one_process(sources, tmp_path):
    """ddp, fsdp and deepspeed (ZeRO-2, fp32) on 2 ranks give one process's losses and per-source validation
    losses on a 1:3 mixture."""
    import importlib.util

    config = json.loads(Path("configs/deepspeed/zero2.json").read_text())
    config["bf16"]["enabled"] = False
    (tmp_path / "zero2-fp32.json").write_text(json.dumps(config))
    engines = {"ddp": [], "fsdp": [], "deepspeed": [f"--system.deepspeed_config={tmp_path / 'zero2-fp32.json'}"]}
    if importlib.util.find_spec("deepspeed") is None:
        del engines["deepspeed"]
    runs = {}
    for engine in ["single", *engines]:
        cfg = mixture_config(sources, {"wiki": 1, "books": 3}, tmp_path / engine, steps=4)
        cfg.model.dropout, cfg.system.micro_batch, cfg.eval.every = 0.0, 4, 2
        flags = as_overrides(cfg)
        if engine == "single":
            command = [sys.executable, "-m", "mlm", "pretrain", *flags]
        else:
            flags = [f for f in flags if not f.startswith(("--system.strategy=", "--system.deepspeed_config="))]
            command = [sys.executable, "-m", "mlm", "launch", "--standalone", "--nproc_per_node=2", "pretrain", *flags,
                       f"--system.strategy={engine}", *engines[engine]]
        result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
        assert result.returncode == 0, f"{engine}: {result.stderr[-3000:]}"
        runs[engine] = read_metrics(tmp_path / engine)
    for engine in engines:
        for ours, theirs in zip(runs[engine], runs["single"]):
            assert ours.keys() - {"peak_memory_gb"} == theirs.keys() - {"peak_memory_gb"}, engine
            for key in ours.keys() - {"tokens_per_s", "step", "grad_norm"}:
                assert ours[key] == pytest.approx(theirs[key], abs=1e-5), (engine, key)
