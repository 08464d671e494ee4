"""MLflow on a cluster: `smallbig tracking serve` (a real MLflow server on 127.0.0.1) receives a
training's run, metrics and artifacts over HTTP and stops cleanly on SIGTERM; the workflow
config key `mlflow_tracking_uri` (the slurm profile's MLFLOW_URI) reaches every job's
environment; a cluster run left on SQLite is warned about."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from slurm.workspace import VENV_BIN, copy_repo
from test_engine import BUILDERS, tiny_params
from tracking_server import TrackingServer, mlflow_server

from smallbig.engine import tracking
from smallbig.engine import tracking_server as ts
from smallbig.engine.train import train


def _get(url: str, host: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _processes_with(needle: str) -> list[str]:
    """Command lines of live processes that contain `needle` (orphaned server processes)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            found.append(f"{d.name}: {cmd}")
    return found


# --------------------------------------------------------------------------- the server
def test_training_logs_to_the_server_over_http_and_sigterm_stops_it(tmp_path, monkeypatch, one_torch_thread):
    from mlflow.tracking import MlflowClient

    server = TrackingServer(tmp_path / "server")
    uri = server.start()
    try:
        port = server.info["port"]
        assert uri == f"http://127.0.0.1:{port}"
        assert server.info["backend_store_uri"] == f"sqlite:///{server.db}"
        assert server.info["artifacts_destination"] == str(server.artifacts)
        log = server.log_text()
        assert f"export MLFLOW_TRACKING_URI={uri}" in log  # what the jobs must use
        # Host-header check: this host's name is admitted (compute nodes use it), others are not
        api = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _get(api) == 200
        assert _get(api, host=f"{socket.gethostname()}:{port}") == 200
        assert _get(api, host=f"attacker.example:{port}") == 403

        # a tiny CPU training through the real engine, in a client directory of its own
        client_dir = tmp_path / "client"
        client_dir.mkdir()
        monkeypatch.chdir(client_dir)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.delenv("SMALLBIG_NO_MLFLOW", raising=False)
        monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
        p = tiny_params(epochs=2)
        p["id"] = "tracking-server-test"
        p["model"]["pretrained"] = "none"  # from scratch: no ImageNet file in the client dir
        out = client_dir / "run"
        assert train(p, out, builders=BUILDERS, progress=False) == 0
        assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"  # set where the run started

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("tracking-server-test")
        (run,) = client.search_runs([exp.experiment_id])
        rid = run.info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.params["train.lr"] == "0.05"
        assert [m.step for m in client.get_metric_history(rid, "loss")] == [1, 2]
        for key in ("lr", "val_top1", "clips_per_s"):
            assert len(client.get_metric_history(rid, key)) == 2, key
        assert json.loads((out / "train_metrics.json").read_text())["mlflow_run_id"] == rid
        # artifacts went over HTTP into the server's --artifacts-destination
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        arts = {a.path for a in client.list_artifacts(rid)}
        assert {"params.yaml", "history.json", "train_metrics.json"} <= arts
        stored = {f.name: f for f in server.artifacts.rglob("*") if f.is_file() and rid in str(f)}
        assert {"params.yaml", "history.json", "train_metrics.json"} <= set(stored)
        assert stored["history.json"].read_bytes() == (out / "history.json").read_bytes()
        got = client.download_artifacts(rid, "history.json", str(tmp_path))
        assert Path(got).read_bytes() == (out / "history.json").read_bytes()
        assert not any((client_dir / d).exists() for d in ("mlruns", "mlartifacts", "mlflow.db"))
    finally:
        t0 = time.time()
        rc = server.stop()
        seconds = time.time() - t0
    assert rc == 0, server.log_text()[-3000:]
    assert seconds < 20, f"SIGTERM took {seconds:.1f} s"
    assert "stopped (SIGTERM)" in server.log_text()
    assert not server.uri_file.exists()  # the URI file says "running": removed at shutdown
    assert _processes_with(f"--port {port} ") == []  # no orphaned mlflow/uvicorn process


def test_mlflow_server_helper_yields_a_working_uri(tmp_path):
    """The context manager the Slurm tests use (store under tmp_path, 127.0.0.1)."""
    from mlflow.tracking import MlflowClient

    with mlflow_server(tmp_path) as uri:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", uri)
        exp_id = MlflowClient(uri).create_experiment("helper")
        assert MlflowClient(uri).get_experiment(exp_id).name == "helper"
    assert (tmp_path / "mlflow-server" / "mlflow.db").is_file()


def test_server_options():
    allowed = ts.allowed_hosts(["login01", "10.1.2.3"], extra="mlflow.example.org")
    assert {"localhost:*", "127.0.0.1:*", "10.*", "192.168.*"} <= set(allowed)  # MLflow's own
    assert {"login01", "login01:*", "10.1.2.3:*", "mlflow.example.org"} <= set(allowed)
    cmd = ts.server_command(
        "mlflow",
        host="0.0.0.0",
        port=5000,
        backend_store_uri="sqlite:////local/mlflow.db",
        artifacts_destination="/local/artifacts",
        workers=1,
        allowed=allowed,
        cors_origins=["http://login01:5000"],
    )
    assert "--serve-artifacts" in cmd
    assert cmd[cmd.index("--artifacts-destination") + 1] == "/local/artifacts"
    assert cmd[cmd.index("--allowed-hosts") + 1] == ",".join(allowed)
    assert ts.filesystem_type("/proc/self") == "proc"
    assert ts.on_network_fs("/proc") is False


def test_serve_fails_cleanly_when_the_port_is_taken(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [
                str(VENV_BIN / "smallbig"),
                "tracking",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--store-dir",
                str(tmp_path / "s"),
                "--uri-file",
                str(tmp_path / "uri.json"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "exited" in r.stdout and not (tmp_path / "uri.json").exists()
    assert _processes_with(f"--port {port} ") == []


# --------------------------------------------------------------------------- the workflow
def test_workflow_tracking_env_logic(monkeypatch):
    from smallbig.config import REPO_ROOT

    env = {}
    assert tracking.workflow_tracking_env(None, env) is None and env == {}  # local/embedded
    env = {}
    assert tracking.workflow_tracking_env("http://login01:5000", env) is None
    assert env == {"MLFLOW_TRACKING_URI": "http://login01:5000"}
    env = {}  # slurm profile, MLFLOW_URI = "": SQLite mlflow.db, warned
    warning = tracking.workflow_tracking_env("unset", env)
    assert env == {} and f"sqlite:///{REPO_ROOT / 'mlflow.db'}" in warning
    assert "smallbig tracking serve" in warning and "MLFLOW_URI" in warning
    env = {"MLFLOW_TRACKING_URI": "http://exported:5000"}  # exported on the login node: kept
    assert tracking.workflow_tracking_env("", env) is None
    assert env == {"MLFLOW_TRACKING_URI": "http://exported:5000"}
    env = {}  # a SQLite file on the shared file system is just as unsafe
    assert "WARNING" in tracking.workflow_tracking_env("sqlite:////shared/mlflow.db", env)


def test_jobs_inside_slurm_warn_once_about_sqlite(monkeypatch, capsys):
    monkeypatch.setattr(tracking, "_warned_sqlite_in_slurm", False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    tracking._warn_sqlite_in_slurm("sqlite:////shared/mlflow.db")  # not in a Slurm job
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    tracking._warn_sqlite_in_slurm("http://login01:5000")  # a server: fine
    assert capsys.readouterr().err == ""
    tracking._warn_sqlite_in_slurm("sqlite:////shared/mlflow.db")
    tracking._warn_sqlite_in_slurm("sqlite:////shared/mlflow.db")
    err = capsys.readouterr().err
    assert err.count("WARNING: MLflow store is SQLite (sqlite:////shared/mlflow.db)") == 1


PROBE = """
configfile: "workflow/config/full.yaml"
include: "workflow/rules/common.smk"
rule probe:
    output: "probe.txt"
    shell: "echo ${{MLFLOW_TRACKING_URI:-unset}} > {output}"
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A scratch copy of the repository with a probe rule that writes what its shell sees; it
    includes the real workflow/rules/common.smk (and so loads the real config and params)."""
    root = copy_repo(tmp_path_factory.mktemp("probe") / "repo")
    (root / "probe.smk").write_text(PROBE)
    return root


def _snakemake(repo: Path, *args: str, path_prefix: str = "", **env_extra):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "SLURM_CONF") and not k.startswith("SLURM_")
    }
    env["PATH"] = f"{path_prefix}{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(env_extra)
    (repo / "probe.txt").unlink(missing_ok=True)
    return subprocess.run(
        [str(VENV_BIN / "snakemake"), "-s", "probe.smk", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_config_uri_reaches_the_rule_shells(repo):
    r = _snakemake(repo, "--cores", "1", "probe.txt", "--config", "mlflow_tracking_uri=http://127.0.0.1:9")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (repo / "probe.txt").read_text().strip() == "http://127.0.0.1:9"
    # the embedded profile sets no URI: the environment's (here: none) stays
    r = _snakemake(repo, "--profile", "embedded", "--cores", "1", "probe.txt")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (repo / "probe.txt").read_text().strip() == "unset"
    assert "WARNING: MLflow store is SQLite" not in r.stdout + r.stderr


def _slurm_profile(repo: Path, mlflow_uri: str) -> Path:
    """The repository's slurm profile with MLFLOW_URI set (nothing else changed)."""
    text = (repo / "workflow/profiles/slurm/config.yaml").read_text()
    new, n = re.subn(r'^(\s*- MLFLOW_URI = )""', rf'\g<1>"{mlflow_uri}"', text, flags=re.M)
    assert n == 1
    out = repo / f"profile-{abs(hash(mlflow_uri))}"
    out.mkdir(exist_ok=True)
    (out / "config.yaml").write_text(new)
    return out


def test_slurm_profile_uri_is_exported_to_every_job(repo, tmp_path):
    """Fake Slurm commands (no cluster): sbatch records the environment it was started with,
    which `--export=ALL` hands to the job, and the job's own snakemake command line."""
    bindir, calls = tmp_path / "bin", tmp_path / "sbatch-calls"
    bindir.mkdir()
    for name in ("sbatch", "sinfo", "squeue", "sacct", "scontrol", "sacctmgr", "srun", "scancel"):
        body = (
            (
                f'echo "URI=${{MLFLOW_TRACKING_URI:-unset}} ARGS=$*" >> {calls}\n'
                "echo 'sbatch: error: fake' >&2\n"
            )
            if name == "sbatch"
            else ""
        )
        (bindir / name).write_text(f"#!/bin/sh\n{body}exit 1\n")
        (bindir / name).chmod(0o755)
    profile = _slurm_profile(repo, "http://127.0.0.1:9")
    r = _snakemake(
        repo, "--profile", str(profile), "--retries", "0", "probe.txt", path_prefix=f"{bindir}{os.pathsep}"
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0 and calls.exists(), out[-3000:]  # submitted (and failed: fake)
    line = calls.read_text().splitlines()[0]
    assert line.startswith("URI=http://127.0.0.1:9 "), line
    assert "--export=ALL" in line
    assert "mlflow_tracking_uri=http://127.0.0.1:9" in line  # the job re-parses with it
    assert "WARNING: MLflow store is SQLite" not in out


def test_slurm_profile_without_a_server_warns_about_sqlite(repo):
    r = _snakemake(repo, "--profile", "slurm", "-n", "probe.txt")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "WARNING: MLflow store is SQLite" in out and "smallbig tracking serve" in out
    # a server exported on the login node instead of the profile line: no warning
    r = _snakemake(repo, "--profile", "slurm", "-n", "probe.txt", MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    assert r.returncode == 0
    assert "WARNING: MLflow store is SQLite" not in r.stdout + r.stderr
