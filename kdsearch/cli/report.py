"""``kdsearch report`` (tables, figures and index.html of a study or ablation), ``kdsearch ui`` (MLflow UI, and
optuna-dashboard beside it) and ``kdsearch summary`` (what a workdir's reports and exports hold)."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from typing import Annotated

import typer

from kdsearch.cli.study import Storage, TrackingUri, Workdir
from kdsearch.errors import ConfigError


def _workdir(workdir: Path) -> Path:
    if not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} does not exist")
    return workdir


def report_command(
    out: Annotated[Path, typer.Option("--out", help="Directory of the report (index.html, tables/, figures/).")],
    study: Annotated[str | None, typer.Option("--study", help="Name of a grid, TPE or Pareto study.")] = None,
    ablation: Annotated[str | None, typer.Option("--ablation", help="Name of an ablation study.")] = None,
    storage: Storage = None,
    tracking_uri: TrackingUri = None,
    workdir: Workdir = Path("."),
    cache_dir: Annotated[
        str | None,
        typer.Option("--cache-dir", help="This machine's cache (IG maps, a trained teacher), for the IG figure."),
    ] = None,
    data_dir: Annotated[
        str | None, typer.Option("--data-dir", help="This machine's data folder, for the IG figure.")
    ] = None,
    teacher_checkpoint: Annotated[
        str | None, typer.Option("--teacher-checkpoint", help="This machine's teacher file, for the IG figure.")
    ] = None,
    ig: Annotated[
        bool, typer.Option("--ig/--no-ig", help="Draw the attribution figures (need the teacher and the data).")
    ] = True,
    log: Annotated[
        bool, typer.Option("--log/--no-log", help="Log the report to the study's MLflow parent run.")
    ] = True,
    plotly_js: Annotated[
        str,
        typer.Option(
            "--plotly-js",
            help="local: plotly.min.js (3.5 MB) beside the figures, works offline | cdn: load it from plotly's CDN "
            "(small reports, e.g. to keep in git).",
        ),
    ] = "local",
) -> None:
    """Tables (CSV, Markdown, HTML), figures (HTML, PNG, SVG) and an index.html of a study or an ablation,
    from its storage alone; a study still running is reported as far as it got, marked partial."""
    from kdsearch.infra.storage import check_writable, default_storage
    from kdsearch.report.render import ReportConfig, describe, write_report
    from kdsearch.track.tracking import default_tracking_uri

    if (study is None) == (ablation is None):
        raise ConfigError("give exactly one of --study NAME or --ablation NAME")
    _workdir(workdir)
    check_writable(out, "--out")
    overrides = {
        "train.cache_dir": cache_dir,
        "train.data.data_dir": data_dir,
        "teacher": {"checkpoint": teacher_checkpoint} if teacher_checkpoint is not None else None,
    }
    config = ReportConfig(
        study=study or ablation,
        out=out,
        storage=storage or default_storage(workdir),
        tracking_uri=tracking_uri or default_tracking_uri(workdir),
        kind="study" if study is not None else "ablation",
        overrides={key: value for key, value in overrides.items() if value is not None},
        ig_figure=ig,
        log_artifacts=log,
        plotly_js=plotly_js,
    )
    typer.echo(describe(write_report(config)))


def ui_command(
    tracking_uri: TrackingUri = None,
    workdir: Workdir = Path("."),
    port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1; 0 picks a free one.")] = 0,
    experiment: Annotated[str | None, typer.Option("--experiment", help="Also print this experiment's URL.")] = None,
    dashboard: Annotated[
        bool,
        typer.Option("--dashboard", help="Also start optuna-dashboard for the study storage (on a free port)."),
    ] = False,
    storage: Storage = None,
) -> None:
    """Start the MLflow UI for the project's tracking store on 127.0.0.1 and print its URL (Ctrl-C stops it);
    with --dashboard, optuna-dashboard for the studies beside it."""
    from kdsearch.infra.storage import default_storage
    from kdsearch.infra.urls import hide_password
    from kdsearch.serve.dashboard import check_storage, start_dashboard
    from kdsearch.serve.mlflow_ui import experiment_id, start_ui
    from kdsearch.track.tracking import default_tracking_uri

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535] but got {port}")
    uri = tracking_uri or default_tracking_uri(_workdir(workdir))
    target = experiment_id(uri, experiment) if experiment is not None else None
    study_storage = storage or default_storage(workdir)
    if dashboard:
        check_storage(study_storage)  # before either server starts
    # A `kill` ends the UI like Ctrl-C does: through the `with`, which stops the servers' processes.
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.ExitStack() as servers:
        server = servers.enter_context(start_ui(uri, port or None))
        typer.echo(f"MLflow UI for {uri}: {server.url}")
        if target is not None:
            typer.echo(f"experiment {experiment}: {server.experiment_url(target)}")
        if dashboard:
            board = servers.enter_context(start_dashboard(study_storage))
            typer.echo(f"optuna-dashboard for {hide_password(study_storage)}: {board.url}")
        if server.process is None and not dashboard:
            return
        typer.echo("Ctrl-C stops it")
        (server if server.process is not None else board).wait()


def summary_command(
    workdir: Annotated[Path, typer.Option("--workdir", help="The directory whose reports and exports to sum up.")],
) -> None:
    """What a workdir's studies produced: the exported student against the teacher, the ablation's paired
    differences, where the reports and the model are, and the command that browses the runs."""
    from kdsearch.report.summary import workdir_summary

    typer.echo(workdir_summary(workdir))


def _interrupt(signal_number, frame) -> None:
    raise KeyboardInterrupt


def register(app: typer.Typer) -> None:
    """Add ``report`` and ``ui`` to the main CLI."""
    app.command("report")(report_command)
    app.command("ui")(ui_command)
    app.command("summary")(summary_command)
