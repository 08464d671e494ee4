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

A tracking store that is down or does not answer never stops a training or an evaluation
(`Run`): MLflow's own HTTP retries are bounded (HTTP_DEFAULTS: a dead server costs about a second
per call, one that accepts and never answers ~20 s, once), the first failure puts the run
*offline*: every later record (metrics, params, tags, artifacts, the final status) is kept in
memory, the store is probed again every SMALLBIG_MLFLOW_RETRY_S seconds (default 60) and at the
end, and everything kept is sent, in order, as soon as it answers. What is still unsent at the end
is reported in the log and written to `<out>/mlflow-unsent.json`. A store that cannot be reached
when the run starts leaves that call untracked (reported); a resumed run keeps its id and is
brought up to date when the store answers.

Lineage and inputs (docs/engine.md "MLflow"): `dataset_input` describes a split of the prepared
data as an MLflow dataset (digest of the manifest and the videos used, counts as its profile;
`Run.log_inputs`); `Run.link_training` tags an evaluation with the training run it scores
(`smallbig.train_run_id`, and `mlflow.parentRunId` when that run is in the same experiment of
this store); system metrics (CPU, memory, disk, network; GPUs where MLflow finds `pynvml`) are
sampled by MLflow's SystemMetricsMonitor for every run unless
MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false. `Run.call` sends a record made by a function (the
final model, smallbig/engine/mlflow_models.py) under the same offline rules.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import random
import re
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from importlib.metadata import version
from pathlib import Path

import yaml

# MLflow itself is imported inside the functions that talk to a store: its telemetry must be
# switched off before the import (disable_telemetry), and the workflow imports this module when
# it parses the Snakefile (workflow_tracking_env), where MLflow is not needed.
try:
    import requests
except ImportError:  # MLflow's HTTP client; absent, no request can fail with its errors
    requests = None

from smallbig.config import REPO_ROOT, flatten
from smallbig.fsutil import atomic_write_text
from smallbig.gitinfo import git_info

_RETRY_PATTERNS = (
    "locked",
    "busy",
    "unique constraint",
    "already exists",
    "disk i/o",
    "deadlock",
    "could not obtain lock",
    "integrityerror",
)

# MLflow's defaults retry a failed HTTP call 7 times with backoff factor 2 and wait 120 s for an
# answer: minutes per call against a dead server, ~16 min against one that never answers. Ours
# (an explicit setting in the environment is kept): one retry, 10 s per request.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
RETRY_ENV = "SMALLBIG_MLFLOW_RETRY_S"  # seconds between probes of a store that went away
UNSENT_FILE = "mlflow-unsent.json"


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
    'Start a tracking server (`smallbig tracking serve`, docs/engine.md "MLflow") and set '
    "MLFLOW_URI in workflow/profiles/slurm/config.yaml (or --config mlflow_tracking_uri=URI)."
)


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


def bound_http_retries(environ=None) -> None:
    """Apply HTTP_DEFAULTS to the environment (MLflow reads these variables at every request)."""
    environ = os.environ if environ is None else environ
    for k, v in HTTP_DEFAULTS.items():
        environ.setdefault(k, v)


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


@contextlib.contextmanager
def default_store(uri: str):
    """MLflow's own default store is `uri` inside the block, for the MLflow calls that take no
    store (Model.log, register_model, artifact downloads). `mlflow.set_tracking_uri` also sets
    MLFLOW_TRACKING_URI; both are put back afterwards, so a caller's setting never changes."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as mlflow_uri

    env = os.environ.get("MLFLOW_TRACKING_URI")
    old = getattr(mlflow_uri, "_tracking_uri", None)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old)  # None (not set before) unsets it again
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


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
def git_tags() -> dict:
    """MLflow tags git_commit ('unknown' outside a repository) and git_dirty ('true', 'false',
    'unknown') of the package's checkout (smallbig.gitinfo)."""
    g = git_info(REPO_ROOT)
    return {
        "git_commit": g["commit"] or "unknown",
        "git_dirty": "unknown" if g["dirty"] is None else str(g["dirty"]).lower(),
    }


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
    tags = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", "none"),
    }
    torch = sys.modules.get("torch")  # train/evaluate have it; a bare tracking call need not pay
    if torch is not None:
        cuda = torch.cuda.is_available()
        tags.update(
            {
                "torch": torch.__version__,
                "cuda": str(torch.version.cuda) if torch.version.cuda else "none",
                "gpu_count": str(torch.cuda.device_count() if cuda else 0),
                "gpu_model": torch.cuda.get_device_name(0) if cuda else "none",
            }
        )
    else:
        tags.update(
            {"torch": version("torch"), "cuda": "unknown", "gpu_count": "unknown", "gpu_model": "unknown"}
        )
    if os.environ.get("SLURM_ARRAY_TASK_ID"):
        tags["slurm_array_task_id"] = os.environ["SLURM_ARRAY_TASK_ID"]
    tags.update(git_tags())
    return tags


def data_tags(params: dict) -> dict:
    root = resolve_data_root(params["data"]["root"])
    return {
        "dataset": params["data"]["dataset"],
        "data_root": str(root),
        "dataset_manifest_sha256": sha256_file(root / "manifest.json") or "none",
        "dvc_md5": dvc_hash(root) or "unknown",
    }


DATASET_CONTEXTS = ("training", "validation", "evaluation")


def _manifest(root: Path) -> tuple[str, dict]:
    """(SHA-256 of root/manifest.json or 'none', its parsed content or {})."""
    digest = sha256_file(root / "manifest.json") or "none"
    try:
        content = json.loads((root / "manifest.json").read_text()) if digest != "none" else {}
    except (OSError, ValueError):
        content = {}
    return digest, content if isinstance(content, dict) else {}


def dataset_input(params: dict, split: str, dataset, context: str):
    """The MLflow dataset input (the entity `mlflow.log_input` sends) of `split` of the params'
    prepared data, as used by this run (`dataset`: what build_dataset gave; its `entries` when
    it has them). Name `<data.dataset>-<split>`; digest: 20 hex digits of the SHA-256 over
    manifest.json's SHA-256, the split and every (path, label) used, so the same videos of the
    same prepared data give the same digest; source: the split's list file; profile: counts
    (videos used, in the list, quarantined), the list's and manifest's SHA-256, the DVC md5;
    tag mlflow.data.context = `context` (training, validation, evaluation)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    root = resolve_data_root(params["data"]["root"])
    manifest_sha, manifest = _manifest(root)
    info = (manifest.get("splits") or {}).get(split) or {}
    h = hashlib.sha256(f"{manifest_sha}\n{split}\n".encode())
    entries = getattr(dataset, "entries", None)
    for e in entries if entries is not None else []:
        h.update(f"{e.path}\t{e.label}\n".encode())
    if entries is None:  # a dataset without a list (tests' in-memory ones): its size only
        h.update(f"{len(dataset)} items\n".encode())
    profile = {
        "split": split,
        "videos_used": len(dataset),
        "videos_in_list": info.get("count"),
        "quarantined": info.get("quarantined"),
        "list_sha256": info.get("sha256"),
        "manifest_sha256": manifest_sha,
        "num_classes": manifest.get("num_classes"),
        "dvc_md5": dvc_hash(root) or "unknown",
    }
    ds = Dataset(
        name=f"{params['data']['dataset']}-{split}",
        digest=h.hexdigest()[:20],
        source_type="local",
        source=json.dumps({"uri": str(root / f"{split}.txt")}),
        profile=json.dumps(profile),
    )
    return DatasetInput(ds, [InputTag("mlflow.data.context", context)])


# --------------------------------------------------------------------------- runs
def _value(v) -> str:
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _default_log(message: str) -> None:
    print(f"smallbig: {message}", file=sys.stderr, flush=True)


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


_UNREACHABLE = (
    "connection refused",
    "max retries exceeded",
    "timed out",
    "timeout",
    "connection reset",
    "connection aborted",
    "remote end closed",
    "broken pipe",
    "name or service not known",
    "temporary failure in name resolution",
    "no route to host",
    "network is unreachable",
    "unable to open database file",
)


def transient(e: BaseException) -> bool:
    """True when the store did not answer (refused, reset, timed out, 5xx/429 after MLflow's
    retries, a SQLite store still locked after ours): the same record can be sent again later.
    False when the store answered and refused the record (4xx: bad value, unknown run, ...)."""
    for x in _chain(e):
        if isinstance(x, (ConnectionError, TimeoutError)):
            return True
        if requests is not None and isinstance(
            x, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
        ):
            return True
        text = f"{type(x).__name__}: {x}".lower()
        code = re.search(r"failed with error code (\d+)", text)
        if code:
            return int(code.group(1)) >= 500 or int(code.group(1)) in (408, 429)
        if ("api request to" in text and "failed with" in text) or any(
            p in text for p in _UNREACHABLE + _RETRY_PATTERNS
        ):
            return True
    return False


def _reason(e: BaseException) -> str:
    """A one-line cause: 'connection refused', 'no answer within 10 s', or the error's first line."""
    text = " ".join(f"{type(x).__name__}: {x}" for x in _chain(e)).lower()
    if "connection refused" in text:
        return "connection refused"
    if "timed out" in text or "timeout" in text:
        return f"no answer within {os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT', '?')} s"
    if "name or service not known" in text or "name resolution" in text:
        return "host name not found"
    m = re.search(r"too many (\d+) error responses", text)
    if m:
        return f"HTTP {m.group(1)} from the server"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"{type(e).__name__}: {first[:300]}"


def probe(uri: str, timeout: float = 5.0) -> bool:
    """Does the store answer? An http(s) server: GET /health gets any HTTP answer but a gateway
    error. Other stores (SQLite, databases): True (the next real call decides)."""
    if not re.match(r"^https?://", uri, re.I):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except Exception:
        return False


def _summary(ops: list) -> str:
    metrics, params, tags, arts, other = {}, 0, 0, [], []
    for op in ops:
        if op[0] == "batch":
            for m in op[1]:
                metrics.setdefault(m.key, set()).add(m.step)
            params += len(op[2])
            tags += len(op[3])
        elif op[0] == "artifact":
            arts.append(op[1])
        elif op[0] == "inputs":
            names = [d.dataset.name for d in op[1]] + [f"model {m.model_id}" for m in op[2]]
            other.append(f"input(s) {', '.join(names)}")
        elif op[0] == "call":
            other.append(op[2])
        else:
            other.append(f"status {op[1]}")
    parts = []
    if metrics:
        steps = sorted(set().union(*metrics.values()))
        parts.append(
            f"{sum(len(v) for v in metrics.values())} metric value(s) "
            f"({', '.join(sorted(metrics))}; step(s) {', '.join(map(str, steps))})"
        )
    if params:
        parts.append(f"{params} param(s)")
    if tags:
        parts.append(f"{tags} tag(s)")
    if arts:
        parts.append(f"artifact(s) {', '.join(arts)}")
    return "; ".join(parts + other) or "nothing"


class Run:
    """One MLflow run (client API, retried). A no-op object when tracking is disabled.

    Never raises on a store problem: a record the store refuses is reported and dropped; a store
    that does not answer puts the run offline (records kept, sent when it answers again; see the
    module docstring). `unsent_file`: where the records still unsent at `finish` are written."""

    def __init__(self, client, run_id: str | None, uri: str = "", log=None):
        self.client = client
        self.run_id = run_id
        self.uri = uri
        self.log = log or _default_log
        self.pending: list[tuple] = []
        self.offline_since: float | None = None
        self.retry_at = 0.0
        self.unsent_file: Path | None = None
        self.sent_late = 0
        self.monitor = None  # MLflow's SystemMetricsMonitor, while the run is open

    @property
    def enabled(self) -> bool:
        return self.client is not None

    @property
    def offline(self) -> bool:
        return self.offline_since is not None

    # ---- sending
    def _send(self, op: tuple) -> None:
        kind = op[0]
        if kind == "batch":
            retry(self.client.log_batch, self.run_id, metrics=op[1], params=op[2], tags=op[3])
        elif kind == "artifact":
            _, name, subdir, path, data = op
            if data is None:
                retry(self.client.log_artifact, self.run_id, str(path), subdir)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    (Path(tmp) / name).write_bytes(data)
                    retry(self.client.log_artifact, self.run_id, str(Path(tmp) / name), subdir)
        elif kind == "inputs":
            retry(self.client.log_inputs, self.run_id, datasets=op[1] or None, models=op[2] or None)
        elif kind == "call":
            retry(op[1], self.run_id)
        elif kind == "update":
            retry(self.client.update_run, self.run_id, status=op[1])
        elif kind == "terminate":
            retry(self.client.set_terminated, self.run_id, op[1])
        else:
            raise ValueError(f"unknown MLflow record {kind!r}")

    @staticmethod
    def _keepable(op: tuple) -> tuple:
        """An artifact is kept by content: its file may change or vanish before it is sent."""
        if op[0] == "artifact" and op[4] is None:
            try:
                return op[:4] + (Path(op[3]).read_bytes(),)
            except OSError:
                return op
        return op

    def _keep(self, op: tuple) -> None:
        self.pending.append(self._keepable(op))

    def _go_offline(self, e: BaseException, what: str) -> None:
        wait = float(os.environ.get(RETRY_ENV, 60))
        if not self.offline:
            self.offline_since = time.time()
            self.log(
                f"WARNING: MLflow store {self.uri} unreachable ({_reason(e)}) while sending "
                f"{what} of run {self.run_id}; carrying on without it: records are kept and "
                f"sent when it answers again (next try in {wait:.0f} s)"
            )
        self.retry_at = time.time() + wait

    def _reconnect(self, force: bool = False) -> bool:
        """Offline: if due (or forced) and the store answers, send every kept record in order."""
        if not force and time.time() < self.retry_at:
            return False
        if not probe(self.uri, timeout=min(5.0, float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", 10)))):
            self.retry_at = time.time() + float(os.environ.get(RETRY_ENV, 60))
            return False
        sent = 0
        while self.pending:
            op = self.pending[0]
            try:
                self._send(op)
            except Exception as e:
                if transient(e):
                    self.retry_at = time.time() + float(os.environ.get(RETRY_ENV, 60))
                    return False
                self.log(
                    f"WARNING: MLflow store {self.uri} refused a kept record of run "
                    f"{self.run_id} ({_summary([op])}): {_reason(e)}; dropped"
                )
            self.pending.pop(0)
            sent += 1
        self.sent_late += sent
        self.log(
            f"MLflow store {self.uri} answers again after {time.time() - self.offline_since:.0f} s "
            f"offline: sent the {sent} record(s) of run {self.run_id} kept meanwhile"
        )
        self.offline_since = None
        return True

    def _submit(self, op: tuple, what: str) -> None:
        if not self.enabled:
            return
        if self.offline and not self._reconnect():
            self._keep(op)
            return
        try:
            self._send(op)
        except Exception as e:
            if transient(e):
                self._go_offline(e, what)
                self._keep(op)
            else:
                self.log(
                    f"WARNING: MLflow store {self.uri} refused {what} of run {self.run_id}: "
                    f"{_reason(e)}; not recorded"
                )

    # ---- records
    def log_params(self, params: dict) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, _value(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._submit(("batch", [], items[i : i + 100], []), "params")

    def set_tags(self, tags: dict) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, _value(v)[:5000]) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self._submit(("batch", [], [], items[i : i + 100]), "tags")

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(k, float(v), ts, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and v is not None and not isinstance(v, bool)
        ]
        if items:
            self._submit(("batch", items, [], []), f"metrics (step {step or 0})")

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            self._submit(
                ("artifact", Path(path).name, subdir, str(path), None), f"artifact {Path(path).name}"
            )

    def log_inputs(self, datasets: list | None = None, model_ids: list[str] | None = None) -> None:
        """Inputs of the run (MLflow's `log_inputs`): DatasetInput entities (`dataset_input`)
        and LoggedModels (by id) it used."""
        if not self.enabled or not (datasets or model_ids):
            return
        from mlflow.entities import LoggedModelInput

        models = [LoggedModelInput(m) for m in model_ids or []]
        self._submit(("inputs", list(datasets or []), models), "the run's inputs")

    def call(self, fn, what: str, record: dict) -> None:
        """Send what `fn(run_id)` records (e.g. a logged model), under the offline rules: a store
        that does not answer keeps it for later; `record` describes it in mlflow-unsent.json."""
        self._submit(("call", fn, what, record), what)

    def link_training(self, train_run_id: str | None) -> None:
        """Lineage of an evaluation: the tag smallbig.train_run_id, and mlflow.parentRunId (the UI
        nests this run under it) when that run exists in this store and experiment."""
        if not self.enabled or not train_run_id:
            return
        tags = {"smallbig.train_run_id": train_run_id}
        if not self.offline:
            try:
                parent = retry(self.client.get_run, train_run_id)
                mine = retry(self.client.get_run, self.run_id)
                if parent.info.experiment_id == mine.info.experiment_id:
                    tags["mlflow.parentRunId"] = train_run_id
            except Exception as e:
                if transient(e):
                    self._go_offline(e, "the lineage tags")
        self.set_tags(tags)

    def start_system_metrics(self, resume: bool = False) -> None:
        """Sample CPU/memory/disk/network (and GPUs, if MLflow's `pynvml` is installed) into
        `system/*` metrics (MLflow's SystemMetricsMonitor, every
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s, default 10). It stops at the first store
        failure (the run's own records are kept, these samples are not)."""
        if not self.enabled or self.offline or not system_metrics_enabled():
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            for name in ("mlflow.system_metrics", "mlflow.utils.autologging_utils"):
                logging.getLogger(name).setLevel(logging.WARNING)  # no INFO lines in job logs
            self.monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume, tracking_uri=self.uri)
            self.monitor.start()
        except Exception as e:  # psutil missing, ...: the run goes on without them
            self.monitor = None
            self.log(f"system metrics not recorded ({_reason(e)})")

    def _stop_system_metrics(self, timeout: float = 10.0) -> None:
        monitor, self.monitor = self.monitor, None
        if monitor is None:
            return
        # its last calls may hit a store that went silent: wait boundedly, never hang the job
        t = threading.Thread(target=monitor.finish, daemon=True, name="stop-system-metrics")
        t.start()
        t.join(timeout)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with `status`; an offline run tries its store once more first. Whatever
        is still unsent is reported (log + `unsent_file`)."""
        if not self.enabled:
            return
        self._stop_system_metrics()
        if self.offline:
            self._reconnect(force=True)
        self._submit(("terminate", status), f"the final status {status}")
        if self.pending:
            self._report_unsent(status)

    def _report_unsent(self, status: str) -> None:
        where = ""
        if self.unsent_file is not None:
            records = []
            for op in self.pending:
                if op[0] == "batch":
                    records.append(
                        {
                            "metrics": [
                                {"key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp}
                                for m in op[1]
                            ],
                            "params": {p.key: p.value for p in op[2]},
                            "tags": {t.key: t.value for t in op[3]},
                        }
                    )
                elif op[0] == "artifact":
                    records.append({"artifact": op[1], "path": op[3], "subdir": op[2]})
                elif op[0] == "inputs":
                    records.append(
                        {
                            "datasets": [{"name": d.dataset.name, "digest": d.dataset.digest} for d in op[1]],
                            "models": [m.model_id for m in op[2]],
                        }
                    )
                elif op[0] == "call":
                    records.append(op[3])
                else:
                    records.append({op[0]: op[1]})
            try:
                path = Path(self.unsent_file)
                atomic_write_text(
                    path,
                    json.dumps(
                        {
                            "tracking_uri": self.uri,
                            "run_id": self.run_id,
                            "offline_since": time.strftime(
                                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.offline_since)
                            ),
                            "records": records,
                        },
                        indent=1,
                    )
                    + "\n",
                )
                where = f" Kept in {path};"
            except OSError as e:
                where = f" (could not write {self.unsent_file}: {e});"
        self.log(
            f"WARNING: MLflow store {self.uri} still unreachable at the end "
            f"({time.time() - self.offline_since:.0f} s offline): run {self.run_id} misses "
            f"{_summary(self.pending)}, and shows the status RUNNING there instead of "
            f"{status}.{where} the values are also in this call's own output files"
        )


def disabled() -> bool:
    return os.environ.get("SMALLBIG_NO_MLFLOW", "").lower() in ("1", "true", "yes")


def system_metrics_enabled() -> bool:
    """On unless MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING (MLflow's switch) says false/0/no."""
    return os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower() not in ("0", "false", "no")


def _get_or_create_experiment(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    root = artifact_root(uri)
    location = f"{root}/{name}" if root else None
    return client.create_experiment(name, artifact_location=location)


def get_experiment_id(client, name: str, uri: str) -> str:
    return retry(_get_or_create_experiment, client, name, uri)


@contextlib.contextmanager
def _store_creation_lock(uri: str):
    """Exclusive lock `<db>.lock` beside a SQLite store (no-op for other stores)."""
    m = re.match(r"^sqlite:///(.+)$", uri)
    if not m:
        yield
        return
    db = Path(m.group(1))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _untracked(e: Exception, client, uri: str, kind: str, resume_run_id: str | None, log, unsent_file) -> Run:
    """The store failed while the run was started: a resume whose store went away goes on
    offline under its id; anything else goes on untracked (reported)."""
    if resume_run_id and client is not None and transient(e):
        r = Run(client, resume_run_id, uri, log)
        r.unsent_file = Path(unsent_file) if unsent_file else None
        r._go_offline(e, f"the resume of {kind}")
        r._keep(("update", "RUNNING"))
        r._keep(("batch", [], [], [_tag("resumed", "true")]))
        return r
    log(
        f"WARNING: MLflow store {uri} {'unreachable' if transient(e) else 'failed'} "
        f"({_reason(e)}): this {kind} is NOT recorded in MLflow; it goes on, its results are in "
        f"its output files (--no-mlflow silences this)"
    )
    return Run(None, None)


def start_run(
    params: dict,
    kind: str,
    run_name: str | None = None,
    resume_run_id: str | None = None,
    extra_tags: dict | None = None,
    enabled: bool = True,
    log=None,
    unsent_file: str | Path | None = None,
) -> Run:
    """Start (or resume) the run for a train/evaluate call and log params and tags.

    A store that cannot be reached (or fails) here never fails the call: it is reported via
    `log`, and the run is a no-op one -- or, when resuming, an offline run under the same id
    (brought up to date if the store answers later)."""
    if not enabled or disabled():
        return Run(None, None)
    disable_telemetry()  # before MLflow is imported
    bound_http_retries()
    log = log or _default_log
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    _warn_sqlite_in_slurm(uri)
    client = None
    try:
        with _store_creation_lock(uri):
            # the first client on a fresh SQLite file creates and migrates the schema; two
            # processes doing that at once leave it half-migrated, so it is serialised by a lock
            client = retry(MlflowClient, uri)
            retry(client.search_experiments, max_results=1)
        found = None
        if resume_run_id:
            try:
                found = retry(client.get_run, resume_run_id)
            except Exception as e:
                if transient(e):
                    raise
                # another store: start a new run below and record where it came from
        if found is not None:
            r = Run(client, found.info.run_id, uri, log)
            r.unsent_file = Path(unsent_file) if unsent_file else None
            r._submit(("update", "RUNNING"), "the status RUNNING")
            r.set_tags({"resumed": "true"})
            r.start_system_metrics(resume=True)
            return r
        tags = {"smallbig.kind": kind, "mlflow.runName": run_name or f"{params['id']}-{kind}"}
        tags.update(environment_tags())
        tags.update(data_tags(params))
        if resume_run_id:
            tags["resumed_from_run"] = resume_run_id
        tags.update(extra_tags or {})
        exp_id = get_experiment_id(client, params["id"], uri)
        run = retry(client.create_run, exp_id, run_name=tags["mlflow.runName"])
    except Exception as e:
        if not isinstance(e, (MlflowException, OSError)) and not transient(e):
            raise
        return _untracked(e, client, uri, kind, resume_run_id, log, unsent_file)
    r = Run(client, run.info.run_id, uri, log)
    r.unsent_file = Path(unsent_file) if unsent_file else None
    r.set_tags(tags)
    r.log_params(flatten(params))
    r.start_system_metrics()
    return r


def _tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, value)


def fail_orphan_run(run_id: str, reason: str, log=None, statuses=("RUNNING", "KILLED")) -> str | None:
    """A call that was to continue run `run_id` (a resume) failed before it got there: end the
    run FAILED if it is still RUNNING (its process died) or KILLED (stopped, awaiting this
    resume), with the tag smallbig.error = reason. -> the status it had, None if left alone.
    Never raises. A later successful resume sets it RUNNING again."""
    if not run_id or disabled():
        return None
    log = log or _default_log
    disable_telemetry()
    bound_http_retries()
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri())
        before = retry(client.get_run, run_id).info.status
        if before not in statuses:
            return None
        retry(client.log_batch, run_id, tags=[_tag("smallbig.error", reason[:5000])])
        retry(client.set_terminated, run_id, "FAILED")
        log(f"MLflow run {run_id} ({before}) marked FAILED: {reason.splitlines()[0][:300]}")
        return before
    except Exception as e:
        log(f"WARNING: could not mark MLflow run {run_id} FAILED ({_reason(e)})")
        return None
