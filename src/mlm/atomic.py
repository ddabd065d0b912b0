"""Write a folder or a file so that it appears whole or not at all, and never through a symbolic link.

mlm writes small files (a run's config.json, metrics.jsonl, the lock's owner, results) into folders a user
names, which may hold links someone else planted or a careless copy left: a write that followed a link would
overwrite the file it points to. `write_file` writes a new file and renames it into place (a link under the
name is replaced, its target untouched); `open_append` refuses to append through a link.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from mlm.errors import UserError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # absent on Windows, which has no such links to plant


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


def write_file(path: str | Path, data: str | bytes) -> None:
    """Replace `path` with a file holding `data` (text as UTF-8): written under a new name beside it, created
    exclusively (never an existing file, never through a link), then renamed over `path`. A link at `path` is
    replaced by the file and what it pointed to is left as it was; a crash leaves the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # left by a killed write of this process id (a file or a link: not followed)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def open_append(path: str | Path) -> IO[str]:
    """`path` opened for appending text (created if absent), refusing a symbolic link in its place: appending
    through one would grow the file it points to."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW met a link
            raise _link_error(path) from None
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


def refuse_link(path: str | Path) -> None:
    """A file that a library opens itself (a lock file) must not be a symbolic link."""
    if Path(path).is_symlink():
        raise _link_error(path)


def _link_error(path: str | Path) -> UserError:
    return UserError(f"{path} is a symbolic link: mlm does not write through links; remove it (or move the file it "
                     "points to in its place)")


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
