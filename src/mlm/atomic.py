"""Write a folder so that it appears whole or not at all."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces `out_dir` by a rename, on error it is
    removed. A crash therefore never leaves a folder under the final name that looks whole but is not."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out_dir.name}.tmp"
    for stale in out_dir.parent.glob(f"{prefix}*"):  # left by a killed earlier write of the same folder
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_NETWORK_ERRORS = {errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT,
                   errno.EHOSTUNREACH, errno.ENETUNREACH}  # a lost rank, not a file: not for os_error_behind


def os_error_behind(e: BaseException, where: str | Path) -> OSError | None:
    """The OS error (a full disk, a file size limit, a forbidden folder) behind a failed write, named after
    `where`; None when there is none. Libraries hide it: torch's distributed checkpoint wraps it in its own
    exception (a BaseException, with each rank's error in `failures`) and torch.save in a RuntimeError
    whose context it is; safetensors and tokenizers (Rust) only say "(os error N)" in their message."""
    seen: set[int] = set()
    todo: list[BaseException] = [e]
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno and exc.errno not in _NETWORK_ERRORS:
            return OSError(exc.errno, os.strerror(exc.errno), str(exc.filename or where))
        match = re.search(r"\(os error (\d+)\)", str(exc).split("\n", 1)[0])
        if match and int(match.group(1)) in errno.errorcode and int(match.group(1)) not in _NETWORK_ERRORS:
            return OSError(int(match.group(1)), os.strerror(int(match.group(1))), str(where))
        failures = getattr(exc, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        if isinstance(failures, dict):
            todo.extend(f[0] if isinstance(f, tuple) else f for f in failures.values())
        todo.extend((exc.__cause__, exc.__context__))
    return None
