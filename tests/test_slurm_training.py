"""Trainings in their cluster shape, through a real single-node Slurm (2 fake GPUs) and the
user's slurm profile (`snakemake --profile <slurm profile with the test partition>`):

* a 2-GPU training runs exactly 2 ranks (torchrun in the batch step, world size 2), one
  checkpoint, exit 0; its Slurm job had 2 tasks and 2 GPUs; its MLflow run is on a tracking
  server on loopback (the profile's MLFLOW_URI);
* `scancel --signal=TERM --full` mid-epoch, 1 GPU and 2 GPUs: the training checkpoints and
  exits 3, Snakemake submits the job again, it resumes, and the final weights are bitwise equal
  to an uninterrupted run of the same params;
* a 1-minute partition limit (MAX_RUNTIME_MIN=1): every job stops itself before its limit,
  checkpoints, the next job resumes; same final weights;
* a signal after the last iteration: the retry completes with every declared output;
* a rank killed with SIGKILL ends its job (no hang) and the retry finishes the training.

Scenario runs share one cluster, one scratch copy and one toy dataset; each uses its own
`run` (results/<run>/) so the uninterrupted runs are the references of the interrupted ones."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from slurm.cluster import SlurmCluster, make_test_profile, missing_binaries
from slurm.workspace import REPO, VENV_BIN, copy_repo, env
from tracking_server import TrackingServer

pytestmark = pytest.mark.slow

TWO = "k400-r23-c2d"  # trained on 2 GPUs in these tests
ONE = "k400-r23-sb311"  # trained on 1 GPU
ITERS = {TWO: 18, ONE: 15}  # 95 toy videos, batch 16, 3 epochs: 6 (2 ranks) or 5 per epoch


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.fail(f"Slurm is not installed ({', '.join(missing)}): run `make system-deps`")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"), gpus=2)
    c.start()
    try:
        yield c
    finally:
        c.stop()


class Workspace:
    def __init__(self, root: Path, server: TrackingServer):
        self.root = root
        self.server = server
        self.profiles: dict[str, Path] = {}

    def profile(
        self, name: str = "default", max_runtime_min: int = 30, stop_before_limit_s: int = 300
    ) -> Path:
        if name not in self.profiles:
            p = make_test_profile(
                REPO / "slurm/config.yaml",
                self.root / f"profile-{name}",
                MAX_RUNTIME_MIN=max_runtime_min,
                MLFLOW_URI=f'"{self.server.uri}"',
            )
            cfg = p / "config.yaml"
            text = cfg.read_text()
            text, n = re.subn(
                r"stop_before_limit_s: \d+", f"stop_before_limit_s: {stop_before_limit_s}", text
            )
            assert n == 1
            cfg.write_text(text)
            self.profiles[name] = p
        return self.profiles[name]

    def command(
        self, run: str, targets: list[str], profile: str = "default", overlay: str = "params/slurm-test.yaml"
    ) -> list[str]:
        cfg = self.root / f"config-{run}.yaml"
        cfg.write_text(yaml.safe_dump({"run": run, "overlay": overlay}))
        # (--configfile, not --config: a --config replaces the profile's config section)
        return [
            str(VENV_BIN / "snakemake"),
            "--profile",
            str(self.profiles[profile]),
            *targets,
            "--configfile",
            "workflow/config/embedded.yaml",
            str(cfg),
        ]

    def start(self, run: str, exp: str, profile: str = "default", **kw) -> subprocess.Popen:
        out = open(self.root / f"snakemake-{run}-{exp}.log", "w")  # noqa: SIM115 - handed to Popen
        return subprocess.Popen(
            self.command(run, [self.ckpt(run, exp)], profile, **kw),
            cwd=self.root,
            env=env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def finish(self, proc: subprocess.Popen, run: str, exp: str, timeout: float = 900) -> str:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(  # noqa: B904 - the timeout itself says nothing moref"snakemake {run} {exp} did not finish in {timeout:.0f} s:\n"
                f"{self.snakemake_log(run, exp)[-4000:]}\n{self.train_log(run, exp)[-3000:]}"
            )
        text = self.snakemake_log(run, exp)
        assert proc.returncode == 0, (
            f"snakemake failed ({proc.returncode}):\n{text[-5000:]}\n{self.train_log(run, exp)[-3000:]}"
        )
        return text

    def run(self, run: str, exp: str, profile: str = "default", timeout: float = 900, **kw) -> str:
        return self.finish(self.start(run, exp, profile, **kw), run, exp, timeout)

    def ckpt(self, run: str, exp: str) -> str:
        return f"results/{run}/{exp}/train/checkpoint.pt"

    def snakemake_log(self, run: str, exp: str) -> str:
        f = self.root / f"snakemake-{run}-{exp}.log"
        return f.read_text(errors="replace") if f.exists() else ""

    def train_log(self, run: str, exp: str) -> str:
        """The current job's log (progress bar): replaced by each attempt."""
        f = self.root / f"logs/{run}/train/{exp}.log"
        return f.read_text(errors="replace") if f.exists() else ""

    def events(self, run: str, exp: str) -> str:
        """results/<run>/<exp>/train/train.log: the engine's messages over every job."""
        f = self.root / f"results/{run}/{exp}/train/train.log"
        return f.read_text(errors="replace") if f.exists() else ""

    def weights(self, run: str, exp: str) -> dict:
        return torch.load(self.root / self.ckpt(run, exp), map_location="cpu", weights_only=False)["model"]

    def progress(self, run: str, exp: str) -> int:
        """Iterations done by the training now running (from its progress bar in the log)."""
        found = re.findall(r"(\d+)/(\d+) \[", self.train_log(run, exp))
        return int(found[-1][0]) if found else 0


@pytest.fixture(scope="module")
def ws(cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("slurm-training")
    root = copy_repo(base / "repo")
    overlay = yaml.safe_load((root / "params/embedded.yaml").read_text())
    # 18 iterations of batch 16 (8 per GPU: 2 GPUs without, 1 GPU with accumulation), one
    # validation at the end, no periodic checkpoint: a resume can only start from the stop's
    overlay["all"]["train"].update(
        epochs=3, batch_size=16, per_gpu_batch=8, val_every_epochs=3, checkpoint_every_iters=1000
    )
    overlay.setdefault("experiments", {})[TWO] = {"resources": {"gpus": 2}}
    (root / "params/slurm-test.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))
    # the time-limit test: 72 epochs (360 iterations, ~80 s since issue 12's faster pooling; 24
    # epochs fitted in one job), longer than one 1-minute job allows (35 s of training)
    overlay["experiments"][ONE] = {"train": {"epochs": 72}}
    (root / "params/slurm-test-long.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))
    server = TrackingServer(base / "mlflow-server")
    server.start()
    w = Workspace(root, server)
    w.profile()
    try:
        yield w
    finally:
        server.stop()


def _job_of(exp: str, timeout: float = 600) -> str:
    """The Slurm job id of the running training of `exp` (from the plugin's job comment)."""
    end = time.time() + timeout
    while time.time() < end:
        out = subprocess.run(["squeue", "-h", "-o", "%i|%k|%T"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            jid, comment, state = line.split("|")
            if comment == f"rule_train_wildcards_{exp}" and state == "RUNNING":
                return jid
        time.sleep(0.5)
    raise AssertionError(f"no running training job of {exp}")


def _wait_progress(ws: Workspace, run: str, exp: str, lo: int, proc, timeout: float = 600) -> int:
    end = time.time() + timeout
    while time.time() < end:
        n = ws.progress(run, exp)
        if n >= lo:
            return n
        if proc.poll() is not None:
            raise AssertionError(
                f"snakemake ended before iteration {lo}:\n{ws.snakemake_log(run, exp)[-4000:]}"
            )
        time.sleep(0.1)
    raise AssertionError(f"{exp} did not reach iteration {lo}:\n{ws.train_log(run, exp)[-3000:]}")


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _mlflow_runs(ws: Workspace, exp: str, run_dir: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=ws.server.uri)
    runs = []
    for e in client.search_experiments():
        runs += client.search_runs([e.experiment_id])
    return [r for r in runs if r.data.tags.get("out_dir", "").endswith(f"results/{run_dir}/{exp}/train")]


def test_two_gpu_training_runs_two_ranks_and_logs_to_the_tracking_server(ws):
    """Also the uninterrupted references (2 GPUs and 1 GPU) of the tests below."""
    t0 = time.time()
    text = ws.run("ref", TWO)
    print(f"\n2-GPU training through Slurm (incl. toy data): {time.time() - t0:.0f} s")
    m = json.loads((ws.root / f"results/ref/{TWO}/train/train_metrics.json").read_text())
    assert m["world_size"] == 2 and m["iterations"] == ITERS[TWO]
    assert m["batch_plan"]["per_gpu_batch"] == 8 and m["batch_plan"]["accum_steps"] == 1
    log = ws.train_log("ref", TWO)
    assert "8/process x 1 accumulation x 2 process(es)" in log
    files = sorted(p.name for p in (ws.root / f"results/ref/{TWO}/train").glob("*.pt"))
    assert files.count("checkpoint.pt") == 1
    # the job: 2 tasks, 2 GPUs (scontrol still knows it for MinJobAge)
    jid = re.findall(r"SLURM jobid (\d+) \(log: \S*rule_train", text)
    shown = subprocess.run(["scontrol", "show", "job", jid[-1]], capture_output=True, text=True).stdout
    assert "NumTasks=2" in shown and "TresPerJob=gres:gpu:2" in shown, shown
    # MLflow: the run is on the loopback server, finished, with its artifacts uploaded over HTTP
    runs = _mlflow_runs(ws, TWO, "ref")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", runs
    assert "loss" in runs[0].data.metrics
    assert any(ws.server.artifacts.rglob("history.json"))
    ws.run("ref", ONE)
    m1 = json.loads((ws.root / f"results/ref/{ONE}/train/train_metrics.json").read_text())
    assert m1["world_size"] == 1 and m1["batch_plan"]["accum_steps"] == 2
    assert m1["iterations"] == ITERS[ONE]


@pytest.mark.parametrize("exp", [ONE, TWO])
def test_sigterm_full_mid_epoch_checkpoints_resubmits_resumes_bitwise(ws, exp):
    assert (ws.root / ws.ckpt("ref", exp)).exists(), "needs the reference run (test above)"
    proc = ws.start("sigterm", exp)
    jid = _job_of(exp)
    n = _wait_progress(ws, "sigterm", exp, 2, proc)
    subprocess.run(["scancel", "--signal=TERM", "--full", jid], check=True)
    text = ws.finish(proc, "sigterm", exp)
    log = ws.events("sigterm", exp)
    assert n < ITERS[exp] - 1, f"signalled too late ({n}/{ITERS[exp]})"
    assert re.search(r"stop \(signal SIGTERM\): checkpointed \S+last.pt at iteration \d+; exit 3", log), log[
        -3000:
    ]
    assert re.search(rf"resuming \S+last.pt at epoch \d, iteration [1-9]\d*/{ITERS[exp]}", log), log[-3000:]
    assert (
        "SLURM jobid" in text and len(re.findall(r"Job \d+ has been submitted with SLURM jobid", text)) >= 2
    )
    assert _equal(ws.weights("sigterm", exp), ws.weights("ref", exp))
    runs = _mlflow_runs(ws, exp, "sigterm")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the resumed run continues it


def test_time_limit_stops_before_it_resumes_in_the_next_job_bitwise(ws, tmp_path):
    """MAX_RUNTIME_MIN=1: each job stops itself 25 s before its 1-minute limit, checkpoints and
    exits 3; the next job resumes; the weights equal an uninterrupted run (on this machine,
    without Slurm) of the same params."""
    ws.profile("limit", max_runtime_min=1, stop_before_limit_s=25)
    t0 = time.time()
    text = ws.run("limit", ONE, profile="limit", timeout=1500, overlay="params/slurm-test-long.yaml")
    print(f"\n1-minute jobs: {time.time() - t0:.0f} s")
    log = ws.events("limit", ONE)
    stops = re.findall(r"stop \(the job's time limit is 25 s away or less", log)
    assert stops, log[-3000:]
    assert "resuming" in log
    assert "runtime=1," in text
    assert len(re.findall(r"submitted with SLURM jobid \d+ \(log: \S*rule_train", text)) >= 2
    m = json.loads((ws.root / f"results/limit/{ONE}/train/train_metrics.json").read_text())
    assert m["iterations"] == 360
    ref = tmp_path / "uninterrupted"
    # with the job's thread count: Snakemake sets OMP_NUM_THREADS to the rule's threads (1 here),
    # and another intra-op thread count sums in another order (the weights drift apart)
    r = subprocess.run(
        [
            str(VENV_BIN / "smallbig"),
            "train",
            f"results/limit/{ONE}/params.yaml",
            "--out",
            str(ref),
            "--no-mlflow",
            "--no-progress",
        ],
        cwd=ws.root,
        env=env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    uninterrupted = torch.load(ref / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    assert _equal(ws.weights("limit", ONE), uninterrupted)


def test_signal_after_the_last_iteration_leaves_a_complete_training(ws):
    exp = ONE
    proc = ws.start("late", exp)
    jid = _job_of(exp)
    _wait_progress(ws, "late", exp, ITERS[exp], proc)
    subprocess.run(["scancel", "--signal=TERM", "--full", jid], check=False)
    ws.finish(proc, "late", exp)
    out = ws.root / f"results/late/{exp}/train"
    for name in ("checkpoint.pt", "history.json", "train_metrics.json"):
        assert (out / name).is_file(), name
    assert len(json.loads((out / "history.json").read_text())) == 3
    assert _equal(ws.weights("late", exp), ws.weights("ref", exp))


def test_a_killed_rank_ends_the_job_and_the_retry_finishes(ws):
    exp = TWO
    proc = ws.start("kill", exp)
    jid = _job_of(exp)
    _wait_progress(ws, "kill", exp, 2, proc)
    # one of the two training processes (children of torchrun)
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    rows = [ln.split() for ln in ps.splitlines()[1:] if len(ln.split()) > 3]
    # the torchrun agent itself (python .../torchrun ...), not the rule's `bash -c "torchrun ..."`
    torchrun = [
        r[0]
        for r in rows
        if any(a.endswith("/torchrun") for a in r[2:4]) and f"results/kill/{exp}/" in " ".join(r)
    ]
    ranks = [r[0] for r in rows if r[1] in torchrun]
    assert len(torchrun) == 1 and len(ranks) == 2, ps
    t_kill = time.time()
    os.kill(int(ranks[1]), signal.SIGKILL)
    while time.time() - t_kill < 120:  # the job must end (not hang waiting for the dead rank)
        state = subprocess.run(
            ["squeue", "-h", "-j", jid, "-o", "%T"], capture_output=True, text=True
        ).stdout.strip()
        if state not in ("RUNNING", "COMPLETING"):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"job {jid} still running 120 s after a rank was killed")
    print(f"\njob ended {time.time() - t_kill:.1f} s after a rank was killed")
    ws.finish(proc, "kill", exp)
    m = json.loads((ws.root / f"results/kill/{exp}/train/train_metrics.json").read_text())
    assert m["world_size"] == 2 and m["iterations"] == ITERS[exp]
