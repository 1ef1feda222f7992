"""``kdsearch storage-proxy``: Optuna's gRPC storage proxy in front of the study database, for more workers
than the database takes connections from; workers then give ``--storage grpc://HOST:PORT``."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer

from kdsearch.cli.study import Storage, Workdir


def storage_proxy_command(
    storage: Storage = None,
    workdir: Workdir = Path("."),
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; 0.0.0.0 for workers on other machines.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port; 0 picks a free one.")] = 13000,
    threads: Annotated[
        int, typer.Option("--threads", help="Calls served at once (one database connection each).")
    ] = 10,
) -> None:
    """Serve the study storage (a database) through Optuna's gRPC storage proxy until Ctrl-C or SIGTERM."""
    from kdsearch.errors import ConfigError
    from kdsearch.infra.storage import default_storage
    from kdsearch.infra.urls import hide_password
    from kdsearch.search.optuna_storage import serve_storage

    if storage is None and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} does not exist")
    url = storage or default_storage(workdir)
    # A `kill` (a cluster stopping the pod) ends it as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)

    def ready(address: str) -> None:
        # Listening on every address of the machine: workers give one of its names (or its Service's).
        given = address.replace("grpc://0.0.0.0:", "grpc://HOST:")
        typer.echo(f"storage proxy for {hide_password(url)}: workers use --storage {given}; Ctrl-C stops it")

    serve_storage(url, host, port, threads, on_ready=ready)


def _interrupt(signal_number, frame) -> None:
    raise KeyboardInterrupt


def register(app: typer.Typer) -> None:
    """Add ``storage-proxy`` to the main CLI."""
    app.command("storage-proxy")(storage_proxy_command)
