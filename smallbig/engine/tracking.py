"""MLflow tracking for every `smallbig train` / `smallbig evaluate` call.

Store: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<repo>/mlflow.db``. For any SQLite store
the artifacts go to ``mlruns/`` next to the database file (``<repo>/mlruns`` by default).
Experiment = the params ``id``. See the runs with::

    mlflow ui --backend-store-uri sqlite:///mlflow.db      # from the repository root

Many concurrent processes on ONE machine may write to one SQLite file: every store call is
retried with backoff on "database is locked"/"busy" errors and experiment-creation races, so no
run is lost. On a cluster SQLite is not safe (its file locking is unreliable over NFS and other
shared file systems): start `smallbig tracking serve` (smallbig/engine/tracking_server.py) and
point every job at it with MLFLOW_TRACKING_URI (the slurm profile's MLFLOW_URI line does that,
`workflow_tracking_env`). Jobs then upload artifacts over HTTP.

MLflow's usage telemetry is switched off for the processes that start runs
(MLFLOW_DISABLE_TELEMETRY=true unless the variable is set already).
"""
from __future__ import annotations

import hashlib
import json
import contextlib
import os
import platform
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from smallbig.config import REPO_ROOT, flatten

_RETRY_PATTERNS = ("locked", "busy", "unique constraint", "already exists", "disk i/o",
                   "deadlock", "could not obtain lock", "integrityerror")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def is_sqlite(uri: str) -> bool:
    """A store written by every client itself through the file system (SQLite; also MLflow's
    plain file store, `file:` or a bare path): unsafe for concurrent jobs on a shared file
    system. False for servers and databases (http(s), postgresql, mysql, databricks, ...)."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", uri)
    if not m:
        return uri not in ("databricks", "databricks-uc", "uc")
    return m.group(1).lower() in ("sqlite", "file")


CLUSTER_SQLITE_WARNING = (
    "WARNING: MLflow store is SQLite ({uri}) but this is a cluster run: SQLite's file locking is "
    "unsafe over NFS and other shared file systems, so concurrent jobs can corrupt or lose runs. "
    "Start a tracking server (`smallbig tracking serve`, docs/engine.md \"MLflow\") and set "
    "MLFLOW_URI in workflow/profiles/slurm/config.yaml (or --config mlflow_tracking_uri=URI).")


def workflow_tracking_env(value: str | None, environ=None) -> str | None:
    """Apply the workflow config key `mlflow_tracking_uri` (workflow/rules/common.smk).

    None (key absent: local and embedded profiles): nothing changes. A URI becomes
    MLFLOW_TRACKING_URI of this Snakemake process, so every rule shell inherits it and every
    Slurm job gets it (the plugin submits with `sbatch --export=ALL`; the job's own snakemake
    re-parses the Snakefile with the same config and sets it again). "unset" or "" (the slurm
    profile with an empty MLFLOW_URI; Snakemake turns an empty --config value into None, hence
    the word) leaves the environment alone. The key being present marks a cluster run: if the
    store is then SQLite, the warning text is returned (the caller prints it)."""
    environ = os.environ if environ is None else environ
    if value is None:
        return None
    value = str(value).strip()
    if value and value.lower() != "unset":
        environ["MLFLOW_TRACKING_URI"] = value
    uri = environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"
    return CLUSTER_SQLITE_WARNING.format(uri=uri) if is_sqlite(uri) else None


def disable_telemetry() -> None:
    """Opt this process out of MLflow's usage telemetry (an explicit setting is kept). MLflow
    decides when it is imported, so a client it already made is dropped."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if "mlflow.telemetry.client" in sys.modules:
        try:
            from mlflow.telemetry.client import set_telemetry_client

            set_telemetry_client()  # re-reads the environment: no client when disabled
        except Exception:
            pass


_warned_sqlite_in_slurm = False


def _warn_sqlite_in_slurm(uri: str) -> None:
    global _warned_sqlite_in_slurm
    if os.environ.get("SLURM_JOB_ID") and is_sqlite(uri) and not _warned_sqlite_in_slurm:
        _warned_sqlite_in_slurm = True
        print(f"smallbig: {CLUSTER_SQLITE_WARNING.format(uri=uri)}", file=sys.stderr, flush=True)


def artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store live in `mlruns/` next to the database file."""
    m = re.match(r"^sqlite:///(.+)$", uri)
    if not m:
        return None
    db = Path(m.group(1))
    if not db.is_absolute():
        db = Path.cwd() / db
    return (db.parent / "mlruns").resolve().as_uri()


def retry(fn, *args, attempts: int = 30, **kwargs):
    """Call fn, retrying transient store errors (SQLite lock contention) with jittered backoff."""
    delay = 0.05
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # sqlalchemy OperationalError wrapped in MlflowException, ...
            text = f"{type(e).__name__}: {e}".lower()
            if attempt == attempts - 1 or not any(p in text for p in _RETRY_PATTERNS):
                raise
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 2.0)


# --------------------------------------------------------------------------- tags
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info() -> dict:
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit or "unknown",
            "git_dirty": "unknown" if status is None else str(bool(status)).lower()}


def sha256_file(path: str | Path) -> str | None:
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_data_root(root: str | Path) -> Path:
    root = Path(root)
    if root.is_absolute() or root.exists():
        return root
    return REPO_ROOT / root


def dvc_hash(path: str | Path) -> str | None:
    """The DVC md5 of a tracked path, if known: from `<path>.dvc`, else from a dvc.lock (of the
    repository, or of any parent directory of `path`) whose outs list the path. None otherwise."""
    import yaml

    path = Path(path)
    dvc_file = path.with_name(path.name + ".dvc")
    if dvc_file.is_file():
        try:
            outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
            for out in outs:
                if out.get("md5"):
                    return str(out["md5"])
        except Exception:
            return None
    abspath = path.resolve()
    for base in [*abspath.parents, REPO_ROOT]:
        lock = base / "dvc.lock"
        if not lock.is_file():
            continue
        try:
            stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
        except Exception:
            continue
        for stage in stages.values():
            for out in (stage or {}).get("outs") or []:
                if (base / out.get("path", "")).resolve() == abspath and out.get("md5"):
                    return str(out["md5"])
    return None


def environment_tags() -> dict:
    tags = {"host": socket.gethostname(), "python": platform.python_version(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", "none")}
    torch = sys.modules.get("torch")  # train/evaluate have it; a bare tracking call need not pay
    if torch is not None:
        cuda = torch.cuda.is_available()
        tags.update({"torch": torch.__version__,
                     "cuda": str(torch.version.cuda) if torch.version.cuda else "none",
                     "gpu_count": str(torch.cuda.device_count() if cuda else 0),
                     "gpu_model": torch.cuda.get_device_name(0) if cuda else "none"})
    else:
        from importlib.metadata import version
        tags.update({"torch": version("torch"), "cuda": "unknown", "gpu_count": "unknown",
                     "gpu_model": "unknown"})
    if os.environ.get("SLURM_ARRAY_TASK_ID"):
        tags["slurm_array_task_id"] = os.environ["SLURM_ARRAY_TASK_ID"]
    tags.update(git_info())
    return tags


def data_tags(params: dict) -> dict:
    root = resolve_data_root(params["data"]["root"])
    return {"dataset": params["data"]["dataset"],
            "data_root": str(root),
            "dataset_manifest_sha256": sha256_file(root / "manifest.json") or "none",
            "dvc_md5": dvc_hash(root) or "unknown"}


# --------------------------------------------------------------------------- runs
def _value(v) -> str:
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


class Run:
    """One MLflow run (client API, retried). A no-op object when tracking is disabled."""

    def __init__(self, client, run_id: str | None):
        self.client = client
        self.run_id = run_id

    @property
    def enabled(self) -> bool:
        return self.client is not None

    def log_params(self, params: dict) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, _value(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            retry(self.client.log_batch, self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, _value(v)[:5000]) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            retry(self.client.log_batch, self.run_id, tags=items[i:i + 100])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and v is not None and not isinstance(v, bool)]
        if items:
            retry(self.client.log_batch, self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            retry(self.client.log_artifact, self.run_id, str(path), subdir)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            retry(self.client.set_terminated, self.run_id, status)


def disabled() -> bool:
    return os.environ.get("SMALLBIG_NO_MLFLOW", "").lower() in ("1", "true", "yes")


def get_experiment_id(client, name: str, uri: str) -> str:
    def get_or_create():
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        root = artifact_root(uri)
        location = f"{root}/{name}" if root else None
        return client.create_experiment(name, artifact_location=location)

    return retry(get_or_create)


@contextlib.contextmanager
def _store_creation_lock(uri: str):
    """Exclusive lock `<db>.lock` beside a SQLite store (no-op for other stores)."""
    m = re.match(r"^sqlite:///(.+)$", uri)
    if not m:
        yield
        return
    import fcntl

    db = Path(m.group(1))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def start_run(params: dict, kind: str, run_name: str | None = None, resume_run_id: str | None = None,
              extra_tags: dict | None = None, enabled: bool = True) -> Run:
    """Start (or resume) the run for a train/evaluate call and log params and tags."""
    if not enabled or disabled():
        return Run(None, None)
    disable_telemetry()  # before MLflow is imported
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    _warn_sqlite_in_slurm(uri)
    with _store_creation_lock(uri):
        # the first client on a fresh SQLite file creates and migrates the schema; two processes
        # doing that at once leave it half-migrated, so creation is serialised by a file lock
        client = retry(MlflowClient, uri)
        retry(client.search_experiments, max_results=1)
    if resume_run_id:
        try:
            run = retry(client.get_run, resume_run_id)
            retry(client.update_run, resume_run_id, status="RUNNING")
            r = Run(client, run.info.run_id)
            r.set_tags({"resumed": "true"})
            return r
        except Exception:
            pass  # different store: start a new run below and record where it came from
    exp_id = get_experiment_id(client, params["id"], uri)
    tags = {"smallbig.kind": kind, "mlflow.runName": run_name or f"{params['id']}-{kind}"}
    tags.update(environment_tags())
    tags.update(data_tags(params))
    if resume_run_id:
        tags["resumed_from_run"] = resume_run_id
    tags.update(extra_tags or {})
    run = retry(client.create_run, exp_id, run_name=tags["mlflow.runName"])
    r = Run(client, run.info.run_id)
    r.set_tags(tags)
    r.log_params(flatten(params))
    return r
