"""One process trains in a run folder at a time: an advisory OS lock held by the main rank.

The operating system releases the lock when the process ends, however it ends, so a killed run never
leaves its folder locked. Who holds it (host, pid) is written beside the lock for the error message. Neither
file is ever written through a symbolic link planted under its name.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from filelock import FileLock, Timeout

from mlm.atomic import refuse_link, write_file
from mlm.errors import UserError

LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"


def lock_run_dir(run_dir: Path) -> FileLock:
    """Take the run folder's lock (the folder exists), or fail naming the process that holds it."""
    refuse_link(run_dir / LOCK_FILE)  # filelock 3 opens it with O_TRUNC, emptying the file a link points to
    lock = FileLock(str(run_dir / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            owner = (run_dir / OWNER_FILE).read_text().strip()
        except OSError:
            owner = "unknown"
        raise UserError(
            f"{run_dir} is in use by another mlm pretrain ({owner}): wait for it to finish, stop it, or choose "
            "another run.out_dir"
        ) from None
    write_file(run_dir / OWNER_FILE, f"host {socket.gethostname()}, pid {os.getpid()}\n")
    return lock
