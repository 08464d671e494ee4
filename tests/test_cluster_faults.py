"""Cluster faults (issue 11), each through the real `smallbig` CLI on the embedded toy dataset
(`smallbig.data.toy`, SmallBig-R23 at base width 4, the set-up of test_engine_e2e.py):

* the MLflow tracking server dies in the middle of a training, or never answers: the training
  finishes (exit 0, checkpoint and outputs), the gap is reported in its log, what was not sent is
  kept and sent when the server is back (or listed in OUT/mlflow-unsent.json at the end); a
  dead server costs seconds, not minutes (MLflow's own HTTP retries are bounded);
* a resume that fails (even before it can read a checkpoint) ends the MLflow run it was to
  continue FAILED instead of leaving it RUNNING forever; a finished run is left alone;
* the disk fills up while a checkpoint is written (a real ENOSPC on a small tmpfs; where mount
  is not permitted, a real EFBIG from RLIMIT_FSIZE): a one-line error naming the file, exit 1,
  no traceback, the previous checkpoints intact, no partial file; --resume afterwards ends with
  exactly the weights of an uninterrupted run;
* `smallbig evaluate` SIGKILLed at 3 random (seeded) moments and rerun: never a partial scores
  file under a final name, and the rerun's saved logits are bitwise those of an uninterrupted one;
* MLflow usage telemetry stays off: no ~/.config/mlflow/telemetry.json (the control run shows
  MLflow writes it when not disabled).

A SIGTERM in the first second of `smallbig train` ending in exit 3 is
tests/test_stopping.py::test_cli_sigterm_right_after_start_exits_3.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tracking_server import TrackingServer

from smallbig import config
from smallbig.engine import metrics
from smallbig.engine.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # end to end: CLI subprocesses, MLflow servers, a tmpfs
SMALLBIG = [sys.executable, "-m", "smallbig"]
REPO = Path(__file__).resolve().parents[1]
# MLflow skips telemetry by itself when it sees a CI or pytest variable: the telemetry test drops them
CI_VARS = (
    "PYTEST_CURRENT_TEST",
    "GITHUB_ACTIONS",
    "CI",
    "CIRCLECI",
    "GITLAB_CI",
    "JENKINS_URL",
    "TRAVIS",
    "TF_BUILD",
    "BITBUCKET_BUILD_NUMBER",
    "CODEBUILD_BUILD_ARN",
    "BUILDKITE",
    "TEAMCITY_VERSION",
    "CLOUD_RUN_EXECUTION",
    "RUNBOT_HOST_URL",
    "RUNBOT_BUILD_NAME",
    "RUNBOT_WORKER_ID",
)


def _env(**over) -> dict:
    """The jobs' environment: one thread (bitwise-repeatable runs), no inherited MLflow settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "SMALLBIG_NO_MLFLOW") and not k.startswith("MLFLOW_HTTP")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.update({k: v for k, v in over.items() if v is not None})
    for k in [k for k, v in over.items() if v is None]:
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Prepared embedded K400-style dataset + tiny params (2 epochs x 7 iterations) + an
    uninterrupted reference training (no MLflow)."""
    from smallbig.data.prepare import prepare
    from smallbig.data.toy import make_toy

    root = tmp_path_factory.mktemp("cluster-faults")
    make_toy(
        root / "src", datasets=("kinetics400",), per_class={"train": 4, "val": 2, "test": 1}, progress=False
    )
    p = config.load_params(
        config.experiment_path("k400-r23-sb-full"), config.REPO_ROOT / "params" / "embedded.yaml"
    )
    p["data"].update(
        root=str(root / "k400"),
        source={"base_url": str(root / "src" / "kinetics400")},
        crop_size=48,
        train_short_side=[52, 60],
        frame_stride=2,
        num_workers=0,
    )
    p["model"].update(base_width=4, pretrained="none")
    p["test"].update(short_side=52, multi_crop_size=52, single_crop_size=48, batch_size=4)
    p["train"].update(
        epochs=2, batch_size=4, per_gpu_batch=2, lr=0.05, checkpoint_every_iters=3, val_every_epochs=1, seed=0
    )
    prepare(p, progress=False, workers=1)
    config.validate(p)
    config.dump_params(p, root / "params.yaml")
    p3 = dict(p, train=dict(p["train"], epochs=3))
    config.dump_params(p3, root / "params3.yaml")
    t0 = time.time()
    res = subprocess.run(
        SMALLBIG + ["train", str(root / "params.yaml"), "--out", str(root / "ref"), "--no-progress"],
        capture_output=True,
        text=True,
        env=_env(SMALLBIG_NO_MLFLOW="1"),
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (root / "ref-seconds.txt").write_text(f"{time.time() - t0:.2f}\n")
    return root


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# --------------------------------------------------------------------------- gated training
# `smallbig train` (smallbig.cli.main) whose training set stops at chosen clip numbers until the
# test opens the gate: the test kills or restarts the server exactly between two epochs.
GATED = r"""
import os, sys, time
from pathlib import Path
import smallbig.engine.train as T
from smallbig.cli import main

GATE_DIR = Path(os.environ["GATE_DIR"])
GATE_AT = {int(x) for x in os.environ["GATE_AT"].split(",") if x}
FAIL_AT = int(os.environ.get("FAIL_AT", 0))  # this clip raises an I/O error (a dying disk)
_orig = T.default_builders

class Gated:
    def __init__(self, ds):
        self.ds, self.n = ds, 0
    def __len__(self):
        return len(self.ds)
    def __getitem__(self, i):
        self.n += 1
        if self.n == FAIL_AT:
            import errno
            raise OSError(errno.EIO, "Input/output error (injected)", "clip")
        if self.n in GATE_AT:
            (GATE_DIR / f"reached-{self.n}").touch()
            t0 = time.time()
            while not (GATE_DIR / f"open-{self.n}").exists():
                if time.time() - t0 > 300:
                    raise SystemExit(f"gate {self.n} never opened")
                time.sleep(0.02)
        return self.ds[i]

def builders():
    build_model, build_dataset, collate, normalize = _orig()
    def gated(params, split, mode, *a):
        ds = build_dataset(params, split, mode, *a)
        return Gated(ds) if split == "train" else ds
    return build_model, gated, collate, normalize

T.default_builders = builders
sys.exit(main(sys.argv[1:]))
"""
CLIPS_PER_EPOCH = 28  # 7 iterations x 2 clips x 2 accumulation steps


def _start_gated(tmp_path, args, gate_at, **env):
    gate = tmp_path / "gate"
    gate.mkdir(exist_ok=True)
    script = tmp_path / "gated_train.py"
    script.write_text(GATED)
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        env=_env(GATE_DIR=str(gate), GATE_AT=",".join(map(str, gate_at)), **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, gate


def _wait_gate(gate: Path, n: int, proc, timeout=300):
    t0 = time.time()
    while not (gate / f"reached-{n}").exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended before gate {n}: {proc.communicate()[1][-3000:]}")
        assert time.time() - t0 < timeout, f"gate {n} not reached"
        time.sleep(0.02)


def _run_of(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    return run


def _steps(client, run_id, key="loss"):
    return [m.step for m in client.get_metric_history(run_id, key)]


# --------------------------------------------------------------------------- 1. MLflow server faults
def test_server_killed_mid_training_training_finishes_and_reports_the_gap(toy, tmp_path):
    from mlflow.tracking import MlflowClient

    server = TrackingServer(tmp_path / "server")
    uri = server.start()
    out = tmp_path / "run"
    try:
        proc, gate = _start_gated(
            tmp_path,
            ["train", str(toy / "params3.yaml"), "--out", str(out), "--no-progress"],
            [CLIPS_PER_EPOCH + 1],
            MLFLOW_TRACKING_URI=uri,
        )
        _wait_gate(gate, CLIPS_PER_EPOCH + 1, proc)  # epoch 1 done and sent, epoch 2 starting
        server.proc.kill()  # the server dies (SIGKILL: no clean shutdown)
        server.proc.wait()
        t0 = time.time()
        (gate / f"open-{CLIPS_PER_EPOCH + 1}").touch()
        _, err = proc.communicate(timeout=300)
        seconds = time.time() - t0
    finally:
        server.stop()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert seconds < 60, f"the rest of the training took {seconds:.0f} s with the server dead"
    assert load_checkpoint(out / "checkpoint.pt")["iteration"] == 21
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [1, 2, 3]
    run_id = json.loads((out / "train_metrics.json").read_text())["mlflow_run_id"]
    log = (out / "train.log").read_text()
    assert (
        f"WARNING: MLflow store {uri} unreachable (connection refused) while sending metrics (step 2) "
        f"of run {run_id}" in log
    ), log
    assert f"WARNING: MLflow store {uri} still unreachable at the end" in log, log
    assert "loss" in log and "step(s) 2, 3" in log and "artifact(s) history.json, train_metrics.json" in log
    unsent = json.loads((out / "mlflow-unsent.json").read_text())
    assert unsent["run_id"] == run_id and unsent["tracking_uri"] == uri
    steps = sorted({m["step"] for r in unsent["records"] for m in r.get("metrics", []) if m["key"] == "loss"})
    assert steps == [2, 3]
    assert {"terminate": "FINISHED"} in unsent["records"]
    # the server's store got epoch 1 (sent before the kill), nothing after
    client = MlflowClient(f"sqlite:///{server.db}")
    assert _steps(client, run_id) == [1]
    assert client.get_run(run_id).info.status == "RUNNING"  # as reported in the log


def test_server_back_later_gets_the_kept_metrics(toy, tmp_path):
    """Killed after epoch 1, restarted (same port and store) before epoch 3: epoch 2's metrics,
    kept in memory, reach the store with epoch 3's, and the run ends FINISHED."""
    from mlflow.tracking import MlflowClient

    server = TrackingServer(tmp_path / "server")
    uri = server.start()
    port = server.info["port"]
    out = tmp_path / "run"
    g2, g3 = CLIPS_PER_EPOCH + 1, 2 * CLIPS_PER_EPOCH + 1
    try:
        proc, gate = _start_gated(
            tmp_path,
            ["train", str(toy / "params3.yaml"), "--out", str(out), "--no-progress"],
            [g2, g3],
            MLFLOW_TRACKING_URI=uri,
            SMALLBIG_MLFLOW_RETRY_S="0",
        )
        _wait_gate(gate, g2, proc)
        server.proc.kill()
        server.proc.wait()
        (gate / f"open-{g2}").touch()
        _wait_gate(gate, g3, proc)  # epoch 2 ended while the server was dead
        server = TrackingServer(tmp_path / "server", port=port)
        server.uri_file.unlink(missing_ok=True)
        assert server.start() == uri
        (gate / f"open-{g3}").touch()
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        run_id = json.loads((out / "train_metrics.json").read_text())["mlflow_run_id"]
        client = MlflowClient(uri)
        assert _steps(client, run_id) == [1, 2, 3]
        assert _steps(client, run_id, "val_top1") == [1, 2, 3]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert {"history.json", "train_metrics.json", "params.yaml"} <= {
            a.path for a in client.list_artifacts(run_id)
        }
    finally:
        server.stop()
    log = (out / "train.log").read_text()
    assert "unreachable (connection refused) while sending metrics (step 2)" in log, log
    assert f"MLflow store {uri} answers again after" in log, log
    assert "still unreachable" not in log and not (out / "mlflow-unsent.json").exists()


class BlackHole:
    """A TCP listener that accepts connections and never answers (a hung server, a firewall
    that drops replies)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.done = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.done:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)

    def close(self):
        self.done = True
        for c in self.conns:
            c.close()
        self.sock.close()


def test_server_that_never_answers_costs_seconds_not_minutes(toy, tmp_path):
    hole = BlackHole()
    out = tmp_path / "run"
    uri = f"http://127.0.0.1:{hole.port}"
    try:
        t0 = time.time()
        res = subprocess.run(
            SMALLBIG + ["train", str(toy / "params.yaml"), "--out", str(out), "--no-progress"],
            capture_output=True,
            text=True,
            env=_env(MLFLOW_TRACKING_URI=uri),
            timeout=600,
        )
        seconds = time.time() - t0
    finally:
        hole.close()
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert hole.conns, "the training never tried the server"
    ref = float((toy / "ref-seconds.txt").read_text())
    # MLflow's defaults: 7 retries x 120 s per call. Ours: 2 tries x 10 s, once.
    assert seconds < ref + 45, f"{seconds:.0f} s with a silent server vs {ref:.0f} s without MLflow"
    assert (
        f"WARNING: MLflow store {uri} unreachable (no answer within 10 s): this train is NOT "
        f"recorded in MLflow"
    ) in res.stderr
    assert _same_weights(toy / "ref" / "checkpoint.pt", out / "checkpoint.pt")
    assert json.loads((out / "train_metrics.json").read_text())["mlflow_run_id"] is None
    print(f"\nsilent server: training {seconds:.1f} s, without MLflow {ref:.1f} s")


# --------------------------------------------------------------------------- 2. failed resume
@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # schema created once
    return uri


def _run_id_for(client, out: Path) -> str:
    """The run of training directory `out`, found in the store (tag out_dir)."""
    exp = client.get_experiment_by_name("k400-r23-sb-full")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.out_dir = '{out.resolve()}'")
    return run.info.run_id


def _train(toy, out, uri, *extra, params="params.yaml"):
    return subprocess.run(
        SMALLBIG + ["train", str(toy / params), "--out", str(out), "--no-progress", *extra],
        capture_output=True,
        text=True,
        env=_env(MLFLOW_TRACKING_URI=uri),
        timeout=600,
    )


def test_failed_resume_ends_the_run_failed_not_running(toy, tmp_path, sqlite_store):
    from mlflow.tracking import MlflowClient

    uri, out = sqlite_store, tmp_path / "run"
    proc = subprocess.Popen(
        SMALLBIG + ["train", str(toy / "params.yaml"), "--out", str(out), "--no-progress"],
        env=_env(MLFLOW_TRACKING_URI=uri),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.time()
    while not (out / "last.prev.pt").exists():  # two checkpoints written
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < 300
        time.sleep(0.01)
    proc.kill()  # SIGKILL: the run is left RUNNING
    proc.communicate()
    client = MlflowClient(uri)
    run_id = _run_id_for(client, out)
    assert client.get_run(run_id).info.status == "RUNNING"
    for name in ("last.pt", "last.prev.pt"):  # both checkpoints unreadable: nothing to resume
        (out / name).write_bytes(b"PK\x03\x04 garbage")
    res = _train(toy, out, uri, "--resume")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "checkpoint error" in res.stderr and "Traceback" not in res.stderr
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["smallbig.error"].startswith("resume failed: CheckpointError: ")
    assert f"MLflow run {run_id} (RUNNING) marked FAILED" in res.stderr


def test_failure_after_the_run_resumed_ends_it_failed(toy, tmp_path, sqlite_store):
    """Stopped by SIGTERM (exit 3: the run is KILLED), resumed, and the resumed process fails
    in its first iteration (an I/O error reading a clip): the run ends FAILED."""
    from mlflow.tracking import MlflowClient

    uri, out = sqlite_store, tmp_path / "run"
    proc = subprocess.Popen(
        SMALLBIG + ["train", str(toy / "params.yaml"), "--out", str(out), "--no-progress"],
        env=_env(MLFLOW_TRACKING_URI=uri),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.time()
    while not (out / "last.pt").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < 300
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    client = MlflowClient(uri)
    run_id = _run_id_for(client, out)
    assert client.get_run(run_id).info.status == "KILLED"  # a preemption stop: KILLED, exit 3
    proc, _ = _start_gated(
        tmp_path,
        ["train", str(toy / "params.yaml"), "--out", str(out), "--no-progress", "--resume"],
        [],
        MLFLOW_TRACKING_URI=uri,
        FAIL_AT="1",
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "Input/output error (injected)" in err, err[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FAILED", (run.info.status, err[-3000:])
    assert run.data.tags["resumed"] == "true"
    assert "Input/output error (injected)" in run.data.tags["smallbig.error"]


def test_resume_refused_on_a_finished_run_leaves_it_finished(toy, tmp_path, sqlite_store):
    from mlflow.tracking import MlflowClient

    uri, out = sqlite_store, tmp_path / "run"
    assert _train(toy, out, uri).returncode == 0
    run_id = _run_id_for(MlflowClient(uri), out)
    res = _train(toy, out, uri, "--resume", params="params3.yaml")  # other params: refused
    assert res.returncode == 2 and "different params" in res.stderr
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"


# --------------------------------------------------------------------------- 3. disk full
def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.environ.get("SMALLBIG_TEST_NO_MOUNT"):  # exercise the fallback
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    return r.returncode == 0


def _limit_file_size(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG, not death
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_disk_full_while_writing_a_checkpoint(toy, tmp_path):
    size = (toy / "ref" / "last.pt").stat().st_size
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, 2 * size + 64 * 1024)  # room for 2 checkpoints, not 3
    try:
        out = disk / "run"
        cmd = SMALLBIG + ["train", str(toy / "params.yaml"), "--out", str(out), "--no-progress"]
        env = _env(SMALLBIG_NO_MLFLOW="1")
        if mounted:
            # iteration 3: last.pt; 6: last.pt + last.prev.pt; 7 (epoch end): a third does not fit
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            kept, why = {"last.pt": 6, "last.prev.pt": 3}, "disk full"
        else:
            # no mount here: a first process stops (SIGTERM) after its first checkpoint, the
            # resume runs under a file size limit smaller than a checkpoint (EFBIG)
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            while not (out / "last.pt").exists():
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=300) == 3
            kept = {p.name: load_checkpoint(p)["iteration"] for p in out.glob("*.pt")}
            res = subprocess.run(
                cmd + ["--resume"],
                capture_output=True,
                text=True,
                env=env,
                timeout=600,
                preexec_fn=_limit_file_size(size // 2),
            )
            why = "file size limit exceeded"
        assert res.returncode == 1, res.stderr[-3000:]
        err = [line for line in res.stderr.splitlines() if "error" in line]
        assert len(err) == 1 and err[0].startswith(
            f"smallbig train: error: {out / 'last.pt'}: {why} while writing checkpoint"
        ), res.stderr
        assert "Traceback" not in res.stderr
        assert "intact: " + ", ".join(sorted(kept)) in err[0]
        for name, iteration in kept.items():  # the previous checkpoints are whole
            assert load_checkpoint(out / name)["iteration"] == iteration
        assert sorted(p.name for p in out.iterdir() if p.name.endswith(".pt")) == sorted(kept)
        assert not [p.name for p in out.iterdir() if "tmp" in p.name]  # no partial file
        assert not (out / "checkpoint.pt").exists()
        # space again: the resume finishes with exactly the weights of an uninterrupted run
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        res = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert _same_weights(toy / "ref" / "checkpoint.pt", out / "checkpoint.pt")
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    print(f"\ndisk full: {'ENOSPC on a tmpfs' if mounted else 'EFBIG under RLIMIT_FSIZE'}")


# --------------------------------------------------------------------------- 4. evaluate + SIGKILL
def test_evaluate_sigkilled_at_random_moments_then_rerun_gives_the_same_scores(toy, tmp_path):
    ck = toy / "ref" / "checkpoint.pt"
    cmd = SMALLBIG + ["evaluate", str(toy / "params.yaml"), "--checkpoint", str(ck), "--no-progress"]
    env = _env(SMALLBIG_NO_MLFLOW="1")
    t0 = time.time()
    res = subprocess.run(
        cmd + ["--out", str(tmp_path / "whole")], capture_output=True, text=True, env=env, timeout=600
    )
    ref_seconds = time.time() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    ref = metrics.load_scores(tmp_path / "whole" / "scores.npz")
    ref_metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert ref["logits"].shape == (15, 30, 8)

    out = tmp_path / "killed"
    out.mkdir()
    # outputs of an older evaluation in the directory: never to be taken for this one's
    np.savez(out / "scores.npz", logits=np.zeros((1, 1, 8), np.float32))
    (out / "metrics.json").write_text('{"stale": true}')
    rng = random.Random(11)
    moments = sorted(rng.uniform(0.3, 1.0) * ref_seconds for _ in range(3))
    for at in moments:
        proc = subprocess.Popen(
            cmd + ["--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        time.sleep(at)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        names = sorted(p.name for p in out.iterdir())
        stale = (
            json.loads((out / "metrics.json").read_text()).get("stale")
            if (out / "metrics.json").exists()
            else None
        )
        if not stale:  # this evaluation got going: its outputs are complete or absent
            if (out / "metrics.json").exists():
                assert (out / "scores.npz").exists(), names
            if (out / "scores.npz").exists():
                s = metrics.load_scores(out / "scores.npz")
                assert np.array_equal(s["logits"], ref["logits"]), f"partial scores.npz at {at:.2f} s"
        # a partial file is only ever a dot-file (never under a final name)
        assert all(n in ("scores.npz", "metrics.json") or n.startswith(".") for n in names), names
    res = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = metrics.load_scores(out / "scores.npz")
    for key in ("logits", "labels", "video_ids", "clip_idx", "crop_idx"):
        assert np.array_equal(got[key], ref[key]), key
    assert got["logits"].tobytes() == ref["logits"].tobytes()  # bitwise
    m = json.loads((out / "metrics.json").read_text())
    assert {k: v for k, v in m.items() if k != "seconds"} == {
        k: v for k, v in ref_metrics.items() if k != "seconds"
    }
    print(f"\nevaluate killed at {', '.join(f'{t:.2f}' for t in moments)} s of {ref_seconds:.2f} s")


# --------------------------------------------------------------------------- 5. telemetry
def test_mlflow_telemetry_stays_off(toy, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = _env(
        HOME=str(home),
        XDG_CONFIG_HOME=None,
        MLFLOW_DISABLE_TELEMETRY=None,
        DO_NOT_TRACK=None,
        MLFLOW_TRACKING_URI=uri,
        **dict.fromkeys(CI_VARS),
    )
    res = subprocess.run(
        SMALLBIG + ["train", str(toy / "params.yaml"), "--out", str(tmp_path / "run"), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "train_metrics.json").read_text())["mlflow_run_id"]
    telemetry = home / ".config" / "mlflow" / "telemetry.json"
    assert not telemetry.exists(), telemetry.read_text()
    # control: MLflow itself, same environment, telemetry not disabled -> it writes the file
    control = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mlflow.tracking import MlflowClient; import sys; "
            "MlflowClient(sys.argv[1]).search_experiments(); "
            "import time; time.sleep(1)",
            uri,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert control.returncode == 0, control.stderr[-2000:]
    assert telemetry.exists(), "control: MLflow wrote no telemetry file (test cannot fail)"
