"""A real ``mlflow server`` process for tests: 127.0.0.1, a free port, SQLite backend, proxied artifacts.

``start()`` returns at once (the server takes tens of seconds to import on a busy 2-core machine),
``wait()`` blocks until /health answers, ``kill()`` SIGKILLs the whole process group (a crash, not a
shutdown), ``restart()`` starts it again on the same port, database and artifact folder.
``mlflow_server`` is one server for the whole session, started on first use (``mlflow_server_boot``
starts it without waiting), killed at session end.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> "MlflowServer":
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job-runner process: faster start, one process less
        self.starts += 1
        log = open(self.root / f"server-{self.starts}.log", "w")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait(self, timeout: float = 300) -> "MlflowServer":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.healthy():
                return self
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.5)
        tail = (self.root / f"server-{self.starts}.log").read_text()[-3000:]
        self.kill()
        raise RuntimeError(f"mlflow server on port {self.port} did not become healthy (exit {self.proc.poll()}):\n{tail}")

    def kill(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None

    def restart(self) -> "MlflowServer":
        self.kill()
        return self.start()


_SHARED: MlflowServer | None = None


def shared_server(tmp_path_factory) -> MlflowServer:
    """Start (once) the session's server; does not wait for it."""
    global _SHARED
    if _SHARED is None:
        _SHARED = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
        atexit.register(_SHARED.kill)  # backstop: never leave a server behind, even if teardown is skipped
    return _SHARED


@pytest.fixture(scope="session")
def mlflow_server_boot(tmp_path_factory):
    """The session's server, starting (not yet healthy). Request it early so that it boots while other tests run."""
    server = shared_server(tmp_path_factory)
    yield server
    server.kill()


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_boot):
    """The session's server, healthy."""
    return mlflow_server_boot.wait()
