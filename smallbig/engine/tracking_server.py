"""`smallbig tracking serve`: the MLflow tracking server that cluster jobs log to.

Runs ``mlflow server`` (a child process in its own process group) with:

* ``--backend-store-uri``: SQLite on the server host's *local* disk (only the server process
  writes it, so SQLite's locking is safe) or a PostgreSQL/MySQL URI. Default:
  ``sqlite:///<store dir>/mlflow.db``, store dir ``$XDG_DATA_HOME/smallbig/mlflow-server``
  (``~/.local/share/...``); a warning is printed when that path is on a network file system.
* ``--serve-artifacts --artifacts-destination DIR``: jobs upload artifacts over HTTP
  (``mlflow-artifacts:/`` URIs), so no path has to be shared between jobs and the server.
* ``--allowed-hosts``: MLflow (>= 3.5) rejects requests whose Host header is not localhost or a
  private IP (DNS-rebinding protection). Compute nodes address the server by its host name
  (``http://login01:5000``), so this host's names and addresses are added to MLflow's defaults.
* ``--workers``: 1 for SQLite (one writer process), MLflow's 4 otherwise.

The child runs with ``MLFLOW_DISABLE_TELEMETRY=true`` and
``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` (MLflow's GenAI job runner: not used here, and its
huey consumers outlive a SIGTERMed server) unless those are set already.

When the server answers ``GET /health`` *and* an API request carrying the advertised Host
header, the URI is printed and written to ``--uri-file`` (JSON; removed again at shutdown), so
a script can wait for that file. SIGTERM/SIGINT stop the server (exit 0).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from smallbig.fsutil import atomic_write_json

NETWORK_FS = {
    "nfs",
    "nfs4",
    "lustre",
    "gpfs",
    "beegfs",
    "cifs",
    "smb3",
    "smbfs",
    "ceph",
    "glusterfs",
    "fuse.glusterfs",
    "fuse.sshfs",
    "fuse.beegfs",
    "panfs",
    "afs",
    "pvfs2",
    "orangefs",
    "9p",
    "fuse.cephfs",
    "wekafs",
    "fuse.juicefs",
}
_WILDCARD_BINDS = ("0.0.0.0", "::", "")
# MLflow's own defaults (mlflow.server.security_utils), used if that module cannot be imported
_FALLBACK_DEFAULT_HOSTS = (
    [
        "localhost",
        "127.0.0.1",
        "[::1]",
        "0.0.0.0",
        "localhost:*",
        "127.0.0.1:*",
        "[[]::1]:*",
        "0.0.0.0:*",
        "192.168.*",
        "10.*",
    ]
    + [f"172.{i}.*" for i in range(16, 32)]
    + ["fc00:*", "fd00:*"]
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tracking",
        help="MLflow tracking server for cluster jobs",
        description="MLflow tracking for many concurrent jobs (docs/engine.md, MLflow).",
    )
    tsub = p.add_subparsers(dest="tracking_command", metavar="COMMAND")
    tsub.required = True
    s = tsub.add_parser(
        "serve",
        help="run an MLflow tracking server; jobs set MLFLOW_TRACKING_URI to its URI",
        description="Run `mlflow server` for cluster jobs: store on this host's local disk (or a "
        "database), artifacts uploaded over HTTP (--serve-artifacts), Host-header checks that "
        "admit this host's names. Prints the URI jobs must use (MLFLOW_TRACKING_URI, the slurm "
        "profile's MLFLOW_URI) and writes it to --uri-file once the server answers. Stop it with "
        "SIGTERM or Ctrl-C.",
    )
    s.add_argument(
        "--host",
        default="0.0.0.0",
        help="interface to bind (default 0.0.0.0: reachable from compute nodes; "
        "127.0.0.1 = this machine only)",
    )
    s.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    s.add_argument(
        "--store-dir",
        help="directory of the default SQLite store and artifacts "
        "(default $XDG_DATA_HOME/smallbig/mlflow-server); must be on LOCAL disk",
    )
    s.add_argument(
        "--backend-store-uri",
        help="sqlite:////local/disk/mlflow.db (local disk of this host) or "
        "postgresql://user:pw@db/mlflow (default: sqlite:///STORE_DIR/mlflow.db)",
    )
    s.add_argument(
        "--artifacts-destination",
        help="where uploaded artifacts are stored: a directory or s3://... (default STORE_DIR/artifacts)",
    )
    s.add_argument("--workers", type=int, help="server worker processes (default: 1 for SQLite, 4 otherwise)")
    s.add_argument(
        "--public-host",
        help="host name jobs use to reach this server (default: this host's name "
        "when bound to all interfaces, else --host)",
    )
    s.add_argument(
        "--allowed-hosts",
        default="",
        help="extra comma-separated Host headers to accept (wildcards as in "
        "`mlflow server --allowed-hosts`), e.g. an alias or a tunnel name",
    )
    s.add_argument("--uri-file", help='write {"uri": ...} (JSON) here once the server is ready')
    s.add_argument(
        "--startup-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the server to answer (default 300)",
    )
    s.add_argument("--mlflow", default=None, help="mlflow executable (default: the one next to this Python)")
    s.set_defaults(func=_serve)


# --------------------------------------------------------------------------- helpers
def default_store_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "smallbig" / "mlflow-server"


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :])


def filesystem_type(path: str | Path) -> str | None:
    """File system type of the mount holding `path` (its nearest existing ancestor), from
    /proc/mounts; None if unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    p = p.resolve()
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    best, fstype = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        inside = str(p) == mnt or str(p).startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, fstype = mnt, parts[2]
    return fstype


def on_network_fs(path: str | Path) -> bool:
    return (filesystem_type(path) or "") in NETWORK_FS


def host_names(public_host: str | None = None) -> list[str]:
    """Names and addresses clients may use for this host (public name first)."""
    names: list[str] = []

    def add(n):
        if n and n not in names:
            names.append(n)

    add(public_host)
    hostname = socket.gethostname()
    add(hostname)
    add(hostname.split(".")[0])
    try:
        add(socket.getfqdn())
    except OSError:
        pass
    for n in list(names):
        try:
            for addr in socket.gethostbyname_ex(n)[2]:
                add(addr)
        except OSError:
            pass
    return names


def _format_host(name: str, pattern: bool = False) -> str:
    if ":" in name and not name.startswith("["):  # IPv6 literal
        return f"[[]{name}]" if pattern else f"[{name}]"
    return name


def allowed_hosts(names: list[str], extra: str = "") -> list[str]:
    """MLflow's default allowed Host headers (localhost, private IPs) + `names` (any port) +
    `extra`."""
    try:
        from mlflow.server.security_utils import get_default_allowed_hosts

        hosts = list(get_default_allowed_hosts())
    except Exception:  # pragma: no cover - other MLflow versions
        hosts = list(_FALLBACK_DEFAULT_HOSTS)
    for n in names:
        hosts += [_format_host(n), f"{_format_host(n, pattern=True)}:*"]
    hosts += [h.strip() for h in extra.split(",") if h.strip()]
    return list(dict.fromkeys(hosts))


def server_command(
    mlflow: str,
    *,
    host: str,
    port: int,
    backend_store_uri: str,
    artifacts_destination: str,
    workers: int,
    allowed: list[str],
    cors_origins: list[str],
) -> list[str]:
    return [
        mlflow,
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--backend-store-uri",
        backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts_destination,
        "--workers",
        str(workers),
        "--allowed-hosts",
        ",".join(allowed),
        "--cors-allowed-origins",
        ",".join(cors_origins),
    ]


def _http_get(url: str, host_header: str | None = None, timeout: float = 5.0) -> int:
    req = urllib.request.Request(url, headers={"Host": host_header} if host_header else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


def _set_pdeathsig() -> None:  # runs in the child before exec: die with the parent (Linux)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> int | None:
    """SIGTERM the mlflow process (it forwards the signal to uvicorn), then clean the group."""
    pgid = proc.pid
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.time() + 5
    if proc.poll() is None or _group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        while _group_alive(pgid) and time.time() < deadline:
            time.sleep(0.1)
    if _group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        return proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return None


def _say(msg: str) -> None:
    print(f"smallbig tracking serve: {msg}", flush=True)


# --------------------------------------------------------------------------- serve
class _Stop:
    """SIGTERM/SIGINT handler: remembers the signal."""

    def __init__(self):
        self.signal: int | None = None

    def __call__(self, signum, _frame) -> None:
        self.signal = signum


def _serve(args) -> int:
    cfg = _server_config(args)
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _say(f"backend store {cfg['backend']}")
    _say(f"artifacts {cfg['artifacts']} (uploaded by the jobs over HTTP: --serve-artifacts)")
    _say(
        f"starting mlflow server on {args.host}:{args.port} ({cfg['workers']} worker"
        f"{'s' if cfg['workers'] != 1 else ''})"
    )
    proc = subprocess.Popen(cfg["cmd"], env=cfg["env"], start_new_session=True, preexec_fn=_set_pdeathsig)
    t0 = time.time()
    ready = _wait_ready(proc, cfg, stop, args.startup_timeout)
    if ready is None:  # refused or no answer: reported
        _stop(proc)
        return 1
    if ready and stop.signal is None:
        _announce(args, cfg, t0)
        while stop.signal is None and proc.poll() is None:
            time.sleep(0.2)
    return _shutdown(proc, cfg["uri_file"], stop, args.port)


def _server_config(args) -> dict:
    """Stores, names and the mlflow command line of `smallbig tracking serve` from its options."""
    store_dir = Path(args.store_dir).expanduser().absolute() if args.store_dir else default_store_dir()
    backend = args.backend_store_uri or f"sqlite:///{store_dir / 'mlflow.db'}"
    if "://" not in backend:  # a plain path: a SQLite file
        backend = f"sqlite:///{Path(backend).expanduser().absolute()}"
    artifacts = args.artifacts_destination or str(store_dir / "artifacts")
    if "://" not in artifacts:
        artifacts = str(Path(artifacts).expanduser().absolute())
        Path(artifacts).mkdir(parents=True, exist_ok=True)
    elif artifacts.startswith("file://"):
        Path(artifacts[len("file://") :]).mkdir(parents=True, exist_ok=True)
    db = sqlite_path(backend)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        if on_network_fs(db):
            print(
                f"smallbig tracking serve: WARNING: the SQLite store {db} is on a network file "
                f"system ({filesystem_type(db)}). Put it on this host's local disk "
                "(--backend-store-uri sqlite:////local/disk/mlflow.db) or use PostgreSQL.",
                file=sys.stderr,
                flush=True,
            )
    workers = args.workers or (1 if db is not None else 4)
    public = args.public_host or (socket.gethostname() if args.host in _WILDCARD_BINDS else args.host)
    names = host_names(public)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before mlflow is imported here
    allowed = allowed_hosts(names, args.allowed_hosts)
    cors = [f"http://{_format_host(n)}:{args.port}" for n in names]
    netloc = f"{_format_host(public)}:{args.port}"
    connect = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(args.host, _format_host(args.host))
    mlflow = args.mlflow or str(Path(sys.executable).with_name("mlflow"))
    if not Path(mlflow).exists():
        mlflow = "mlflow"
    cmd = server_command(
        mlflow,
        host=args.host,
        port=args.port,
        backend_store_uri=backend,
        artifacts_destination=artifacts,
        workers=workers,
        allowed=allowed,
        cors_origins=cors,
    )
    env = dict(os.environ)
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.pop("MLFLOW_TRACKING_URI", None)  # the server's store is --backend-store-uri
    uri_file = Path(args.uri_file).absolute() if args.uri_file else None
    if uri_file is not None and uri_file.exists():
        uri_file.unlink()  # a stale file from an earlier server must not look ready
    return {
        "backend": backend,
        "artifacts": artifacts,
        "workers": workers,
        "public": public,
        "netloc": netloc,
        "uri": f"http://{netloc}",
        "probe": f"http://{connect}:{args.port}",
        "cmd": cmd,
        "env": env,
        "uri_file": uri_file,
    }


def _wait_ready(proc, cfg: dict, stop: _Stop, startup_timeout: float) -> bool | None:
    """True: the server answers an API call under its public name; False: stopped (signal) or
    died first; None: it refuses the Host header or does not answer in time (reported)."""
    probe, netloc, t0 = cfg["probe"], cfg["netloc"], time.time()
    while stop.signal is None and proc.poll() is None:
        if _http_get(f"{probe}/health", timeout=2) == 200:
            code = _http_get(
                f"{probe}/api/2.0/mlflow/experiments/search?max_results=1", host_header=netloc, timeout=30
            )
            if code == 200:
                return True
            if code == 403:
                _say(
                    f"error: the server rejects the Host header {netloc!r}; pass "
                    "--allowed-hosts or --public-host"
                )
                return None
        if time.time() - t0 > startup_timeout:
            _say(f"error: no answer from {probe} within {startup_timeout:.0f} s")
            return None
        time.sleep(0.5)
    return False


def _announce(args, cfg: dict, t0: float) -> None:
    """The URI file (if asked) and what jobs must set."""
    uri, uri_file = cfg["uri"], cfg["uri_file"]
    if uri_file is not None:
        atomic_write_json(
            uri_file,
            {
                "uri": uri,
                "host": cfg["public"],
                "port": args.port,
                "bind": args.host,
                "pid": os.getpid(),
                "backend_store_uri": cfg["backend"],
                "artifacts_destination": cfg["artifacts"],
                "workers": cfg["workers"],
                "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            },
        )
    print(
        f"\nMLflow tracking server ready ({time.time() - t0:.0f} s). Jobs must use:\n"
        f"  export MLFLOW_TRACKING_URI={uri}\n"
        f'  slurm profile (workflow/profiles/slurm/config.yaml): - MLFLOW_URI = "{uri}"\n'
        f"UI: {uri} (or ssh -L {args.port}:localhost:{args.port} <this host>, then "
        f"http://localhost:{args.port})\n"
        + (f"URI file: {uri_file}\n" if uri_file else "")
        + "Stop with Ctrl-C or SIGTERM.\n",
        flush=True,
    )


def _shutdown(proc, uri_file: Path | None, stop: _Stop, port: int) -> int:
    """Stop the server (its whole process group), remove our URI file; the exit code."""
    died = proc.poll() is not None and stop.signal is None
    rc = _stop(proc)  # also cleans up what is left of the server's process group
    if uri_file is not None and uri_file.exists():
        try:
            if json.loads(uri_file.read_text()).get("pid") == os.getpid():
                uri_file.unlink()
        except (OSError, ValueError):
            pass
    if died:
        _say(
            f"error: mlflow server exited ({rc}) before it was stopped (see its messages "
            f"above; port {port} in use? pick another with --port)"
        )
        return 1
    if rc not in (0, -signal.SIGTERM):
        _say(f"stopped ({signal.Signals(stop.signal).name}), but mlflow server exited {rc}")
        return 1
    _say(f"stopped ({signal.Signals(stop.signal).name})")
    return 0
