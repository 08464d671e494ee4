"""Stopping a training early: the time-limit deadline (Slurm EndTime / SMALLBIG_STOP_AT), a signal
before the first iteration, and a run stopped after its last iteration whose outputs the workflow
removed. The same paths through a real Slurm are in tests/test_slurm_training.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_engine import BUILDERS, _weights, tiny_params

from smallbig.engine.checkpoint import load_checkpoint
from smallbig.engine.stopping import Deadline, StopFlag, parse_slurm_time
from smallbig.engine.train import train

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_mlflow(monkeypatch):
    monkeypatch.setenv("SMALLBIG_NO_MLFLOW", "1")


def test_parse_slurm_time():
    t = parse_slurm_time("2026-12-02T06:31:08")
    assert time.localtime(t)[:6] == (2026, 12, 2, 6, 31, 8)
    assert parse_slurm_time("N/A") is None and parse_slurm_time("Unknown") is None
    assert parse_slurm_time("") is None


def test_deadline_from_the_slurm_job_end_time_is_rechecked():
    now = [1000.0]
    ends = {"1": 1000.0 + 900}
    asked = []

    def query(job):
        asked.append(job)
        return ends[job]

    d = Deadline(300, env={"SLURM_JOB_ID": "1"}, query=query, clock=lambda: now[0], recheck_s=60)
    assert d.active and not d.due() and d.seconds_left() == 900
    ends["1"] = 1000.0 + 200  # scontrol update TimeLimit=...: seen at the next recheck only
    now[0] += 30
    assert not d.due() and len(asked) == 1
    now[0] += 31
    assert d.due() and len(asked) == 2
    assert not Deadline(300, env={}).active and not Deadline(300, env={}).due()
    # unknown end (squeue failed, unlimited): never due
    assert not Deadline(300, env={"SLURM_JOB_ID": "2"}, query=lambda j: None).due()
    # SMALLBIG_STOP_AT: any scheduler
    assert Deadline(10, env={"SMALLBIG_STOP_AT": str(time.time() + 5)}).due()
    assert not Deadline(10, env={"SMALLBIG_STOP_AT": str(time.time() + 60)}).due()


def test_deadline_stops_mid_epoch_and_resume_is_bitwise(tmp_path):
    """The deadline falls due at iteration 3: the run checkpoints mid-epoch, exits 3,
    and the resumed run ends with weights equal to an uninterrupted one."""
    full = train(tiny_params(epochs=3), tmp_path / "full", builders=BUILDERS, progress=False)
    checks = {"n": 0}

    class CountingDeadline(Deadline):
        def due(self):
            checks["n"] += 1
            return checks["n"] > 4  # start, pre-loop, then once per iteration: iteration 3

    stop = StopFlag(CountingDeadline(60, env={}))
    rc = train(tiny_params(epochs=3), tmp_path / "cut", builders=BUILDERS, progress=False, stop=stop)
    stop.restore()
    assert full == 0 and rc == 3
    assert "time limit" in stop.reason()
    ck = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert 0 < ck["iteration"] < 12 and ck["iteration"] % 4 != 0  # mid-epoch (4 per epoch)
    assert train(tiny_params(epochs=3), tmp_path / "cut", resume=True, builders=BUILDERS, progress=False) == 0
    wa, wb = _weights(tmp_path / "full" / "checkpoint.pt"), _weights(tmp_path / "cut" / "checkpoint.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_signal_before_the_first_iteration_exits_3_without_training(tmp_path):
    stop = StopFlag()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        rc = train(tiny_params(), tmp_path / "r", builders=BUILDERS, progress=False, stop=stop)
    finally:
        stop.restore()
    assert rc == 3
    assert not (tmp_path / "r" / "last.pt").exists()  # nothing trained, nothing saved


def test_resume_from_the_final_last_pt_writes_every_output(tmp_path):
    """Stopped after the last iteration: the workflow deleted checkpoint.pt, history.json and
    train_metrics.json; the retry (--resume from the final last.pt) writes all three again."""
    out = tmp_path / "r"
    assert train(tiny_params(), out, builders=BUILDERS, progress=False) == 0
    before = json.loads((out / "history.json").read_text())
    weights = _weights(out / "checkpoint.pt")
    for name in ("checkpoint.pt", "history.json", "train_metrics.json"):
        (out / name).unlink()
    assert train(tiny_params(), out, resume=True, builders=BUILDERS, progress=False) == 0
    for name in ("checkpoint.pt", "history.json", "train_metrics.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "history.json").read_text()) == before
    after = _weights(out / "checkpoint.pt")
    assert all(torch.equal(weights[k], after[k]) for k in weights)


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (the SigCgt mask of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    except FileNotFoundError:
        pass
    return False


def test_cli_sigterm_right_after_start_exits_3(tmp_path):
    """`smallbig train` installs its handler before importing torch: a SIGTERM right after the
    handler is in place (before torch is imported, the model built or data read) ends in exit 3
    (requeue), not a -15 death."""
    env = dict(os.environ, SMALLBIG_NO_MLFLOW="1")
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "smallbig",
            "train",
            "k400-r23-c2d",
            "--overlay",
            "params/embedded.yaml",
            "--out",
            str(tmp_path / "r"),
            "--no-progress",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    # the moment the handler is in place (the kernel's SigCgt mask), not a fixed delay: a loaded
    # CI machine can take longer than any delay to start Python
    deadline = time.time() + 120
    while not _catches(p.pid, signal.SIGTERM):
        assert p.poll() is None, p.communicate()[1][-2000:]
        assert time.time() < deadline, "no SIGTERM handler after 120 s"
        time.sleep(0.002)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 3, (p.returncode, err[-2000:])
