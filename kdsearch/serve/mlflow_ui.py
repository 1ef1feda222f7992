"""The MLflow UI for the project's tracking store, on 127.0.0.1 and a free port.

    kdsearch ui                                   # ./mlruns/mlflow.db, as the study commands write it
    kdsearch ui --tracking-uri sqlite:///elsewhere/mlflow.db --experiment smoke

A database store (SQLite, PostgreSQL) gets its own ``mlflow ui`` process, one worker (a laptop or a
2-core machine), bound to the loopback interface only. A store that is already a server (``http://…``)
is that server's UI: nothing is started.

MLflow 3 opens an experiment on its GenAI overview; kdsearch's links ask for the model-training view
(``workflowType=machine_learning``), where the runs table is.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kdsearch.errors import ConfigError
from kdsearch.track.tracking import TrackingError
from kdsearch.infra.urls import sqlite_file

HOST = "127.0.0.1"
# MLflow 3 also starts a job runner (for GenAI scorers) beside the server by default: browsing runs
# needs none, and on a small machine it costs a process and seconds of start-up.
SERVER_SETTINGS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@dataclass
class UIServer:
    url: str  # http://127.0.0.1:PORT
    tracking_uri: str
    process: subprocess.Popen | None  # None when the store is a server that was already running
    log_path: Path | None = None  # the server's output, in a temporary folder of its own, removed on exit

    def experiment_url(self, experiment_id: str) -> str:
        return f"{self.url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"

    def wait(self) -> None:
        """Block until the server exits (Ctrl-C stops the caller, and ``stop`` the server)."""
        if self.process is not None:
            self.process.wait()

    def stop(self) -> None:
        """End the server's process group (the mlflow CLI and the uvicorn worker it starts)."""
        if self.process is None or self.process.poll() is not None:
            return
        for signal_number, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, None)):
            try:
                os.killpg(self.process.pid, signal_number)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> UIServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        if self.log_path is not None:
            shutil.rmtree(self.log_path.parent, ignore_errors=True)


def free_port(host: str = HOST) -> int:
    """A port nobody listens on now (the OS picks it); another process could still take it first."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def check_port_free(port: int, host: str = HOST) -> None:
    """Raise ConfigError when another process listens on ``port``: the server would exit with a
    traceback in its log, seconds later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the server binds: a port left in TIME_WAIT by an earlier server is free for it.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ConfigError(f"--port {port} is in use on {host}; pick another, or 0 for a free one") from None
            raise ConfigError(f"--port {port} cannot be used on {host}: {error.strerror}") from None


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _command(backend_uri: str, port: int) -> list[str]:
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", backend_uri]
    command += ["--host", HOST, "--port", str(port), "--workers", "1"]
    store = sqlite_file(backend_uri)
    if store is not None:
        # Where kdsearch's MlflowTracker keeps a local store's artefacts: new experiments land there too.
        command += ["--default-artifact-root", str(store.parent / "artifacts")]
    return command


def start_ui(tracking_uri: str, port: int | None = None, timeout: float = 90.0, attempts: int = 3) -> UIServer:
    """Start the MLflow UI on 127.0.0.1 for ``tracking_uri`` and wait until it answers.

    ``port`` None picks a free one (and another when it was taken meanwhile). Raises TrackingError
    when the store cannot be reached, or the server does not come up within ``timeout`` seconds.
    """
    from kdsearch.track.tracking import MlflowTracker

    tracker = MlflowTracker(tracking_uri)
    tracker.check()
    if tracker.uri.startswith(("http://", "https://")):
        return UIServer(tracker.uri.rstrip("/"), tracker.uri, None)
    store = sqlite_file(tracker.uri)
    if store is not None and not store.is_file():
        raise TrackingError(f"tracking store {tracking_uri}: no such file (nothing was logged there yet)")
    if port is not None:
        check_port_free(port)
    log_path = Path(tempfile.mkdtemp(prefix="kdsearch-ui-")) / "mlflow-ui.log"
    reason = ""
    for _ in range(attempts if port is None else 1):
        chosen = port or free_port()
        url = f"http://{HOST}:{chosen}"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                _command(tracker.uri, chosen),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **SERVER_SETTINGS},
                start_new_session=True,  # its own process group: `stop` ends the server and its workers together
            )
        server = UIServer(url, tracker.uri, process, log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            if _healthy(url):
                return server
            time.sleep(0.5)
        server.stop()
        reason = _last_line(log_path) or f"no answer from {url} within {timeout:.0f}s"
    raise TrackingError(f"the MLflow UI did not start: {reason} (log: {log_path})")


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def experiment_id(tracking_uri: str, name: str) -> str:
    """The id of the experiment called ``name``; TrackingError naming the experiments there otherwise."""
    from kdsearch.track.tracking import mlflow_client

    client = mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is None:
        names = [experiment.name for experiment in client.search_experiments()]
        raise TrackingError(f"no experiment {name!r} in {tracking_uri}; experiments there: {names}")
    return found.experiment_id
