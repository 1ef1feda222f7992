"""``kdsearch dashboard``: optuna-dashboard for the study storage, as ``kdsearch ui`` is MLflow's UI."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer

from kdsearch.cli.study import Storage, Workdir
from kdsearch.errors import ConfigError


def dashboard_command(
    storage: Storage = None,
    workdir: Workdir = Path("."),
    port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1; 0 picks a free one.")] = 0,
    study: Annotated[str | None, typer.Option("--study", help="Also print this study's URL.")] = None,
) -> None:
    """Start optuna-dashboard for the study storage on 127.0.0.1 and print its URL (Ctrl-C stops it)."""
    from kdsearch.infra.storage import default_storage
    from kdsearch.infra.urls import hide_password
    from kdsearch.serve.dashboard import start_dashboard, study_id

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535] but got {port}")
    if storage is None and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} does not exist")
    url = storage or default_storage(workdir)
    target = study_id(url, study) if study is not None else None
    # A `kill` ends the dashboard like Ctrl-C does: through the `with`, which stops the server's process.
    signal.signal(signal.SIGTERM, _interrupt)
    with start_dashboard(url, port or None) as server:
        typer.echo(f"optuna-dashboard for {hide_password(url)}: {server.url}")
        if target is not None:
            typer.echo(f"study {study}: {server.study_url(target)}")
        typer.echo("Ctrl-C stops it")
        server.wait()


def _interrupt(signal_number, frame) -> None:
    raise KeyboardInterrupt


def register(app: typer.Typer) -> None:
    """Add ``dashboard`` to the main CLI."""
    app.command("dashboard")(dashboard_command)
