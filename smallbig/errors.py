"""The errors every part of smallbig raises for things that are not bugs, and their exit codes.
`smallbig.cli.main` is the one place that turns them into a message and an exit code:

    InputError   exit 2  bad input (params, list files, checkpoints, options): nothing was run
    RunError     exit 1  the run itself failed (a non-finite loss, a failed download)
    OutputWriteError  exit 1  an output could not be written (disk full, quota, size limit);
                      the previous outputs are intact

Each message names the file (and line) and the problem. A subclass may set `label` (printed
as `smallbig COMMAND: LABEL: message`)."""

from __future__ import annotations


class SmallbigError(Exception):
    exit_code = 1
    label = "error"

    def render(self, command: str) -> str:
        return f"smallbig {command}: {self.label}: {self}" if command else f"smallbig: {self.label}: {self}"


class InputError(SmallbigError, ValueError):
    """Bad input; nothing was run. Exit 2."""

    exit_code = 2


class RunError(SmallbigError, RuntimeError):
    """The run failed. Exit 1."""


class OutputWriteError(RunError, OSError):
    """An output could not be written (disk full, quota, file-size limit, read-only file system);
    nothing was replaced and no partial file is left. Exit 1."""
