"""The report of a study or ablation, from its storage alone: tables, figures, one index.html.

    kdsearch report --study smoke-grid-1a2b3c4d --out reports/smoke-grid
    kdsearch report --ablation cpu-quick-ablation-… --out reports/ablation \\
        --storage postgresql://kd@db-host/optuna --tracking-uri http://db-host:5000

Everything comes from the Optuna storage (trials, their parameters, values and user attributes, the
stored spec) and the MLflow store (the runs' costs and latencies, the dataset label, the device), so a
report can be made on any machine that reaches both, while workers are still running: titles and the
index then say "partial" and how far the study got. Only the attribution figures (IG, and an ablation's
methods) need more — the teacher and the data — and they are skipped, saying why, where those are missing. The files are also logged as
artefacts (``report/…``) of the study's MLflow parent run.
"""

from __future__ import annotations

import datetime
import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from optuna.trial import TrialState

from kdsearch.config import AttributionMethod
from kdsearch.data.datasets import load_splits
from kdsearch.distill.attribution import Attribution, maps_of
from kdsearch.distill.teacher import load_teacher
from kdsearch.errors import ConfigError, KdsearchError, StudyError
from kdsearch.infra.storage import database_url
from kdsearch.infra.urls import hide_password
from kdsearch.report import figures, tables
from kdsearch.report.figures import Figure, Line
from kdsearch.report.paper import literature, reported_deployment
from kdsearch.report.parts import REPORT_PARTS, ReportPart
from kdsearch.report.source import Source, child_runs, parent_run, trial_rows
from kdsearch.report.tables import Deployment, Table
from kdsearch.search.kinds import STUDY_KINDS
from kdsearch.search.study import ATTR, DEFERRED, find_study, outstanding_deferred, stored_train_epochs
from kdsearch.search.studyfile import apply_overrides, build_spec
from kdsearch.track.tracking import mlflow_client

log = logging.getLogger(__name__)

# What --study and --ablation accept: "study" and "ablation", from each kind's report part.
KINDS = {part.flag.removeprefix("--") for part in REPORT_PARTS.values()}


@dataclass(frozen=True)
class ReportConfig:
    study: str  # the study's name in the storage
    out: Path  # the report's directory (created; files of the same names are replaced)
    storage: str  # Optuna storage URL
    tracking_uri: str  # MLflow tracking URI
    kind: str | None = None  # "study" (grid, TPE, Pareto) | "ablation": the other kind is refused; None: any
    # The stored spec holds the creating machine's paths; these adapt them here (train.cache_dir,
    # train.data.data_dir, teacher.checkpoint), as for `study worker`. Only the attribution figures use them.
    overrides: dict[str, Any] = field(default_factory=dict)
    ig_figure: bool = True  # the attribution figures: IG's, and the maps by method of an ablation with several
    log_artifacts: bool = True  # also log the files to the study's MLflow parent run
    plotly_js: str = "local"  # local: plotly.min.js beside the figures (offline) | cdn: loaded from plotly's CDN

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise ConfigError(f"report kind must be one of {sorted(KINDS)} but got {self.kind!r}")
        if self.plotly_js not in figures.PLOTLY_JS:
            raise ConfigError(f"--plotly-js must be one of {sorted(figures.PLOTLY_JS)} but got {self.plotly_js!r}")


@dataclass
class Report:
    directory: Path
    files: list[Path]
    partial: bool
    progress: str  # "4 of 4 grid points complete", or "partial: …"
    notes: list[str]  # what was skipped, and why
    parent_run: str | None
    logged: bool  # the files are artefacts report/… of the parent run


# --- what the stores hold ---------------------------------------------------------------------


def open_source(config: ReportConfig) -> Source:
    """Find the study and its MLflow runs; raises a one-line KdsearchError and writes nothing otherwise."""

    study = find_study(config.storage, config.study)
    stored = study.user_attrs.get(ATTR)
    if stored is None:
        raise StudyError(f"study {config.study!r} was not created by kdsearch (no {ATTR!r} attribute)")
    part = REPORT_PARTS[stored["kind"]]
    if config.kind is not None and part.flag != f"--{config.kind}":
        raise StudyError(f"study {config.study!r} is {part.noun}; report it with {part.flag}")
    client = mlflow_client(config.tracking_uri)
    parent = parent_run(client, study.study_name)
    runs = {run.info.run_id: run for run in child_runs(client, parent)} if parent is not None else {}
    return Source(study, stored["kind"], stored["total"], stored["space"], stored["spec"], client, parent, runs)


def progress(source: Source, finished: str) -> tuple[bool, str]:
    """(partial?, "3 of 4 grid points complete; 1 running, 0 queued")."""

    done = STUDY_KINDS[source.kind].done(source.study)
    trials = source.study.get_trials(deepcopy=False)
    states = [trial.state for trial in trials]
    running, queued = states.count(TrialState.RUNNING), states.count(TrialState.WAITING)
    deferred = outstanding_deferred(source.study)
    failed = sum(trial.state == TrialState.FAIL and DEFERRED not in trial.user_attrs for trial in trials)
    kind = STUDY_KINDS[source.kind]
    text = f"{done} of {source.total} {kind.unit} {finished}"
    budget_spent = kind.budget_spent(source.study, source.space, stored_train_epochs(source.spec))
    if budget_spent:
        text = f"{done} {kind.unit} {finished}: the study's compute budget is spent"
    partial = (done < source.total and not budget_spent) or running > 0 or queued > 0
    if partial:
        text = f"partial: {text}; {running} running, {queued} queued"
    if deferred:
        reasons = sorted({trial.user_attrs[DEFERRED] for trial in deferred})
        text += f"; {len(deferred)} deferred (taken out of the queue: {'; '.join(reasons)})"
    if failed:
        text += f"; {failed} failed trial(s) (each queued again)"
    return partial, text


def deployment(source: Source, part: ReportPart) -> Deployment | None:
    """Teacher and student costs from one trial's run, the student the study kind's part picks (the best
    trial, or an ablation's kd_ig arm): its run whose latencies were timed on the quietest machine."""

    complete = [t for t in source.trials if t.state == TrialState.COMPLETE and source.run_of(t) is not None]
    chosen, student_acc, what = part.deployment_trials(complete)
    if not chosen:
        return None
    run = min((source.run_of(trial) for trial in chosen), key=lambda run: tables.timing_contention(run.data.metrics))
    return Deployment(
        dataset=run.data.params.get("data.name", "unknown dataset"),
        device=run.data.tags.get("device", "unknown device"),
        metrics=dict(run.data.metrics),
        teacher_acc=run.data.metrics.get("teacher_test_acc"),
        student_acc=student_acc,
        student_source=what,
    )


# --- the attribution figures' examples ----------------------------------------------------------


@dataclass
class Examples:
    """The first training image of each class and the teacher's maps of them by method."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    maps: dict[str, torch.Tensor]  # by method: (N, H, W) float32
    names: list[str]  # the images' class names
    how: str  # the data, and where each method's maps came from


def attribution_examples(spec_source: dict[str, Any], overrides: dict[str, Any], methods: list[str]) -> Examples:
    """The examples of ``methods`` (with the study's attribution settings): each method's maps from its
    cache when this machine has it, else computed now (a few images). Raises KdsearchError when the teacher
    or the data are not on this machine."""

    train = build_spec(apply_overrides(spec_source, overrides)).train
    if not Path(train.teacher_checkpoint).is_file():
        raise KdsearchError(
            f"teacher {train.teacher_checkpoint} is not on this machine (give --teacher-checkpoint or --cache-dir)"
        )
    splits = load_splits(train.data, train.cache_dir)
    cpu = torch.device("cpu")
    teacher = load_teacher(train, splits.num_classes, cpu)
    present = [c for c in range(splits.num_classes) if bool((splits.train_labels == c).any())]
    index = torch.stack([(splits.train_labels == c).nonzero()[0, 0] for c in present])
    maps, sources = {}, []
    for method in methods:
        maps[method], source = maps_of(teacher, splits, Attribution.of(train, method), index, train.cache_dir, cpu)
        sources.append(f"maps {source}" if len(methods) == 1 else f"{method} {source}")
    names = [splits.classes[c] for c in present]
    return Examples(splits.train_images[index], maps, names, f"{splits.label}; {'; '.join(sources)}")


# --- the report -------------------------------------------------------------------------------


def write_report(config: ReportConfig) -> Report:
    """Write every table and figure, then index.html, and log them to the parent run."""

    source = open_source(config)  # before anything is written: a wrong name or store writes nothing
    part = REPORT_PARTS[source.kind](source, config.overrides)
    partial, status = progress(source, part.finished)
    notes: list[str] = []
    marker = f" ({status})" if partial else ""
    rows = trial_rows(source)
    measured = deployment(source, part)
    if measured is None:
        notes.append("deployment table and this study's line in Fig. 1: no complete trial with an MLflow run yet")
    progress_text = status if partial else ""
    kind_tables, kind_figures = part.parts(rows, measured, progress_text, notes)

    title = f"Trials of {source.study.study_name} ({source.kind}){marker}"
    report_tables = [tables.trials_table(rows, title, [status]), *kind_tables]
    if measured is not None:
        report_tables.append(tables.deployment_table(measured, reported_deployment()))
    report_figures = [
        _compression_figure(source, measured),
        *kind_figures,
        *_ig_figure(source, config, notes),
        *_methods_figure(source, part, config, notes),
    ]
    return _write(config, source, report_tables, report_figures, partial, status, notes)


def _compression_figure(source: Source, measured: Deployment | None) -> Figure:
    """The paper's Fig. 1 with this study's teacher → student line, when it has one."""
    ours = []
    if measured is not None and measured.teacher_acc is not None and measured.student_acc is not None:
        compression = measured.metrics.get("compression_factor")
        if compression is not None:
            name = f"this study: {source.study.study_name}"
            ours.append(Line(name, measured.teacher_acc, compression, measured.student_acc))
    dataset = measured.dataset if measured is not None else "no runs yet"
    return Figure(
        "compression_accuracy",
        "Compression factor vs accuracy (the paper's Fig. 1)",
        figures.compression_accuracy(literature(), ours, dataset),
        width=1100,
        height=650,
    )


def _ig_figure(source: Source, config: ReportConfig, notes: list[str]) -> list[Figure]:
    """The teacher's IG maps of one training image per class, or a note saying why not."""
    if not config.ig_figure:
        return []
    try:
        examples = attribution_examples(source.spec, config.overrides, [AttributionMethod.INTEGRATED_GRADIENTS])
    except (KdsearchError, OSError, RuntimeError) as error:
        notes.append(f"IG figure skipped: {error}")
        return []
    title = f"Integrated Gradients of the teacher, one training image per class: {examples.how}"
    figure = figures.ig_figure(
        examples.images, examples.maps[AttributionMethod.INTEGRATED_GRADIENTS], examples.names, title
    )
    width = 110 * len(examples.names) + 120
    return [Figure("ig_examples", "IG maps and overlays (the paper's Fig. 3)", figure, width, 450)]


def _methods_figure(source: Source, part: ReportPart, config: ReportConfig, notes: list[str]) -> list[Figure]:
    """The same images' maps under each attribution method the study's trials overlay, where it has
    several; a note where they cannot be drawn."""
    methods = part.attribution_methods()
    if not config.ig_figure or len(methods) < 2:
        return []
    try:
        examples = attribution_examples(source.spec, config.overrides, methods)
    except (KdsearchError, OSError, RuntimeError) as error:
        notes.append(f"attribution methods figure skipped: {error}")
        return []
    title = f"The teacher's maps by method, one training image per class: {examples.how}"
    figure = figures.methods_figure(examples.images, examples.maps, examples.names, title)
    size = (110 * len(examples.names) + 160, 110 * len(methods) + 220)
    return [Figure("attribution_methods", "The same images' maps under each attribution method", figure, *size)]


def _write(
    config: ReportConfig,
    source: Source,
    report_tables: list[Table],
    report_figures: list[Figure],
    partial: bool,
    status: str,
    notes: list[str],
) -> Report:
    out = config.out
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    files: list[Path] = []
    for table in report_tables:
        files += table.write(out / "tables")
    for figure in report_figures:
        files.append(figures.write_html(figure, out / "figures", config.plotly_js))
    static = figures.write_static(report_figures, out / "figures")
    if static is not None:
        notes.append(static)
    else:
        files += [out / "figures" / f"{f.name}.{suffix}" for f in report_figures for suffix in ("png", "svg")]
    parent = source.parent.info.run_id if source.parent is not None else None
    if config.log_artifacts and parent is None:
        notes.append("not logged to MLflow: the study has no parent run in this tracking store")
    summary = {
        "study": source.study.study_name,
        "kind": source.kind,
        "partial": partial,
        "progress": status,
        "parent_run": parent,
        "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tables": [table.name for table in report_tables],
        "figures": [figure.name for figure in report_figures],
        "notes": notes,
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    (out / "index.html").write_text(_index(source, config, report_tables, report_figures, summary, static is None))
    files += [out / "report.json", out / "index.html"]
    logged = config.log_artifacts and parent is not None
    if logged:
        source.client.log_artifacts(parent, str(out), artifact_path="report")
    return Report(out, files, partial, status, notes, parent, logged)


def _index(source: Source, config: ReportConfig, report_tables, report_figures, summary: dict, static: bool) -> str:

    shown = hide_password(database_url(config.storage))
    experiment = source.client.get_experiment(source.parent.info.experiment_id).name if source.parent else None
    status_class = "partial" if summary["partial"] else ""
    parts = [
        f"<h1>Report: {html.escape(summary['study'])} ({summary['kind']})</h1>",
        f"<p class='{status_class}'>{html.escape(summary['progress'])}</p>",
        "<p class='note'>"
        f"storage {html.escape(shown)} · MLflow {html.escape(hide_password(config.tracking_uri))}"
        + (f" · experiment {html.escape(experiment)}, parent run {summary['parent_run']}" if experiment else "")
        + f" · generated {summary['generated']} (UTC). Browse the runs with <code>kdsearch ui</code>.</p>",
        "<h2>Tables</h2>",
    ]
    for table in report_tables:
        links = " · ".join(f"<a href='tables/{table.name}.{s}'>{s}</a>" for s in ("csv", "md", "html"))
        parts.append(f"{table.html_fragment()}\n<p>{links}</p>")
    parts.append("<h2>Figures</h2>")
    for figure in report_figures:
        suffixes = ("html", "png", "svg") if static else ("html",)
        links = " · ".join(f"<a href='figures/{figure.name}.{s}'>{s}</a>" for s in suffixes)
        image = (
            f"<br><a href='figures/{figure.name}.html'><img src='figures/{figure.name}.png' width='600'></a>"
            if static
            else ""
        )
        parts.append(f"<h3>{html.escape(figure.title)}</h3><p>{links}{image}</p>")
    if summary["notes"]:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in summary["notes"]) + "</ul>")
    return tables.html_page(f"kdsearch report: {summary['study']}", "\n".join(parts))


def describe(report: Report) -> str:
    """What the CLI prints: where the report is, how complete, and what was skipped."""
    lines = [f"{report.directory / 'index.html'}: {len(report.files)} files; {report.progress}"]
    if report.logged:
        lines.append(f"logged to MLflow run {report.parent_run} under report/")
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)
