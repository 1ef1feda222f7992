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
import sys
import urllib.request
from dataclasses import dataclass

from kdsearch.errors import KdsearchError
from kdsearch.serve.local_server import HOST, LocalServer, last_line, start_server

STORAGE_VARIABLE = "KDSEARCH_DASHBOARD_STORAGE"


class DashboardError(KdsearchError):
    """optuna-dashboard is missing or its server cannot start (port in use, unusable storage)."""


@dataclass
class DashboardServer(LocalServer):
    storage: str = ""

    def study_url(self, study_id: int) -> str:
        return f"{self.url}/dashboard/studies/{study_id}"

    def wait(self) -> int | None:
        """Block until the server exits (Ctrl-C stops the caller, and ``stop`` the server); DashboardError if it failed."""
        code = super().wait()
        if code:
            raise DashboardError(f"optuna-dashboard stopped: {last_line(self.log_path)} (log: {self.log_path})")
        return code


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
    return start_server(
        "optuna-dashboard",
        lambda chosen: [sys.executable, "-m", "kdsearch.serve.dashboard", str(chosen)],
        "/api/meta",
        lambda url, process, log_path: DashboardServer(url, process, log_path, storage=storage),
        DashboardError,
        port,
        {STORAGE_VARIABLE: storage},
        timeout,
        attempts,
    )


def check_storage(storage: str) -> None:
    """Raise StudyError unless ``storage`` is a reachable database that Optuna has written to. Writes nothing.

    The dashboard must not create Optuna's tables in, say, an MLflow database named by mistake.
    """
    import sqlalchemy

    from kdsearch.errors import StudyError
    from kdsearch.infra.storage import check_database, database_url, proxy_address
    from kdsearch.infra.urls import hide_password

    if proxy_address(storage) is not None:
        raise StudyError(f"storage {storage}: the dashboard reads the database itself; give the one the proxy serves")
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
            sys.exit(f"--port {port} is in use on {HOST}")
        raise
    url = database_url(storage)
    # SQLite: wait for the study workers' writes rather than fail; servers: drop connections that died.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    httpd.set_app(wsgi(optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=True)))
    print(f"optuna-dashboard on http://{HOST}:{port}", flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    serve(os.environ[STORAGE_VARIABLE], int(sys.argv[1]))
