"""The report of a study or ablation, from its storage alone: tables, figures, one index.html.

    kdsearch report --study smoke-grid-1a2b3c4d --out reports/smoke-grid
    kdsearch report --ablation cpu-quick-ablation-… --out reports/ablation \\
        --storage postgresql://kd@db-host/optuna --tracking-uri http://db-host:5000

Everything comes from the Optuna storage (trials, their parameters, values and user attributes, the
stored spec) and the MLflow store (the runs' costs and latencies, the dataset label, the device), so a
report can be made on any machine that reaches both, while workers are still running: titles and the
index then say "partial" and how far the study got. Only the IG figure needs more — the teacher and
the data — and it is skipped, saying why, where they are missing. The files are also logged as
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

import optuna
import pandas as pd
import torch
from optuna.trial import TrialState

from kdsearch.config import replace
from kdsearch.data.datasets import load_splits
from kdsearch.distill.attribution import ig_cache_fields
from kdsearch.distill.teacher import load_teacher
from kdsearch.errors import ConfigError, KdsearchError, StudyError
from kdsearch.infra.storage import database_url
from kdsearch.infra.tensor_cache import TensorCache
from kdsearch.infra.urls import hide_password
from kdsearch.report import figures, tables
from kdsearch.report.figures import Figure, Line
from kdsearch.report.pareto_part import front_figure, front_table, optuna_front, pareto_result
from kdsearch.report.tables import Deployment, Table
from kdsearch.search.ablation import ablation_table, ig_on
from kdsearch.search.kinds import STUDY_KINDS
from kdsearch.search.study import ATTR, DEFERRED, best_trial, find_study, outstanding_deferred
from kdsearch.search.studyfile import apply_overrides, build_spec
from kdsearch.track.tracking import PARENT_KEY_TAG, ROLE_TAG, mlflow_client

log = logging.getLogger(__name__)

KINDS = {"study": ("grid", "tpe", "pareto"), "ablation": ("ablation",)}  # what --study and --ablation accept
STATES = {"COMPLETE": "complete", "RUNNING": "running", "WAITING": "queued", "PRUNED": "pruned"}
# kdsearch is a namespace package (no __init__.py), which importlib.resources cannot read in Python 3.11.
RESOURCES = Path(__file__).resolve().parent / "resources"
IG_STUDENT_ARM = "kd_ig"  # the ablation arm whose student the deployment table and Fig. 1 show


@dataclass(frozen=True)
class ReportConfig:
    study: str  # the study's name in the storage
    out: Path  # the report's directory (created; files of the same names are replaced)
    storage: str  # Optuna storage URL
    tracking_uri: str  # MLflow tracking URI
    kind: str | None = None  # "study" (grid or TPE) | "ablation": the other kind is refused; None: any
    # The stored spec holds the creating machine's paths; these adapt them here (train.cache_dir,
    # train.data.data_dir, teacher.checkpoint), as for `study worker`. Only the IG figure uses them.
    overrides: dict[str, Any] = field(default_factory=dict)
    ig_figure: bool = True
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


@dataclass
class Source:
    study: optuna.Study
    kind: str
    total: int
    space: dict[str, Any]
    spec: dict[str, Any]  # the study file's spec as stored (the creating machine's paths)
    client: Any  # MlflowClient
    parent: Any | None  # the parent mlflow Run, None when nothing was logged
    runs: dict[str, Any]  # run id → the mlflow Run of a trial

    @property
    def trials(self) -> list[optuna.trial.FrozenTrial]:
        """Every trial but failed ones (a failed point is queued again as a new trial)."""
        return [t for t in self.study.get_trials(deepcopy=False) if t.state.name in STATES]

    def run_of(self, trial: optuna.trial.FrozenTrial):
        return self.runs.get(trial.user_attrs.get("run_id", ""))


def open_source(config: ReportConfig) -> Source:
    """Find the study and its MLflow runs; raises a one-line KdsearchError and writes nothing otherwise."""

    study = find_study(config.storage, config.study)
    stored = study.user_attrs.get(ATTR)
    if stored is None:
        raise StudyError(f"study {config.study!r} was not created by kdsearch (no {ATTR!r} attribute)")
    if config.kind is not None and stored["kind"] not in KINDS[config.kind]:
        what = {"grid": "a grid study", "tpe": "a TPE study", "pareto": "a Pareto study", "ablation": "an ablation"}[
            stored["kind"]
        ]
        flag = "--ablation" if stored["kind"] == "ablation" else "--study"
        raise StudyError(f"study {config.study!r} is {what}; report it with {flag}")
    client = mlflow_client(config.tracking_uri)
    parent = _parent_run(client, study.study_name)
    runs = {run.info.run_id: run for run in _children(client, parent)} if parent is not None else {}
    return Source(study, stored["kind"], stored["total"], stored["space"], stored["spec"], client, parent, runs)


def _parent_run(client, key: str):

    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    query = f"tags.`{PARENT_KEY_TAG}` = '{key}' and tags.`{ROLE_TAG}` = 'parent'"
    found = client.search_runs(experiments, filter_string=query, max_results=1) if experiments else []
    return found[0] if found else None


def _children(client, parent) -> list:
    runs, token = [], None
    query = f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    while True:
        page = client.search_runs([parent.info.experiment_id], query, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def progress(source: Source) -> tuple[bool, str]:
    """(partial?, "3 of 4 grid points complete; 1 running, 0 queued")."""

    done = STUDY_KINDS[source.kind].done(source.study)
    trials = source.study.get_trials(deepcopy=False)
    states = [trial.state for trial in trials]
    running, queued = states.count(TrialState.RUNNING), states.count(TrialState.WAITING)
    deferred = outstanding_deferred(source.study)
    failed = sum(trial.state == TrialState.FAIL and DEFERRED not in trial.user_attrs for trial in trials)
    verb = "finished (complete or pruned)" if source.kind == "tpe" else "complete"
    text = f"{done} of {source.total} {STUDY_KINDS[source.kind].unit} {verb}"
    partial = done < source.total or running > 0 or queued > 0
    if partial:
        text = f"partial: {text}; {running} running, {queued} queued"
    if deferred:
        reasons = sorted({trial.user_attrs[DEFERRED] for trial in deferred})
        text += f"; {len(deferred)} deferred (taken out of the queue: {'; '.join(reasons)})"
    if failed:
        text += f"; {failed} failed trial(s) (each queued again)"
    return partial, text


# --- the paper's figures ----------------------------------------------------------------------


def literature() -> pd.DataFrame:
    """The literature table of the paper's Fig. 1 and Table 1 (CIFAR-10), shipped with kdsearch."""
    return pd.read_csv(RESOURCES / "literature_cifar10.csv")


def paper_results() -> pd.DataFrame:
    """The paper's reported results (Tables 3 and 4, and its set-up), shipped with kdsearch."""
    return pd.read_csv(RESOURCES / "paper_results.csv", dtype={"value": str})


def reported_accuracy() -> dict[str, float]:
    """Table 3 of the paper by row name: Teacher, Baseline Student, KD, IG, KD & IG."""
    results = paper_results()
    rows = results[(results["table"] == "3") & (results["metric"] == "test_accuracy")]
    return {row["row"]: float(row["value"]) for _, row in rows.iterrows()}


def reported_deployment() -> dict[tuple[str, str], float]:
    """{("teacher" | "student", "params" | "latency_per_batch" | "test_accuracy"): value} from the paper."""
    results = paper_results()
    found: dict[tuple[str, str], float] = {}
    for _, row in results.iterrows():
        who = str(row["row"]).lower()
        if row["table"] == "setup" and who in ("teacher", "student") and row["metric"] == "params":
            found[(who, "params")] = float(row["value"])
        if row["table"] == "4":
            found[(who, "latency_per_batch")] = float(row["value"])
    accuracy = reported_accuracy()
    found[("teacher", "test_accuracy")] = accuracy[tables.PAPER_ROWS["teacher"]]
    found[("student", "test_accuracy")] = accuracy[tables.PAPER_ROWS[IG_STUDENT_ARM]]
    return found


# --- tables -----------------------------------------------------------------------------------


def trial_rows(source: Source) -> list[dict[str, Any]]:
    rows = []
    for trial in source.trials:
        complete = trial.state == TrialState.COMPLETE
        attrs = trial.user_attrs if complete else {}
        rows.append(
            {
                "trial": trial.number,
                "state": STATES[trial.state.name],
                # A queued trial holds its point in fixed_params until its objective suggests it.
                "params": dict(trial.params or trial.system_attrs.get("fixed_params") or {}),
                "val_acc": trial.values[0] if complete else None,
                "test_acc": attrs.get("test_acc"),
                **{key: attrs[key] for key in ("agreement_spearman", "agreement_iou_top10") if key in attrs},
            }
        )
    return rows


def deployment(source: Source, ablation) -> Deployment | None:
    """Teacher and student costs from one trial's run: the best trial's, or an ablation's kd_ig arm (its run
    whose latencies were timed on the quietest machine: the arm's seeds share the architecture)."""

    complete = [t for t in source.trials if t.state == TrialState.COMPLETE and source.run_of(t) is not None]
    if source.kind == "ablation":
        chosen = [t for t in complete if t.params.get("arm") == IG_STUDENT_ARM] or complete
        row = next((r for r in ablation.rows if r.arm == chosen[0].params.get("arm")), None) if chosen else None
        student_acc = row.mean if row is not None else None
        what = f"the {row.arm} arm (mean over {row.n} seed(s))" if row is not None else ""
    else:
        best = best_trial(source.study)
        chosen = [t for t in complete if best is not None and t.number == best.number]
        student_acc = best.user_attrs.get("test_acc") if best is not None else None
        what = f"the best trial by validation accuracy (trial {best.number})" if best is not None else ""
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


# --- the IG figure's examples -----------------------------------------------------------------


def ig_examples(
    spec_source: dict[str, Any], overrides: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, list[str], str]:
    """The first training image of each class, its teacher IG map and how the map was obtained.

    From the study's IG cache when this machine has it, else computed now (a few images, the cache's
    settings). Raises KdsearchError when the teacher or the data are not on this machine.
    """

    train = build_spec(apply_overrides(spec_source, overrides)).train
    if not Path(train.teacher_checkpoint).is_file():
        raise KdsearchError(
            f"teacher {train.teacher_checkpoint} is not on this machine (give --teacher-checkpoint or --cache-dir)"
        )
    splits = load_splits(train.data, train.cache_dir)
    teacher = load_teacher(train, splits.num_classes, torch.device("cpu"))
    present = [c for c in range(splits.num_classes) if bool((splits.train_labels == c).any())]
    index = torch.stack([(splits.train_labels == c).nonzero()[0, 0] for c in present])
    images, labels = splits.train_images[index], splits.train_labels[index]
    # precision "auto" resolves per machine: the workers' cache may be either precision.
    precisions = ("bf16", "fp32") if train.ig.precision == "auto" else (train.ig.precision,)
    store = TensorCache(train.cache_dir)
    caches = (store.load("ig", ig_cache_fields(teacher, splits, replace(train.ig, precision=p))) for p in precisions)
    cache = next((found for found in caches if found is not None), None)
    if cache is not None:
        maps, how = cache.tensors["maps"][index].float(), f"maps from the IG cache {cache.path.name}"
    else:
        maps = ig_on(teacher, images, labels, splits, train.ig)
        how = f"maps computed now ({train.ig.n_steps} steps): no IG cache for this teacher and split here"
    return images, maps, [splits.classes[c] for c in present], f"{splits.label}; {how}"


# --- the report -------------------------------------------------------------------------------


def write_report(config: ReportConfig) -> Report:
    """Write every table and figure, then index.html, and log them to the parent run."""

    source = open_source(config)  # before anything is written: a wrong name or store writes nothing
    partial, status = progress(source)
    notes: list[str] = []
    marker = f" ({status})" if partial else ""
    name = source.study.study_name
    rows = trial_rows(source)
    ablation = ablation_table(source.study) if source.kind == "ablation" else None

    report_tables = [tables.trials_table(rows, f"Trials of {name} ({source.kind}){marker}", [status])]
    if ablation is not None:
        report_tables += list(
            tables.ablation_tables(replace(ablation, title=ablation.title + marker), reported_accuracy())
        )
    measured = deployment(source, ablation)
    if measured is not None:
        report_tables.append(tables.deployment_table(measured, reported_deployment()))
    else:
        notes.append("deployment table and this study's line in Fig. 1: no complete trial with an MLflow run yet")

    progress_text = status if partial else ""
    report_figures = _figures(source, config, rows, ablation, measured, progress_text, notes)
    if source.kind == "pareto":
        front_tables, front_figures = _pareto_parts(source, config, measured, progress_text, notes)
        report_tables += front_tables
        report_figures += front_figures
    return _write(config, source, report_tables, report_figures, partial, status, notes)


def _pareto_parts(source: Source, config: ReportConfig, measured, progress: str, notes: list[str]):
    """The front's table and figures; a note instead when the data or the teacher are not here."""
    if not any(t.state == TrialState.COMPLETE for t in source.trials):
        notes.append("Pareto front: no complete trial yet")
        return [], []
    spec = build_spec(apply_overrides(source.spec, config.overrides))
    try:
        result = pareto_result(source.study, spec, source.client)
    except (KdsearchError, OSError) as error:
        notes.append(f"Pareto front table and figure skipped: {error}")
        return [], [Figure("optuna_pareto_front", "Optuna's Pareto front", optuna_front(source.study))]
    dataset = measured.dataset if measured is not None else spec.train.data.label or spec.train.data.dataset
    return [front_table(result, dataset)], [
        Figure("pareto_front", "Pareto front: accuracy vs latency", front_figure(result, dataset, progress), 1100, 650),
        Figure("optuna_pareto_front", "Optuna's Pareto front", optuna_front(source.study)),
    ]


def _figures(source: Source, config: ReportConfig, rows, ablation, measured, progress: str, notes: list[str]):
    """``progress``: how far a partial study got, for the figure titles; empty when it is complete."""
    ours = []
    if measured is not None and measured.teacher_acc is not None and measured.student_acc is not None:
        compression = measured.metrics.get("compression_factor")
        if compression is not None:
            ours.append(
                Line(
                    f"this study: {source.study.study_name}",
                    measured.teacher_acc,
                    compression,
                    measured.student_acc,
                )
            )
    dataset = measured.dataset if measured is not None else "no runs yet"
    found = [
        Figure(
            "compression_accuracy",
            "Compression factor vs accuracy (the paper's Fig. 1)",
            figures.compression_accuracy(literature(), ours, dataset),
            width=1100,
            height=650,
        )
    ]
    if ablation is not None:
        reported = {arm: reported_accuracy()[row] for arm, row in tables.PAPER_ROWS.items()}
        reported |= tables.REFERENCE_AT_ACCURACY
        found.append(
            Figure(
                "ablation_bars",
                "Ablation: test accuracy with 95% CI",
                figures.ablation_bars(ablation, reported, progress),
            )
        )
    elif source.kind != "pareto":  # Optuna's history and coordinates plots are single-objective
        if source.kind == "grid":
            heatmaps = figures.grid_heatmaps([r for r in rows if r["val_acc"] is not None], source.space)
            if progress:
                heatmaps.update_layout(title=f"{heatmaps.layout.title.text}<br>({progress})")
            found.append(
                Figure(
                    "grid_heatmaps", "Grid: T × α per p", heatmaps, width=350 * len(source.space["p"]) + 250, height=500
                )
            )
        found += _optuna_figures(source, rows, notes)
    if config.ig_figure:
        try:
            images, maps, names, how = ig_examples(source.spec, config.overrides)
        except (KdsearchError, OSError, RuntimeError) as error:
            notes.append(f"IG figure skipped: {error}")
        else:
            title = f"Integrated Gradients of the teacher, one training image per class: {how}"
            figure = figures.ig_figure(images, maps, names, title)
            found.append(
                Figure(
                    "ig_examples",
                    "IG maps and overlays (the paper's Fig. 3)",
                    figure,
                    width=110 * len(names) + 120,
                    height=450,
                )
            )
    return found


def _optuna_figures(source: Source, rows, notes: list[str]) -> list[Figure]:
    """Optuna's history and parallel coordinates, over the params that complete trials have."""
    complete = [row for row in rows if row["val_acc"] is not None]
    if not complete:
        notes.append("Optuna's history and parallel-coordinates figures: no complete trial yet")
        return []
    params = [p for p in ("t", "alpha", "p", "gamma", "lr", "student_drop") if any(p in r["params"] for r in complete)]
    return [
        Figure("optimization_history", "Optuna optimisation history", figures.optimization_history(source.study)),
        Figure(
            "parallel_coordinates", "Optuna parallel coordinates", figures.parallel_coordinates(source.study, params)
        ),
    ]


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
