"""Checks on files a user hands us, made before opening them: `open()` on a FIFO blocks until a
writer appears (forever, in a batch job), and a device or socket is never what a list, a params
file, a checkpoint or a scores file means."""
from __future__ import annotations

import os
import stat
from pathlib import Path


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
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"
