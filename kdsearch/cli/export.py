"""``kdsearch export``: a study trial's (or an MLflow run's) student as ONNX, checked, timed, with a model card."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated

import typer

from kdsearch.cli.options import DEFAULT_LATENCY
from kdsearch.cli.study import CacheDirOverride, DataDirOverride, Storage, TrackingUri, Workdir
from kdsearch.config import ExportFormat
from kdsearch.errors import ConfigError


def export_command(
    out: Annotated[Path, typer.Option("--out", help="Directory to create: model.onnx, MODEL_CARD.md, export.json.")],
    study: Annotated[
        str | None, typer.Option("--study", help="Name of a study: export its best trial (by validation accuracy).")
    ] = None,
    trial: Annotated[
        int | None,
        typer.Option("--trial", help="Export this trial of --study (a Pareto study needs it or --within)."),
    ] = None,
    within: Annotated[
        float | None,
        typer.Option(
            "--within",
            help="A Pareto --study: export the fastest student of its front whose validation accuracy is within "
            "this many points of the front's best.",
        ),
    ] = None,
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="Instead of --study: the MLflow run that trained the student.")
    ] = None,
    export_format: Annotated[ExportFormat, typer.Option("--format", help="Model format.")] = ExportFormat.ONNX,
    int8: Annotated[
        bool, typer.Option("--int8", help="Also model.int8.onnx: static int8, calibrated on training images.")
    ] = False,
    register: Annotated[
        str | None, typer.Option("--register", help="Register the logged model under this name in MLflow's registry.")
    ] = None,
    storage: Storage = None,
    tracking_uri: TrackingUri = None,
    workdir: Workdir = Path("."),
    data_dir: DataDirOverride = None,
    cache_dir: CacheDirOverride = None,
    warmup: Annotated[
        int, typer.Option("--warmup", help="Untimed ONNX Runtime runs before each timing.")
    ] = DEFAULT_LATENCY.warmup,
    repeats: Annotated[
        int, typer.Option("--repeats", help="Timed runs per batch size; the median is reported.")
    ] = DEFAULT_LATENCY.repeats,
) -> None:
    """Export a trained student to ONNX (and int8): refuse it below 99.9 % top-1 agreement with PyTorch
    on the test set, time it (ONNX Runtime, 1 thread, batch 1 and 128), write a model card, log it to MLflow
    as a logged model; print a JSON summary."""
    from kdsearch.deploy.export import ExportConfig, export, short_summary
    from kdsearch.infra.storage import default_storage
    from kdsearch.track.tracking import default_tracking_uri

    if not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} does not exist")
    config = ExportConfig(
        out=out,
        tracking_uri=tracking_uri or default_tracking_uri(workdir),
        storage=storage or default_storage(workdir),
        study=study,
        trial=trial,
        within=within,
        run_id=run_id,
        format=export_format,
        int8=int8,
        register=register,
        data_dir=data_dir,
        cache_dir=cache_dir,
        warmup=warmup,
        repeats=repeats,
        command=_command(study, trial, within, run_id, export_format, int8, out, register),
    )
    typer.echo(json.dumps(short_summary(export(config)), indent=2, default=str))


def _command(
    study: str | None,
    trial: int | None,
    within: float | None,
    run_id: str | None,
    export_format: str,
    int8: bool,
    out: Path,
    register: str | None,
) -> str:
    """The export's command line for its model card; storage and tracking URLs (machine-local, may hold
    passwords) are left out."""
    args = ["kdsearch", "export"]
    args += ["--study", study] if study is not None else []
    args += ["--trial", str(trial)] if trial is not None else []
    args += ["--within", f"{within:g}"] if within is not None else []
    args += ["--run-id", run_id] if run_id is not None else []
    args += ["--format", str(export_format), *(["--int8"] if int8 else []), "--out", str(out)]
    args += ["--register", register] if register is not None else []
    return shlex.join(args)


def register(app: typer.Typer) -> None:
    """Add ``export`` to the main CLI."""
    app.command("export")(export_command)
