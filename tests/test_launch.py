"""`mlm launch`: which one line a failed job ends with (the multi-process runs are in test_engines.py)."""

import json
import signal

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from mlm.dist import LOST_PEER_EXIT
from mlm.errors import UserError
from mlm.launch import failure_report, split_arguments


def failure(tmp_path, rank, exitcode, message=None, timestamp=100):
    """torchrun's record of a failed rank, read from an error file as the launcher reads it."""
    path = tmp_path / f"error-{rank}.json"
    if message is not None:
        path.write_text(json.dumps({"message": message, "timestamp": timestamp}))
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(path))


def test_the_same_error_on_every_rank_was_said_by_rank_0(tmp_path):
    line = "error: data.seq_len=600 is longer than the model's 512 positions"
    assert failure_report({0: failure(tmp_path, 0, 2, line), 1: failure(tmp_path, 1, 2, line)}) == (None, 2)


def test_an_error_of_another_rank_alone_is_printed_with_its_rank(tmp_path):
    """Rank 1 fails first; rank 0 only lost contact with it (and stayed quiet)."""
    failures = {0: failure(tmp_path, 0, LOST_PEER_EXIT), 1: failure(tmp_path, 1, 2, "error: /data is not readable", 200)}
    assert failure_report(failures) == ("error: rank 1: /data is not readable", 2)


def test_a_killed_rank_is_named_before_the_ranks_that_lost_it(tmp_path):
    failures = {0: failure(tmp_path, 0, LOST_PEER_EXIT), 1: failure(tmp_path, 1, -signal.SIGKILL),
                2: failure(tmp_path, 2, -signal.SIGTERM)}
    assert failure_report(failures) == ("error: rank 1 (pid 1001) was killed by SIGKILL; the other ranks were stopped",
                                        128 + signal.SIGKILL)


def test_ranks_that_all_lost_contact_blame_the_network(tmp_path):
    line, code = failure_report({0: failure(tmp_path, 0, LOST_PEER_EXIT), 1: failure(tmp_path, 1, LOST_PEER_EXIT)})
    assert line.startswith("error: the ranks lost contact with each other") and code == LOST_PEER_EXIT


def test_a_rank_that_left_no_line_is_named_with_its_exit_code(tmp_path):
    assert failure_report({1: failure(tmp_path, 1, 1)}) == (
        "error: rank 1 failed (exit code 1); MLM_DEBUG=1 shows its traceback", 1)


def test_the_command_splits_torchrun_options_from_mlm_arguments():
    assert split_arguments(["--nproc_per_node", "2", "pretrain", "c.toml", "--train.steps=3"]) == (
        ["--nproc_per_node", "2"], ["pretrain", "c.toml", "--train.steps=3"])
    with pytest.raises(UserError, match="mlm launch needs a command to run on every rank"):
        split_arguments(["--nproc_per_node=2", "configs/tiny.toml"])
    with pytest.raises(UserError, match=r"mlm launch runs mlm itself: drop '-m mlm'"):
        split_arguments(["--nproc_per_node=2", "-m", "mlm", "pretrain", "configs/tiny.toml"])


@pytest.mark.parametrize("options, message", [
    (["--nproc-per-node", "0"], "mlm launch: --nproc-per-node must be a positive number of processes (or auto, gpu, cpu), got '0'"),
    (["--nproc-per-node", "abc"], "got 'abc'"),
    (["--nnodes", "3:1"], "mlm launch: min_nodes must be > 0 and <= max_nodes, got min_nodes=3, max_nodes=1 (see mlm launch --help)"),
    (["--bogus"], "mlm launch: unrecognized arguments: --bogus (see mlm launch --help)"),
])
def test_bad_launcher_options_are_one_line_before_any_rank_starts(options, message):
    from mlm.launch import launch

    with pytest.raises(UserError) as e:
        launch([*options, "pretrain", "--train.steps=1"])
    assert message in str(e.value) and "\n" not in str(e.value)
