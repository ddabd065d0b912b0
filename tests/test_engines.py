"""Every engine trains like one process: 2 ranks of ddp, fsdp (both reshard modes) and deepspeed ZeRO-2
give the losses of one plain process with the same global batch; a checkpoint resumes on another number
of ranks with the same losses; SIGTERM to one rank ends the job with a checkpoint that resumes exactly.

Each run is a real `mlm launch` (torchrun inside; Gloo on the CPU) or `python -m mlm` process, one thread
per rank.
Dropout is 0: dropout draws differ with the rank count; nothing else may.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM

from mlm.train.metrics import read_metrics

pytestmark = [pytest.mark.dist, pytest.mark.slow]
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason='needs the deepspeed extra: pip install -e ".[deepspeed]"'
)
DEEPSPEED = pytest.param("deepspeed", marks=needs_deepspeed)

STEPS = 6
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def overrides(data_dir: Path, out_dir: Path, steps: int = STEPS, family: str = "roberta") -> list[str]:
    """global batch 16 = micro-batch 4 × accumulation 2 × 2 ranks (or × 4 × 1 rank)."""
    return [
        f"--data.data_dir={data_dir}", f"--model.family={family}", "--model.size=tiny", "--model.max_positions=64", "--model.dropout=0.0",
        "--data.seq_len=32", f"--train.steps={steps}", "--train.global_batch=16", "--train.lr=2e-3",
        "--train.warmup_steps=3", "--system.micro_batch=4", "--system.device=cpu", "--system.compile=off",
        f"--run.out_dir={out_dir}", "--run.log_every=1", "--run.checkpoint_every=2", "--run.progress=false",
        "--eval.every=3", "--eval.sequences=32",
    ]


def launch_command(ranks: int, *args: str) -> list[str]:
    """`mlm launch --standalone --nproc_per_node=ranks pretrain …` (torchrun inside), or plain
    `python -m mlm pretrain …` for one rank."""
    if ranks == 1:
        return [sys.executable, "-m", "mlm", "pretrain", *args]
    return [sys.executable, "-m", "mlm", "launch", "--standalone", f"--nproc_per_node={ranks}", "pretrain", *args]


def launch(ranks: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(launch_command(ranks, *args), capture_output=True, text=True, env=ENV, timeout=timeout)


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    return {m["step"]: m[key] for m in read_metrics(run_dir) if key in m}


@pytest.fixture(scope="module")
def fp32_zero2(tmp_path_factory) -> Path:
    """The shipped ZeRO-2 file with bf16 off, for fp32 comparisons (the file as is runs in bf16)."""
    config = json.loads(Path("configs/deepspeed/zero2.json").read_text())
    config["bf16"]["enabled"] = False
    path = tmp_path_factory.mktemp("ds") / "zero2-fp32.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def engines(fp32_zero2) -> dict[str, list[str]]:
    return {
        "ddp": ["--system.strategy=ddp"],
        "fsdp": ["--system.strategy=fsdp"],
        "fsdp-zero3": ["--system.strategy=fsdp", "--system.fsdp_reshard_after_forward=true"],
        "deepspeed": ["--system.strategy=deepspeed", f"--system.deepspeed_config={fp32_zero2}"],
    }


@pytest.fixture(scope="module")
def singles(data_dirs, tmp_path_factory):
    """The reference of a family: one plain process, no engine wrapper, micro-batch 4 × accumulation 4."""
    runs: dict[str, Path] = {}

    def single_run(family: str) -> Path:
        if family not in runs:
            out = tmp_path_factory.mktemp(f"single-{family}") / "run"
            result = launch(1, *overrides(data_dirs[family], out, family=family))
            assert result.returncode == 0, result.stderr[-3000:]
            runs[family] = out
        return runs[family]

    return single_run


@pytest.fixture(scope="module")
def single(singles) -> Path:
    return singles("roberta")


def assert_same_training(run: Path, reference: Path, steps) -> None:
    ours, theirs = losses(run), losses(reference)
    assert sorted(ours) == list(steps)
    assert [ours[s] for s in steps] == pytest.approx([theirs[s] for s in steps], abs=1e-5)
    lrs, reference_lrs = losses(run, "lr"), losses(reference, "lr")
    assert [lrs[s] for s in steps] == pytest.approx([reference_lrs[s] for s in steps], rel=1e-9)


# One family per engine here (roberta also runs 2 ranks under every engine in test_one_rank_resumes_on_two):
# ModernBERT's layers, rotary buffers and tied decoder under each engine's wrapping and sharding.
@pytest.mark.parametrize("engine, family", [("ddp", "modernbert"), ("fsdp", "modernbert"), ("fsdp-zero3", "roberta"),
                                            pytest.param("deepspeed", "modernbert", marks=needs_deepspeed)])
def test_two_ranks_match_one_process_and_resume_on_one(engine, family, engines, singles, data_dirs, tmp_path):
    single = singles(family)
    two = tmp_path / "two"
    result = launch(2, *overrides(data_dirs[family], two, family=family), *engines[engine])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "micro_batch 4 × accumulation 2 × ranks 2 = global batch 16" in result.stdout
    assert f"engine {engines[engine][0].split('=')[1]}" in result.stdout
    assert_same_training(two, single, range(1, STEPS + 1))
    assert losses(two, "val_loss") == pytest.approx(losses(single, "val_loss"), abs=1e-5)

    # The HF export: plain transformers loads it, with the logits of the one-process run's weights.
    ids = torch.randint(5, 300, (2, 16))
    with torch.no_grad():
        logits = [AutoModelForMaskedLM.from_pretrained(str(run / f"checkpoint-{STEPS}")).eval()(ids).logits
                  for run in (two, single)]
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)

    # Elastic: the step-4 checkpoint of 2 ranks continues on 1 with the unbroken run's losses.
    one = tmp_path / "one"
    result = launch(1, *overrides(data_dirs[family], one, family=family), *engines[engine],
                    f"--resume={two / 'checkpoint-4'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(one, single, range(5, STEPS + 1))


@pytest.mark.parametrize("engine", ["ddp", "fsdp", DEEPSPEED])
def test_one_rank_resumes_on_two(engine, engines, single, data_dirs, tmp_path):
    one = tmp_path / "one"
    result = launch(1, *overrides(data_dirs["roberta"], one), *engines[engine])  # a process group of one
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(one, single, range(1, STEPS + 1))
    two = tmp_path / "two"
    result = launch(2, *overrides(data_dirs["roberta"], two), *engines[engine], f"--resume={one / 'checkpoint-2'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(two, single, range(3, STEPS + 1))


@needs_deepspeed
def test_engine_checkpoints_do_not_mix(engines, single, data_dirs, tmp_path):
    """A ddp checkpoint resumes under fsdp (one format, resharded), from a folder moved elsewhere; deepspeed's
    has its own format and is refused."""
    moved = tmp_path / "moved" / "checkpoint-4"
    shutil.copytree(single / "checkpoint-4", moved)
    fsdp = tmp_path / "fsdp"
    result = launch(1, *overrides(data_dirs["roberta"], fsdp), *engines["fsdp"], f"--resume={moved}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(fsdp, single, range(5, STEPS + 1))
    result = launch(1, *overrides(data_dirs["roberta"], tmp_path / "ds"), *engines["deepspeed"], f"--resume={single / 'checkpoint-4'}")
    assert result.returncode == 2
    assert "written by the ddp engine and cannot resume under deepspeed" in result.stderr
    assert "Traceback" not in result.stderr


@needs_deepspeed
def test_reference_zero2_file_runs_as_is_in_bf16(single, data_dirs, tmp_path):
    result = launch(2, *overrides(data_dirs["roberta"], tmp_path / "run"), "--system.strategy=deepspeed",
                    "--system.deepspeed_config=configs/deepspeed/zero2.json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(bf16), engine deepspeed" in result.stdout
    bf16, fp32 = losses(tmp_path / "run"), losses(single)
    assert [bf16[s] for s in fp32] == pytest.approx(list(fp32.values()), abs=0.05)  # bf16 weights: close, not equal


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun started (read from their environment)."""
    children = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    ranks = {}
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = [item.split(b"=", 1)[1] for item in environ if item.startswith(b"RANK=")]
        if rank:
            ranks[int(rank[0])] = pid
    return ranks


def test_sigterm_to_one_rank_checkpoints_and_resumes_exactly(data_dirs, tmp_path):
    steps = 100
    # Dropout on: each rank must get its own dropout stream back for the continuation to be exact.
    unbroken = tmp_path / "unbroken"  # on 2 ranks too: over 100 steps, sums in another order drift apart
    result = launch(2, *overrides(data_dirs["roberta"], unbroken, steps), "--run.checkpoint_every=1000", "--model.dropout=0.1")
    assert result.returncode == 0, result.stderr[-3000:]

    run = tmp_path / "run"
    args = [*overrides(data_dirs["roberta"], run, steps), "--run.checkpoint_every=1000", "--model.dropout=0.1"]
    job = subprocess.Popen(launch_command(2, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while len(losses(run)) < 5 and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
    assert job.poll() is None, "the job ended before it could be signalled"
    os.kill(_rank_pids(job.pid)[1], signal.SIGTERM)  # not the main rank: the ranks must agree
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, err[-3000:]
    checkpoints = sorted(run.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and not list(run.glob(".checkpoint-*"))
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 5 <= stopped_at < steps
    assert f"stopped by SIGTERM after step {stopped_at}: checkpoint written to {checkpoints[0]}" in out

    result = launch(2, *args, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, expected = losses(run), losses(unbroken)
    assert sorted(resumed) == list(range(1, steps + 1))
    assert resumed == expected  # exactly: same ranks, same sums, state restored bit for bit


def test_a_user_error_under_mlm_launch_is_one_line(data_dirs, tmp_path):
    """Every rank fails alike; rank 0 says it once, and the launcher adds nothing (no report, no traceback)."""
    result = launch(2, *overrides(data_dirs["roberta"], tmp_path / "run"), "--system.micro_batch=5")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: train.global_batch=16 is not a multiple of system.micro_batch=5 × 2 rank(s)"]
    assert not (tmp_path / "run").exists()


def test_plain_torchrun_still_says_the_error_once(data_dirs, tmp_path):
    """`torchrun -m mlm pretrain` works too; it prints its own failure report after the one error line."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mlm",
               "pretrain", *overrides(data_dirs["roberta"], tmp_path / "run"), "--system.micro_batch=5"]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: train.global_batch=16 is not a multiple of system.micro_batch=5 × 2 rank(s)"]


def running_job(data_dir: Path, run: Path, plain_torchrun: bool = False) -> subprocess.Popen:
    """A 2-rank job of 1,000 steps under mlm launch (or plain torchrun), returned once it has logged two
    training losses."""
    args = [*overrides(data_dir, run, steps=1000), "--run.checkpoint_every=1000"]
    command = launch_command(2, *args)
    if plain_torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mlm",
                   "pretrain", *args]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while len(losses(run)) < 2 and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
    assert job.poll() is None, f"the job ended before it could be signalled: {job.communicate()[1][-3000:]}"
    return job


def test_a_rank_killed_by_a_signal_is_named_in_one_line(data_dirs, tmp_path):
    """A rank that dies without a word (the OOM killer's SIGKILL): the launcher stops the others and names it."""
    job = running_job(data_dirs["roberta"], tmp_path / "run")
    pid = _rank_pids(job.pid)[1]
    os.kill(pid, signal.SIGKILL)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 128 + signal.SIGKILL
    assert err.splitlines() == [f"error: rank 1 (pid {pid}) was killed by SIGKILL; the other ranks were stopped"]


def test_under_plain_torchrun_the_rank_that_lost_its_peer_says_so_once(data_dirs, tmp_path):
    """Without mlm launch nobody names the killed rank for us: rank 0 says it lost contact, in one line."""
    job = running_job(data_dirs["roberta"], tmp_path / "run", plain_torchrun=True)
    os.kill(_rank_pids(job.pid)[1], signal.SIGKILL)
    _, err = job.communicate(timeout=120)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: lost contact with another rank ("), err[-3000:]
    assert "it failed or was stopped; the launcher's log names it" in errors[0]


def test_the_multinode_script_trains_on_one_node(data_dirs, tmp_path):
    """scripts/multinode.sh as a node runs it (torchrun's c10d rendezvous through mlm launch), with one node."""
    env = {**ENV, "NNODES": "1", "GPUS_PER_NODE": "2", "HEAD": "localhost:29517", "RDZV_ID": tmp_path.name}
    result = subprocess.run(["bash", "scripts/multinode.sh", "configs/tiny.toml",
                             *overrides(data_dirs["roberta"], tmp_path / "run", steps=3)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]


def test_sigterm_to_mlm_launch_reaches_every_rank(data_dirs, tmp_path):
    """The launcher passes SIGTERM on (as Kubernetes or a shell sends it to the job's first process): the
    ranks write their checkpoint together and the launcher exits 128 + 15, with nothing on stderr."""
    job = running_job(data_dirs["roberta"], tmp_path / "run")
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert (job.returncode, err) == (128 + signal.SIGTERM, "")
    checkpoints = list((tmp_path / "run").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and f"checkpoint written to {checkpoints[0]}" in out
