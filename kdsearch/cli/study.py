"""The ``study`` commands (grid, tpe, pareto, worker, status, defer, best) and ``ablate``: thin, each
builds a spec from a study file plus flags and calls one library function.

Everything a command needs is validated, and the study storage and tracking store are checked, before
anything is written: a bad flag leaves no studies.db and no mlruns/ behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from kdsearch.cli.options import AttributionMethodName, with_options
from kdsearch.config import ParetoSampler, Runtime
from kdsearch.errors import ConfigError
from kdsearch.infra.urls import hide_password

study_app = typer.Typer(
    help="Optuna studies over a study file: grid, TPE, workers that join them, status and best trial.",
    no_args_is_help=True,
)

StudyFile = Annotated[
    Path | None,
    typer.Option("--study", help="Study file (.yaml/.toml, see studies/); default: built-in paper defaults."),
]
Storage = Annotated[
    str | None,
    typer.Option(
        "--storage",
        envvar="KDSEARCH_STORAGE",
        help="Optuna storage URL, e.g. postgresql://user:pass@host/db; default sqlite:///WORKDIR/studies.db.",
    ),
]
Workdir = Annotated[Path, typer.Option("--workdir", help="Where the default studies.db and mlruns/ live.")]
StudyName = Annotated[
    str | None, typer.Option("--study-name", help="Study name; default derived from the study file and space.")
]
TrackingUri = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        envvar="MLFLOW_TRACKING_URI",
        help="MLflow tracking URI (a server http://…, or sqlite:///…); default sqlite:///WORKDIR/mlruns/mlflow.db.",
    ),
]
Experiment = Annotated[str | None, typer.Option("--experiment", help="MLflow experiment; default the study's name.")]
Sets = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a study-file value, KEY=VALUE with dotted keys: train.epochs=2 (repeatable)."),
]
TeacherCheckpointOverride = Annotated[
    str | None, typer.Option("--teacher-checkpoint", help="Teacher weights; replaces the study file's teacher.")
]
Epochs = Annotated[int | None, typer.Option("--epochs", help="Epochs of every trial (train.epochs).")]
TrainSubsetOverride = Annotated[
    int | None, typer.Option("--train-subset", help="Stratified training subset (train.data.train_subset).")
]
DataDirOverride = Annotated[
    str | None, typer.Option("--data-dir", help="Data folder or download root (train.data.data_dir).")
]
Device = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda[:N] (train.device).")]
Precision = Annotated[str | None, typer.Option("--precision", help="auto | fp32 | bf16 | fp16 (train.precision).")]
CacheDirOverride = Annotated[
    str | None,
    typer.Option(
        "--cache-dir", envvar="KDSEARCH_CACHE_DIR", help="Cache of data, IG maps, teachers (train.cache_dir)."
    ),
]
HeartbeatInterval = Annotated[int, typer.Option("--heartbeat-interval", help="Seconds between trial heartbeats.")]
GracePeriod = Annotated[
    int, typer.Option("--grace-period", help="Seconds without a heartbeat after which a trial is retried.")
]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")]
MaxTrials = Annotated[int | None, typer.Option("--max-trials", min=1, help="Stop this process after N trials.")]


@dataclass(frozen=True)
class RunOptions:
    """The options of every command that runs trials (grid, tpe, ablate): where, and how each trial trains."""

    storage: Storage = None
    study_name: StudyName = None
    workdir: Workdir = Path(".")
    tracking_uri: TrackingUri = None
    experiment: Experiment = None
    sets: Sets = None
    teacher_checkpoint: TeacherCheckpointOverride = None
    epochs: Epochs = None
    train_subset: TrainSubsetOverride = None
    data_dir: DataDirOverride = None
    device: Device = None
    precision: Precision = None
    cache_dir: CacheDirOverride = None
    heartbeat_interval: HeartbeatInterval = 30
    grace_period: GracePeriod = 120
    progress: Progress = True

    def overrides(self) -> dict[str, Any]:
        """Study-file overrides from the flags, then from each --set."""
        from kdsearch.search.studyfile import parse_value

        flags = {
            "teacher": {"checkpoint": self.teacher_checkpoint} if self.teacher_checkpoint is not None else None,
            "train.epochs": self.epochs,
            "train.data.train_subset": self.train_subset,
            "train.data.data_dir": self.data_dir,
            "train.device": self.device,
            "train.precision": self.precision,
            "train.cache_dir": self.cache_dir,
        }
        overrides = {key: value for key, value in flags.items() if value is not None}
        for item in self.sets or []:
            key, separator, value = item.partition("=")
            if not separator or not key:
                raise ConfigError(f"--set takes KEY=VALUE but got {item!r}")
            overrides[key.strip()] = parse_value(value)
        return overrides

    def workspace(self):
        """Where the studies and runs live: the --workdir, --storage and --tracking-uri flags."""
        from kdsearch.search.launch import Workspace
        from kdsearch.search.optuna_storage import HeartbeatConfig

        heartbeat = HeartbeatConfig(interval=self.heartbeat_interval, grace=self.grace_period)
        return Workspace(self.workdir, self.storage, self.tracking_uri, heartbeat)


def _run(kind: str, spec, run: RunOptions, max_trials: int | None = None):
    """Create or resume the study, say which it is, and run its remaining trials: (handle, tracker, summary)."""
    from kdsearch.search.study import describe_progress, run_study

    workspace = run.workspace()
    handle, tracker = workspace.open(kind, spec, run.study_name, run.experiment)
    typer.echo(f"study {handle.name} in {hide_password(workspace.storage_url)}: {describe_progress(handle)}")
    return handle, tracker, run_study(handle, tracker, run.experiment, run.progress, max_trials, workspace.checkpoints)


def _spec(study_file: Path | None, overrides: dict[str, Any], section: str):
    """The spec of a study file (or the defaults) with ``section`` present, then the overrides."""
    from kdsearch.search.studyfile import apply_overrides, build_spec, read_study_file

    raw = read_study_file(study_file) if study_file is not None else {"name": "default"}
    raw.setdefault(section, {})
    return build_spec(apply_overrides(raw, overrides))


def _report(summary, kind) -> None:
    """The study's progress, its best trial, and exit code 1 when none of the trials run now completed."""
    from kdsearch.search.study import describe_trial

    states = _states(summary.counts)
    typer.echo(f"{summary.done} of {summary.total} {kind.done_word} ({summary.ran} run now); states {states}")
    if summary.best is not None:
        typer.echo("best: " + json.dumps(describe_trial(summary.best), default=str))
    _check_completed(summary)


def _check_completed(summary) -> None:
    from kdsearch.errors import NoTrialCompleted

    if summary.none_completed is not None:
        raise NoTrialCompleted(f"none of the {summary.ran} trial(s) run now completed: {summary.none_completed}")


def _states(counts: dict[str, int]) -> str:
    return ", ".join(f"{state.lower()} {count}" for state, count in counts.items() if count)


@study_app.command("grid")
@with_options(RunOptions, "run")
def grid_command(
    study_file: StudyFile = None,
    t: Annotated[str | None, typer.Option("--t", help="Temperatures, comma-separated: 1,2.5,5.")] = None,
    alpha: Annotated[str | None, typer.Option("--alpha", help="KD weights in [0, 1], comma-separated.")] = None,
    p: Annotated[str | None, typer.Option("--p", help="IG overlay probabilities in [0, 1], comma-separated.")] = None,
    gamma: Annotated[
        str | None,
        typer.Option("--gamma", help="Attention-transfer weights >= 0, comma-separated (adds a gamma axis)."),
    ] = None,
    max_trials: MaxTrials = None,
    *,
    run: RunOptions,
) -> None:
    """Evaluate every point of the grid T × alpha × p (× gamma) once (resumes: completed points are not re-run)."""
    from kdsearch.search.studyfile import parse_number_list

    overrides = run.overrides()
    for flag, name, text in (
        ("--t", "t", t),
        ("--alpha", "alpha", alpha),
        ("--p", "p", p),
        ("--gamma", "gamma", gamma),
    ):
        if text is not None:
            overrides[f"grid.{name}"] = parse_number_list(flag, text)
    spec = _spec(study_file, overrides, "grid")
    handle, _, summary = _run("grid", spec, run, max_trials)
    _report(summary, handle.kind)


@study_app.command("tpe")
@with_options(RunOptions, "run")
def tpe_command(
    study_file: StudyFile = None,
    trials: Annotated[int | None, typer.Option("--trials", help="Trials in total (tpe.trials).")] = None,
    pruner: Annotated[str | None, typer.Option("--pruner", help="median | hyperband | none (tpe.pruner).")] = None,
    max_trials: MaxTrials = None,
    *,
    run: RunOptions,
) -> None:
    """TPE over the study file's ranges of T, alpha, p (and optionally lr, student depth), pruning on
    per-epoch validation accuracy. Resumes up to --trials in total."""

    overrides = run.overrides()
    if trials is not None:
        overrides["tpe.trials"] = trials
    if pruner is not None:
        overrides["tpe.pruner"] = pruner
    spec = _spec(study_file, overrides, "tpe")
    handle, _, summary = _run("tpe", spec, run, max_trials)
    _report(summary, handle.kind)


@study_app.command("pareto")
@with_options(RunOptions, "run")
def pareto_command(
    study_file: StudyFile = None,
    trials: Annotated[int | None, typer.Option("--trials", help="Trials in total (pareto.trials).")] = None,
    sampler: Annotated[
        ParetoSampler | None, typer.Option("--sampler", help="Multi-objective sampler (pareto.sampler).")
    ] = None,
    latency: Annotated[
        Runtime | None, typer.Option("--latency", help="Runtime the latency objective is measured in.")
    ] = None,
    batch: Annotated[int | None, typer.Option("--batch", help="Batch size of the latency objective.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="Intra-op threads of the latency objective.")] = None,
    max_latency_ms: Annotated[
        float | None, typer.Option("--max-latency-ms", help="Constraint: slower architectures are not trained.")
    ] = None,
    min_val_acc: Annotated[
        float | None, typer.Option("--min-val-acc", help="Constraint: validation accuracy at least this (%).")
    ] = None,
    max_trials: MaxTrials = None,
    *,
    run: RunOptions,
) -> None:
    """Search students for validation accuracy and measured latency together: the Pareto front of
    architecture (blocks dropped, width, pruning) and KD/IG/AT settings. Resumable, joinable by workers."""

    overrides = run.overrides()
    flags = {
        "trials": trials,
        "sampler": sampler,
        "latency": latency,
        "batch": batch,
        "threads": threads,
        "max_latency_ms": max_latency_ms,
        "min_val_acc": min_val_acc,
    }
    overrides |= {f"pareto.{name}": str(value) if name in ("sampler", "latency") else value
                  for name, value in flags.items() if value is not None}  # fmt: skip
    spec = _spec(study_file, overrides, "pareto")
    handle, _, summary = _run("pareto", spec, run, max_trials)
    _report(summary, handle.kind)


@study_app.command("worker")
def worker_command(
    study_name: Annotated[str, typer.Option("--study-name", help="The study to join.")],
    storage: Storage = None,
    workdir: Workdir = Path("."),
    tracking_uri: TrackingUri = None,
    experiment: Experiment = None,
    teacher_checkpoint: TeacherCheckpointOverride = None,
    data_dir: DataDirOverride = None,
    device: Device = None,
    cache_dir: CacheDirOverride = None,
    wait: Annotated[
        float,
        typer.Option("--wait", min=0, help="Seconds to wait for the study to be created by another process."),
    ] = 0.0,
    heartbeat_interval: HeartbeatInterval = 30,
    grace_period: GracePeriod = 120,
    max_trials: MaxTrials = None,
    progress: Progress = True,
) -> None:
    """Join an existing study (grid, TPE or ablation) and run its trials until none is left.

    Paths stored with the study are the creating machine's; --data-dir, --teacher-checkpoint and
    --cache-dir adapt them to this one.
    """
    from kdsearch.search.kinds import STUDY_KINDS
    from kdsearch.search.study import describe_progress, join_study, run_study

    run = RunOptions(
        storage=storage,
        workdir=workdir,
        tracking_uri=tracking_uri,
        teacher_checkpoint=teacher_checkpoint,
        data_dir=data_dir,
        device=device,
        cache_dir=cache_dir,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
    )
    workspace = run.workspace()
    storage_url, tracker = workspace.stores(experiment)
    handle = join_study(study_name, storage_url, workspace.heartbeat, STUDY_KINDS, run.overrides(), wait_s=wait)
    typer.echo(f"joined {handle.kind.name} study {handle.name}: {describe_progress(handle)}")
    _report(run_study(handle, tracker, experiment, progress, max_trials, workspace.checkpoints), handle.kind)


@study_app.command("status")
def status_command(
    study_name: Annotated[str | None, typer.Option("--study-name", help="Default: the only study.")] = None,
    storage: Storage = None,
    workdir: Workdir = Path("."),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Trials by state, progress and the best trial so far."""
    from kdsearch.infra.storage import default_storage
    from kdsearch.search.kinds import STUDY_KINDS
    from kdsearch.search.study import find_study, status, stored_kind

    study = find_study(storage or default_storage(workdir), study_name)
    report = status(study, STUDY_KINDS[stored_kind(study)])
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    word = STUDY_KINDS[report["kind"]].done_word
    typer.echo(f"study {report['study']} ({report['kind']}): {report['done']} of {report['total']} {word}")
    typer.echo(f"  trials: {_states(report['states']) or 'none'}")
    best = report["best"]
    if best is not None:
        typer.echo(
            f"  best: trial {best['trial']}  val_acc {best['val_acc']:.2f}  test_acc {best['test_acc']}  {best['params']}"
        )
    if report["budget"] is not None:
        typer.echo(f"  {report['budget']}")
    for deferred in report["deferred"]:
        typer.echo(f"  deferred: trial {deferred['trial']}  {_point(deferred['point'])}  ({deferred['reason']})")
    for trial in report["front"] or []:
        typer.echo(
            f"  front: trial {trial['trial']}  val_acc {trial['val_acc']:.2f}  latency {trial['latency_ms']:.3f} ms"
            f"  test_acc {trial['test_acc']}  {trial['params']}"
            + (f"  (the student of trial {trial['same_as_trial']})" if "same_as_trial" in trial else "")
        )
    for candidate in report["rungs"] or []:
        reached = "  ".join(f"{epochs} ep {acc:.2f}" for epochs, acc in candidate["val_acc_after_epochs"].items())
        where = f"stopped after {candidate['stopped_at']} epochs" if candidate["stopped_at"] else candidate["state"]
        typer.echo(f"  rungs: trial {candidate['trial']}  {reached}  ({where})")


@study_app.command("defer")
def defer_command(
    where: Annotated[
        list[str],
        typer.Option(
            "--where",
            help="KEY=V1,V2 on the point's params, e.g. arm=kd,kd_at or seed=1 (repeatable: every key must match).",
        ),
    ],
    reason: Annotated[str, typer.Option("--reason", help="Why; kept on the trials and shown by status and report.")],
    study_name: Annotated[str | None, typer.Option("--study-name", help="Default: the only study.")] = None,
    storage: Storage = None,
    workdir: Workdir = Path("."),
) -> None:
    """Take queued trials out of the queue, so that workers run the others first. Running the study's
    command again (ablate, study grid) queues them again; `study worker` leaves them out."""
    from kdsearch.infra.storage import default_storage
    from kdsearch.search.study import defer_queued
    from kdsearch.search.studyfile import parse_value

    matches: dict[str, list[Any]] = {}
    for item in where:
        key, separator, values = item.partition("=")
        if not separator or not key.strip() or not values.strip():
            raise ConfigError(f"--where takes KEY=V1,V2 but got {item!r}")
        matches[key.strip()] = [parse_value(value.strip()) for value in values.split(",")]
    deferred = defer_queued(storage or default_storage(workdir), study_name, matches, reason)
    typer.echo(f"deferred {len(deferred)} queued trial(s): " + "; ".join(_point(point) for point in deferred))


def _point(point: dict[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in point.items())


@study_app.command("best")
def best_command(
    study_name: Annotated[str | None, typer.Option("--study-name", help="Default: the only study.")] = None,
    storage: Storage = None,
    workdir: Workdir = Path("."),
) -> None:
    """The best trial (highest validation accuracy) as JSON: its params, val_acc, test_acc, run id."""
    from kdsearch.errors import StudyError
    from kdsearch.infra.storage import default_storage
    from kdsearch.search.study import best_trial, describe_trial, find_study

    study = find_study(storage or default_storage(workdir), study_name)
    best = best_trial(study)
    if best is None:
        raise StudyError(f"study {study.study_name} has no completed trial yet")
    typer.echo(json.dumps(describe_trial(best), indent=2, default=str))


@with_options(RunOptions, "run")
def ablate_command(
    study_file: StudyFile = None,
    seeds: Annotated[int | None, typer.Option("--seeds", help="Seeds per arm (ablation.seeds).")] = None,
    arms: Annotated[
        str | None,
        typer.Option(
            "--arms",
            help="Comma-separated, of baseline, kd, ig, kd_ig, ig_shuffled, at, ig_at, kd_at, kd_ig_at, and per "
            "attribution method M (saliency, input_x_gradient, smoothgrad, gradient_shap, deeplift, grad_cam) "
            "kd_M and its control M_shuffled.",
        ),
    ] = None,
    extra_arms: Annotated[
        str | None,
        typer.Option(
            "--extra-arms", help="Comma-separated arms added to the study file's, e.g. ig_shuffled or at,kd_ig_at."
        ),
    ] = None,
    t: Annotated[float | None, typer.Option("--t", help="KD temperature of the kd arms.")] = None,
    alpha: Annotated[float | None, typer.Option("--alpha", help="KD weight of the kd arms.")] = None,
    p: Annotated[float | None, typer.Option("--p", help="Overlay probability of the arms with an overlay.")] = None,
    gamma: Annotated[
        float | None, typer.Option("--gamma", help="Attention-transfer weight of the *_at arms (ablation.gamma).")
    ] = None,
    from_study: Annotated[
        str | None, typer.Option("--from-study", help="Take T, alpha and p from this study's best trial.")
    ] = None,
    agreement_images: Annotated[
        int | None, typer.Option("--agreement-images", help="Test images for explanation agreement (0: skip).")
    ] = None,
    agreement_method: Annotated[
        AttributionMethodName | None,
        typer.Option("--agreement-method", help="Whose maps explanation agreement compares (default IG)."),
    ] = None,
    *,
    run: RunOptions,
) -> None:
    """Train every arm × seed with the same teacher, cache, data and budget; print the paper's Table 3
    with paired tests and the students' explanation agreement with the teacher. Resumes, and a later
    run with more --seeds or arms adds them to the same ablation."""
    # Long because the signature is the command's option list; the body maps flags to study-file overrides.
    from kdsearch.infra.storage import default_storage
    from kdsearch.search.ablation import ablation_table, log_table, point_from_study

    overrides = run.overrides()
    if from_study is not None and (t, alpha, p) != (None, None, None):
        raise ConfigError("give either --from-study or --t/--alpha/--p, not both")
    if from_study is not None:
        point = point_from_study(run.storage or default_storage(run.workdir), from_study)
        t, alpha, p, gamma = point["t"], point["alpha"], point["p"], point.get("gamma", gamma)
    for name, value in (
        ("seeds", seeds),
        ("t", t),
        ("alpha", alpha),
        ("p", p),
        ("gamma", gamma),
        ("agreement_images", agreement_images),
        ("agreement_method", agreement_method and str(agreement_method)),
    ):
        if value is not None:
            overrides[f"ablation.{name}"] = value
    for name, text in (("arms", arms), ("extra_arms", extra_arms)):
        if text is not None:
            overrides[f"ablation.{name}"] = [item.strip() for item in text.split(",") if item.strip()]
    spec = _spec(study_file, overrides, "ablation")
    handle, tracker, summary = _run("ablation", spec, run)
    _check_completed(summary)
    table = ablation_table(handle.study)
    if summary.parent_run is not None:
        log_table(tracker, summary.parent_run, table)
    typer.echo(table.format())


def register(app: typer.Typer) -> None:
    """Add ``study …`` and ``ablate`` to the main CLI."""
    app.add_typer(study_app, name="study")
    app.command("ablate")(ablate_command)
