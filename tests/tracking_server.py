"""A real MLflow tracking server for tests: `smallbig tracking serve` on 127.0.0.1.

    from tracking_server import mlflow_server

    with mlflow_server(tmp_path) as uri:          # "http://127.0.0.1:<port>"
        ... MLFLOW_TRACKING_URI=uri for the jobs ...

`TrackingServer` gives more (the store and artifact paths, the log, the exit code of a SIGTERM
stop). Everything lives under the directory given; the server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrackingServer:
    """`smallbig tracking serve --host 127.0.0.1` with its store under `root`."""

    def __init__(
        self, root: str | Path, port: int | None = None, workers: int = 1, startup_timeout: float = 300.0
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = self.root / "mlflow.db"
        self.artifacts = self.root / "artifacts"
        self.uri_file = self.root / "server-uri.json"
        self.log = self.root / "server.log"
        self.port = port
        self.workers = workers
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    @property
    def uri(self) -> str:
        return self.info["uri"]

    def _command(self, port: int) -> list[str]:
        return [
            str(VENV_BIN / "smallbig"),
            "tracking",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{self.db}",
            "--artifacts-destination",
            str(self.artifacts),
            "--workers",
            str(self.workers),
            "--uri-file",
            str(self.uri_file),
            "--startup-timeout",
            str(int(self.startup_timeout)),
        ]

    def start(self) -> str:
        """Start the server and wait for its URI file; a port taken meanwhile is retried."""
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SMALLBIG_NO_MLFLOW")}
        for _attempt in range(3):
            port = self.port or free_port()
            log = open(self.log, "a")  # noqa: SIM115 - handed to Popen, closed below
            self.proc = subprocess.Popen(
                self._command(port), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root
            )
            log.close()
            deadline = time.time() + self.startup_timeout + 30
            while time.time() < deadline:
                if self.uri_file.exists():
                    self.info = json.loads(self.uri_file.read_text())
                    return self.uri
                if self.proc.poll() is not None:
                    break
                time.sleep(0.25)
            else:
                self.stop()
                raise TimeoutError(f"tracking server did not start:\n{self.log_text()[-4000:]}")
            if self.port:  # a fixed port: nothing to retry
                break
        raise RuntimeError(f"tracking server exited ({self.proc.returncode}):\n{self.log_text()[-4000:]}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM; the exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def __enter__(self) -> TrackingServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def mlflow_server(tmp_path: str | Path, **kwargs):
    """Yield the URI of a fresh tracking server whose store lives in `tmp_path/mlflow-server`."""
    with TrackingServer(Path(tmp_path) / "mlflow-server", **kwargs) as server:
        yield server.uri
