"""When a training must stop early and checkpoint: a signal, or the job's time limit is near.

`StopFlag` is installed by `smallbig train` before anything heavy is imported (a SIGTERM in the
first seconds still ends in a checkpoint-free exit 3, not a -15 death). It is set by

* SIGTERM / SIGUSR1 (preemption, `scancel --signal`, Slurm's time-limit SIGTERM, `--signal=USR1@N`);
* a *deadline*: `margin_s` seconds before the end of the Slurm job that runs the training.
  The end comes from `squeue -h -j $SLURM_JOB_ID -o %e` (asked again every `recheck_s`, so
  `scontrol update TimeLimit=...` and requeues are followed), or from the environment variable
  SMALLBIG_STOP_AT (seconds since the epoch; any scheduler, and tests).

The deadline is what makes time limits safe under every launcher: Slurm's own SIGTERM at the limit
gives KillWait (often 30 s) to finish an iteration and write a checkpoint, and under an `srun`
launcher the srun client, which also gets that SIGTERM, kills its step with SIGKILL at once
(docs/engine.md, "Time limits and preemption"). Stopping `margin_s` before the limit needs no
signal at all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable

STOP_AT_ENV = "SMALLBIG_STOP_AT"


def _squeue_end_time(job_id: str) -> float | None:
    """End time (epoch seconds) of Slurm job `job_id`, or None when unknown/unlimited."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", str(job_id), "-o", "%e"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_slurm_time(out.splitlines()[0] if out else "")


def parse_slurm_time(text: str) -> float | None:
    """'2026-12-02T06:31:08' (Slurm prints local time) -> epoch seconds; N/A, Unknown -> None."""
    text = text.strip()
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


class Deadline:
    """`due()` is True from `margin_s` seconds before the end of the job."""

    def __init__(
        self,
        margin_s: float,
        env: dict | None = None,
        query: Callable[[str], float | None] = _squeue_end_time,
        clock: Callable[[], float] = time.time,
        recheck_s: float = 60.0,
    ):
        env = os.environ if env is None else env
        self.margin_s = float(margin_s)
        self.clock = clock
        self.recheck_s = recheck_s
        self._query = query
        self._job_id = env.get("SLURM_JOB_ID")
        self._fixed = float(env[STOP_AT_ENV]) if env.get(STOP_AT_ENV) else None
        self._end: float | None = None
        self._asked_at = -1e18

    @property
    def active(self) -> bool:
        return self._fixed is not None or self._job_id is not None

    def end_time(self) -> float | None:
        if self._fixed is not None:
            return self._fixed
        if self._job_id is None:
            return None
        now = self.clock()
        if now - self._asked_at >= self.recheck_s:
            self._asked_at = now
            end = self._query(self._job_id)
            if end is not None or self._end is None:
                self._end = end
        return self._end

    def seconds_left(self) -> float | None:
        end = self.end_time()
        return None if end is None else end - self.clock()

    def due(self) -> bool:
        left = self.seconds_left()
        return left is not None and left <= self.margin_s


class StopFlag:
    """SIGTERM / SIGUSR1 or a due deadline set the flag; the training loop checkpoints at the next
    iteration boundary and exits 3."""

    SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)

    def __init__(self, deadline: Deadline | None = None):
        self.signum: int | None = None
        self.deadline = deadline
        self._deadline_hit = False
        self._old: dict = {}

    def _handler(self, signum, frame):
        self.signum = signum

    @property
    def set(self) -> bool:
        if self.signum is not None:
            return True
        if self.deadline is not None and not self._deadline_hit and self.deadline.due():
            self._deadline_hit = True
        return self._deadline_hit

    def reason(self) -> str:
        if self.signum is not None:
            return f"signal {signal.Signals(self.signum).name}"
        if self._deadline_hit:
            return (
                f"the job's time limit is {self.deadline.margin_s:.0f} s away or less (--stop-before-limit)"
            )
        return "not stopped"

    def install(self) -> StopFlag:
        for s in self.SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
