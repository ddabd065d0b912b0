"""`mlm launch [torchrun options] pretrain CONFIG [overrides]`: torchrun for mlm, failing in one line.

It is torchrun itself (`torch.distributed.run`, every option of it: --nproc_per_node, --nnodes, --rdzv_*,
--standalone, …) running `-m mlm`. The difference is what a failure prints: torchrun follows the rank's own
one-line `error:` with its traceback and failure report; here the agent's log is quiet, and a failure ends
with exactly one `error:` line (the rank's own, or one naming the rank that died and how) and the rank's
exit code.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import typing

from mlm.dist import LAUNCHED_BY_MLM, LOST_PEER_EXIT
from mlm.errors import UserError, first_line

COMMANDS = ("pretrain",)
"""The mlm commands that run on several ranks."""


def split_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """torchrun's options, and the mlm command with its own arguments (from the first word naming one)."""
    for i, word in enumerate(argv):
        if word in COMMANDS:
            if {"-m", "--module", "mlm"} & set(argv[:i]):  # torchrun's habit: mlm launch runs mlm itself
                raise UserError(f"mlm launch runs mlm itself: drop '-m mlm' (mlm launch [torchrun options] {word} CONFIG …)")
            return argv[:i], argv[i:]
    raise UserError(f"mlm launch needs a command to run on every rank: mlm launch [torchrun options] "
                    f"{'|'.join(COMMANDS)} CONFIG [--section.key=value …]")


def root_cause(failures: dict) -> tuple:
    """(rank, failure) of the rank that failed first: one that exited on its own or was killed, before one that
    only lost contact with it (LOST_PEER_EXIT) or that the launcher stopped (SIGTERM); then the earliest."""
    def order(item):
        rank, failure = item
        return failure.exitcode in (LOST_PEER_EXIT, -signal.SIGTERM), failure.timestamp, rank

    return min(failures.items(), key=order)


def failure_report(failures: dict) -> tuple[str | None, int]:
    """The one line to print for failed ranks ({rank: torchrun's ProcessFailure}), or None when rank 0 has
    printed it, and the exit code."""
    rank, failure = root_cause(failures)
    code = failure.exitcode
    if code == LOST_PEER_EXIT:  # every rank failed only because another had gone: a network or a timeout
        return ("error: the ranks lost contact with each other (no rank failed first): check the network between "
                "the nodes, or raise system.dist_timeout_s if one rank is slow"), code
    if code < 0:  # killed by a signal (the OOM killer's SIGKILL, a pre-emption): nobody has said so yet
        return (f"error: rank {rank} (pid {failure.pid}) was killed by {failure.signal_name()}; "
                "the other ranks were stopped"), 128 - code
    if rank == 0 or (0 in failures and failures[0].message == failure.message):
        return None, code  # rank 0 printed it (mlm's error path prints on rank 0 only)
    said = failure.message if isinstance(failure.message, str) and failure.message.startswith("error: ") else None
    if said:
        return f"error: rank {rank}: {said[len('error: '):]}", code
    return f"error: rank {rank} failed (exit code {code}); MLM_DEBUG=1 shows its traceback", code


def check_launcher_options(args) -> None:
    """Refuse what torchrun would refuse only with a traceback (an AssertionError for 0 processes, a ValueError
    for a port beyond 65535)."""
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint
    from torch.distributed.run import config_from_args

    count = str(args.nproc_per_node)
    if count not in ("auto", "cpu", "gpu", "xpu") and not (count.isdigit() and int(count) >= 1):
        raise UserError(f"mlm launch: --nproc-per-node must be a positive number of processes (or auto, gpu, cpu), "
                        f"got {count!r}")
    try:
        config_from_args(args)
        # The ports given, which the agent parses only once it has started (without one it picks its own).
        given = [args.rdzv_endpoint] + ([f"{args.master_addr}:{args.master_port}"] if args.master_port is not None else [])
        for endpoint in filter(None, (e.strip() for e in given)):
            parse_rendezvous_endpoint(endpoint, default_port=29400)
    except (ValueError, AssertionError, RuntimeError) as e:
        raise UserError(f"mlm launch: {first_line(e)} (see mlm launch --help)") from None


def launch(argv: list[str]) -> int:
    """Run torchrun with `-m mlm COMMAND …`; returns the exit code, having printed at most one error line."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import get_args_parser, run

    parser = get_args_parser()
    parser.prog = "mlm launch"
    if not any(word in COMMANDS for word in argv) and {"-h", "--help"} & set(argv):
        parser.print_help()
        return 0
    launcher, command = split_arguments(argv)

    def usage_error(message: str) -> typing.NoReturn:  # torchrun's argparse would print its usage block too
        raise UserError(f"mlm launch: {message} (see mlm launch --help)")

    parser.error = usage_error
    args = parser.parse_args([*launcher, "--module", "mlm", *command])
    check_launcher_options(args)
    # The agent logs each failure and each rank it stops; the ranks say what matters themselves.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[LAUNCHED_BY_MLM] = "1"
    try:
        run(args)
    except ChildFailedError as e:
        line, code = failure_report(e.failures)
        if line:
            print(line, file=sys.stderr)
        return code
    except SignalException as e:  # the launcher itself was told to stop (SLURM, Ctrl-C): ranks were stopped
        return 128 + int(e.sigval)
    except ValueError as e:  # an option the agent reads only as it starts (no rank runs mlm code in this process)
        raise UserError(f"mlm launch: {first_line(e)} (see mlm launch --help)") from None
    except RendezvousError as e:  # the nodes never met: a wrong address, a closed port, a timeout
        raise UserError(f"mlm launch: the rendezvous failed: {first_line(e)}") from None
    return 0
