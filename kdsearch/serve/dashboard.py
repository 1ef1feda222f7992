"""optuna-dashboard for the project's study storage, on 127.0.0.1 and a free port.

    kdsearch dashboard                                       # ./studies.db, as the study commands write it
    kdsearch dashboard --storage postgresql://… --study smoke-grid

Its server runs in a process of its own (``python -m kdsearch.serve.dashboard``): optuna-dashboard's WSGI app
in a threaded wsgiref server, as optuna-dashboard's own CLI runs it without gunicorn, bound to the
loopback interface only. The storage URL reaches that process through its environment, not its
command line, where ``ps`` would show a PostgreSQL password.
"""

from __future__ import annotations

import errno
import json
import os
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

from kdsearch.errors import KdsearchError
from kdsearch.serve.mlflow_ui import HOST, free_port

STORAGE_VARIABLE = "KDSEARCH_DASHBOARD_STORAGE"
# What the server process prints as its last line when its port is taken; start_dashboard turns it into an error.
PORT_IN_USE = "is in use"


class DashboardError(KdsearchError):
    """optuna-dashboard is missing or its server cannot start (port in use, unusable storage)."""


@dataclass
class DashboardServer:
    url: str  # http://127.0.0.1:PORT
    storage: str
    process: subprocess.Popen
    log_path: Path  # the server's output

    def study_url(self, study_id: int) -> str:
        return f"{self.url}/dashboard/studies/{study_id}"

    def wait(self) -> None:
        """Block until the server exits (Ctrl-C stops the caller, and ``stop`` the server); DashboardError if it failed."""
        if self.process.wait() != 0:
            raise DashboardError(f"optuna-dashboard stopped: {_last_line(self.log_path)} (log: {self.log_path})")

    def stop(self) -> None:
        """End the server's process group: SIGTERM, then SIGKILL after 15 s."""
        for signal_number, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, None)):
            if self.process.poll() is not None:
                return
            try:
                os.killpg(self.process.pid, signal_number)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> DashboardServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_dashboard(storage: str, port: int | None = None, timeout: float = 60.0, attempts: int = 3) -> DashboardServer:
    """Start optuna-dashboard on 127.0.0.1 for the Optuna storage URL ``storage`` and wait until it answers.

    ``port`` None picks a free one (and another when it was taken meanwhile). Raises StudyError when the
    storage cannot be reached or holds no Optuna tables, DashboardError when optuna-dashboard is not
    installed, ``port`` is in use, or the server does not answer within ``timeout`` seconds.
    """
    import importlib.util

    if importlib.util.find_spec("optuna_dashboard") is None:
        raise DashboardError("optuna-dashboard is not installed (pip install optuna-dashboard)")
    check_storage(storage)
    if port is not None and not _port_free(port):
        raise DashboardError(f"port {port} on {HOST} {PORT_IN_USE}: pick another --port, or 0 for a free one")
    log_path = Path(tempfile.mkdtemp(prefix="kdsearch-dashboard-")) / "optuna-dashboard.log"
    reason = ""
    for _ in range(attempts if port is None else 1):
        chosen = port or free_port()
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "kdsearch.serve.dashboard", str(chosen)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, STORAGE_VARIABLE: storage},
                start_new_session=True,  # its own process group: `stop` ends it however it was started
            )
        server = DashboardServer(f"http://{HOST}:{chosen}", storage, process, log_path)
        try:
            if _comes_up(server, timeout):
                return server
        except BaseException:  # Ctrl-C while it starts
            server.stop()
            raise
        server.stop()
        reason = _last_line(log_path) or f"no answer from {server.url} within {timeout:.0f}s"
        if port is not None and PORT_IN_USE in reason:
            raise DashboardError(reason)
    raise DashboardError(f"optuna-dashboard did not start: {reason} (log: {log_path})")


def check_storage(storage: str) -> None:
    """Raise StudyError unless ``storage`` is a reachable database that Optuna has written to. Writes nothing.

    The dashboard must not create Optuna's tables in, say, an MLflow database named by mistake.
    """
    import sqlalchemy

    from kdsearch.errors import StudyError
    from kdsearch.infra.storage import check_database, database_url
    from kdsearch.infra.urls import hide_password

    check_database(storage, must_exist=True)
    engine = sqlalchemy.create_engine(database_url(storage), poolclass=sqlalchemy.pool.NullPool)
    try:
        tables = set(sqlalchemy.inspect(engine).get_table_names())
    except sqlalchemy.exc.DatabaseError as failure:  # e.g. a file that is not SQLite
        reason = str(failure.orig).strip().splitlines()[0] if failure.orig else type(failure).__name__
        raise StudyError(f"storage {hide_password(storage)}: {reason}") from None
    finally:
        engine.dispose()
    if not {"studies", "trials"} <= tables:
        raise StudyError(f"storage {hide_password(storage)} holds no Optuna studies (no studies/trials tables)")


def study_id(storage: str, name: str) -> int:
    """The dashboard's id of the study called ``name``; StudyError naming the studies there otherwise."""
    import optuna

    from kdsearch.errors import StudyError
    from kdsearch.infra.storage import database_url
    from kdsearch.infra.urls import hide_password

    check_storage(storage)
    found = optuna.storages.RDBStorage(database_url(storage), skip_table_creation=True)
    try:
        return found.get_study_id_from_name(name)
    except KeyError:
        names = optuna.get_all_study_names(found)
        raise StudyError(f"no study {name!r} in {hide_password(storage)}; studies there: {names}") from None


def api(url: str, path: str, timeout: float = 10.0):
    """GET ``url + path`` from the dashboard's JSON API (``/api/studies``, ``/api/studies/ID``) and decode it."""
    with urllib.request.urlopen(url + path, timeout=timeout) as response:
        return json.load(response)


def _comes_up(server: DashboardServer, timeout: float) -> bool:
    """Whether the server answers within ``timeout`` seconds (False at once if its process exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.process.poll() is None:
        if _answers(server.url):
            return True
        time.sleep(0.3)
    return False


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/api/meta", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no obstacle
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
        return True


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def serve(storage: str, port: int) -> None:
    """Serve optuna-dashboard for ``storage`` on 127.0.0.1:``port`` until killed (the server process's work)."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    import optuna
    from optuna_dashboard import wsgi

    from kdsearch.infra.storage import database_url

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format, *args) -> None:  # the page polls every few seconds: no access log
            pass

    try:
        httpd = make_server(HOST, port, None, server_class=Server, handler_class=QuietHandler)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            sys.exit(f"port {port} on {HOST} {PORT_IN_USE}")
        raise
    url = database_url(storage)
    # SQLite: wait for the study workers' writes rather than fail; servers: drop connections that died.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    httpd.set_app(wsgi(optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=True)))
    print(f"optuna-dashboard on http://{HOST}:{port}", flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    serve(os.environ[STORAGE_VARIABLE], int(sys.argv[1]))
