"""MLflow tracking: a training run records params, per-epoch metrics, artifacts and tags; 8
concurrent writer processes against one fresh SQLite store lose no run."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from test_engine import BUILDERS, killing_builders, tiny_params

from smallbig.engine import tracking
from smallbig.engine.train import train


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One fresh SQLite store per module (MLflow's first-time schema migration takes seconds)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # creates and migrates the schema once
    return root, uri


@pytest.fixture
def use_store(store, monkeypatch):
    root, uri = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("SMALLBIG_NO_MLFLOW", raising=False)
    return root, uri


def test_default_store_is_repo_sqlite(monkeypatch):
    from smallbig.config import REPO_ROOT

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{REPO_ROOT / 'mlflow.db'}"
    assert tracking.artifact_root(tracking.tracking_uri()) == (REPO_ROOT / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.cluster:5000")
    assert tracking.tracking_uri() == "http://mlflow.cluster:5000"
    assert tracking.artifact_root(tracking.tracking_uri()) is None


def test_train_run_records_params_metrics_tags(use_store, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    root, uri = use_store
    data = tmp_path / "toydata"
    data.mkdir()
    (data / "manifest.json").write_text('{"train": 32}')
    (tmp_path / "toydata.dvc").write_text("outs:\n- md5: 0123abcd.dir\n  path: toydata\n")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    p = tiny_params(epochs=2)
    p["id"] = "mlflow-train-test"
    p["data"]["root"] = str(data)
    assert train(p, tmp_path / "run", builders=BUILDERS, progress=False) == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mlflow-train-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    prm, tags = run.data.params, run.data.tags
    assert prm["train.lr"] == "0.05" and prm["model.num_classes"] == "5"
    assert prm["engine.accum_steps"] == "2" and prm["engine.policy"] == "accumulate"
    assert prm["engine.amp_effective"] == "none"
    assert tags["dataset_manifest_sha256"] == hashlib.sha256(b'{"train": 32}').hexdigest()
    assert tags["dvc_md5"] == "0123abcd.dir" and tags["slurm_job_id"] == "4242"
    for key in ("git_commit", "git_dirty", "host", "torch", "cuda", "gpu_model", "gpu_count"):
        assert tags[key], key
    hist = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in hist] == [1, 2]
    for key in ("lr", "val_top1", "clips_per_s", "peak_mem_mb"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2, key
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"params.yaml", "train_metrics.json", "history.json"} <= arts
    # artifacts of a SQLite store sit next to the database
    assert (root / "mlruns").is_dir()
    metrics = json.loads((tmp_path / "run" / "train_metrics.json").read_text())
    assert metrics["mlflow_run_id"] == run.info.run_id


def test_resumed_training_continues_the_same_run(use_store, tmp_path):
    from mlflow.tracking import MlflowClient

    root, uri = use_store
    p = tiny_params(epochs=3)
    p["id"] = "mlflow-resume-test"
    assert train(p, tmp_path / "run", builders=killing_builders(13), progress=False) == 3
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mlflow-resume-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "KILLED"
    assert train(p, tmp_path / "run", resume=True, builders=BUILDERS, progress=False) == 0
    (again,) = client.search_runs([exp.experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.tags["resumed"] == "true"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]


LAUNCHER = """
import json, multiprocessing as mp, os, sys
from smallbig.engine import tracking          # MLflow imported once, no store opened yet
import mlflow.tracking, mlflow.store.tracking.sqlalchemy_store

def writer(i, queue):
    params = {"id": "concurrent-writers", "data": {"root": "/nonexistent", "dataset": "kinetics400"},
              "train": {"lr": 0.1 * i, "seed": i}}
    run = tracking.start_run(params, "train", run_name=f"writer-{i}")
    for step in range(1, 6):
        run.log_metrics({"loss": 1.0 / step, "writer": i}, step=step)
    run.finish("FINISHED")
    queue.put((os.getpid(), run.run_id))

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=writer, args=(i, queue)) for i in range(int(sys.argv[1]))]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    print(json.dumps({"results": results, "exitcodes": [p.exitcode for p in procs]}))
"""


def test_eight_concurrent_writers_lose_no_run(use_store, tmp_path):
    """8 writer processes (forked from a launcher that has imported MLflow but opened no store,
    so each opens its own SQLite connection) create runs and log metrics at the same time."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    root, uri = use_store
    (tmp_path / "launch.py").write_text(LAUNCHER)
    res = subprocess.run(
        [sys.executable, str(tmp_path / "launch.py"), "8"],
        capture_output=True,
        text=True,
        env=dict(os.environ, MLFLOW_TRACKING_URI=uri),
        timeout=400,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["exitcodes"] == [0] * 8
    results = out["results"]
    assert len({pid for pid, _ in results}) == 8  # 8 distinct writer processes
    ids = {rid for _, rid in results}
    assert len(ids) == 8
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("concurrent-writers")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert {r.info.run_id for r in runs} == ids
    for r in runs:
        assert r.info.status == "FINISHED"
        assert len(client.get_metric_history(r.info.run_id, "loss")) == 5
        assert r.data.params["train.seed"] == str(int(r.data.metrics["writer"]))


def test_concurrent_writers_on_a_store_that_does_not_exist_yet(tmp_path):
    """Jobs starting together on a fresh clone: the first ones create the SQLite schema at the same
    time. Unserialised, MLflow's migration is left half-done and every later run fails."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    (tmp_path / "launch.py").write_text(LAUNCHER)
    env = {k: v for k, v in os.environ.items() if k != "SMALLBIG_NO_MLFLOW"}  # other tests set it
    res = subprocess.run(
        [sys.executable, str(tmp_path / "launch.py"), "4"],
        capture_output=True,
        text=True,
        env=dict(env, MLFLOW_TRACKING_URI=uri),
        timeout=400,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["exitcodes"] == [0] * 4
    assert (tmp_path / "fresh" / "mlflow.db.lock").exists()  # creation went through the lock
    exp = MlflowClient(uri).get_experiment_by_name("concurrent-writers")
    runs = MlflowClient(uri).search_runs([exp.experiment_id])
    assert {r.info.run_id for r in runs} == {rid for _, rid in out["results"]}


def test_dvc_hash_from_dvc_file_or_lock(tmp_path):
    data = tmp_path / "data" / "k400"
    data.mkdir(parents=True)
    assert tracking.dvc_hash(data) is None
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  prepare:\n    cmd: smallbig data prepare\n    outs:\n"
        "    - path: data/k400\n      md5: feedbeef.dir\n      size: 10\n"
    )
    assert tracking.dvc_hash(data) == "feedbeef.dir"
    (tmp_path / "data" / "k400.dvc").write_text("outs:\n- md5: abc123.dir\n  path: k400\n")
    assert tracking.dvc_hash(data) == "abc123.dir"  # a .dvc file next to the data wins
