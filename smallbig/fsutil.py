"""Files: the checks made on a file a user hands us before opening it (`not_regular`: an `open()`
on a FIFO blocks until a writer appears, forever in a batch job; a device or socket is never what
a list, a params file, a checkpoint or a scores file means), and the one atomic-write helper every
output goes through (`atomic_write*`: temporary file, fsync, rename; a full disk is one clear
OutputWriteError)."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any


def not_regular(path: str | Path) -> str | None:
    """None for a regular file (or a symlink to one); else what it is: 'missing', 'a FIFO (named
    pipe)', 'a directory', 'a socket', 'a character device', 'a block device', or the OS error."""
    try:
        mode = os.stat(path).st_mode  # follows symlinks: a link to a FIFO is a FIFO
    except FileNotFoundError:
        return "missing" if not os.path.islink(path) else "missing (dangling symlink)"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


# --------------------------------------------------------------------------- atomic writes
_WRITE_ERRNOS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit exceeded",
    errno.EIO: "I/O error",
    errno.EROFS: "read-only file system",
}


def write_failure(e: BaseException, directory: str | Path) -> str | None:
    """What made a write fail, in words ('disk full', ...), from the exception and its causes
    (torch.save reports ENOSPC as a RuntimeError whose context is the OSError); a bare
    serializer error on a file system with (almost) no free space left is 'disk full' too.
    None: not a write failure (a bug, a bad object, ...)."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno is not None:
            return _WRITE_ERRNOS.get(x.errno, x.strerror or os.strerror(x.errno))
        x = x.__cause__ or x.__context__
    text = str(e).lower()
    if isinstance(e, RuntimeError) and any(
        p in text for p in ("unexpected pos", "file write failed", "iostream error", "write failed")
    ):
        try:
            st = os.statvfs(directory)
            if st.f_bavail * st.f_frsize < (1 << 20):
                return "disk full"
        except OSError:
            pass
        return "write failed"
    return None


def first_os_error(e: BaseException) -> str:
    """The OSError inside an exception chain, as 'OSError: [Errno 28] No space left on device'
    (it says more than a serializer's wrapper); else the exception's first line."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno is not None:
            return f"{type(x).__name__}: [Errno {x.errno}] {x.strerror}"
        x = x.__cause__ or x.__context__
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def fsync_dir(directory: str | Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: str | Path, write: Callable[[Path], object], *, keep_previous: Path | None = None, what: str = "it"
) -> Path:
    """`write(tmp)` into a temporary file beside `path`, fsync, then rename over `path` (atomic on
    POSIX): a process killed at any moment leaves the old file or the new one, never half of one.
    `keep_previous`: first rename the file being replaced to this path. A write failure (disk
    full, quota, size limit) raises OutputWriteError naming `path`; nothing is replaced and no
    temporary file is left. Any other exception propagates (after the cleanup)."""
    from smallbig.errors import OutputWriteError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            write(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except Exception as e:
            why = write_failure(e, path.parent)
            if why is None:
                raise
            raise OutputWriteError(
                f"{path}: {why} while writing {what} ({first_os_error(e)}); "
                f"nothing was replaced, no partial file left"
            ) from None
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")
