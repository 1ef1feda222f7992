"""Running a study from Python as the CLI runs it: a workspace says where studies and runs live (by
default a SQLite study database and a local MLflow store in one folder), then a study of any kind is
created or resumed there and its remaining trials run.

    from kdsearch import Workspace, load_study
    summary = Workspace("runs/demo").run("grid", load_study("studies/smoke.yaml"))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kdsearch.errors import ConfigError
from kdsearch.search.optuna_storage import HeartbeatConfig
from kdsearch.search.study import RunSummary, StudyHandle, StudyKind, open_planned, plan_study, run_study
from kdsearch.search.studyfile import StudySpec
from kdsearch.track.tracking import Tracker


@dataclass(frozen=True)
class Workspace:
    workdir: Path = Path(".")  # holds studies.db, mlruns/ and the running trials' checkpoints/ by default
    storage: str | None = None  # Optuna storage URL; None: WORKDIR/studies.db
    tracking_uri: str | None = None  # MLflow tracking URI; None: WORKDIR/mlruns/mlflow.db
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "workdir", Path(self.workdir))

    @property
    def checkpoints(self) -> Path:
        """Per-epoch checkpoints of running trials (removed when a trial ends)."""
        return self.workdir / "checkpoints"

    @property
    def storage_url(self) -> str:
        from kdsearch.infra.storage import default_storage

        return self.storage or default_storage(self.workdir)

    def stores(self, experiment: str | None = None) -> tuple[str, Tracker]:
        """(Optuna storage URL, MLflow tracker), both checked, and the workdir and ``experiment`` (an MLflow
        experiment name) too; writes nothing.

        A workdir that does not exist yet holds no store: its default stores are new files in a folder
        that can be created, and only stores named elsewhere are checked.
        """
        import optuna

        from kdsearch.infra.storage import check_database, check_name_length, check_writable
        from kdsearch.track.tracking import MlflowTracker, default_tracking_uri

        check_writable(self.workdir, "--workdir")
        if experiment is not None:
            check_name_length(experiment, "--experiment")
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # kdsearch reports progress itself
        tracker = MlflowTracker(self.tracking_uri or default_tracking_uri(self.workdir))
        if self.tracking_uri is not None or self.workdir.is_dir():
            tracker.check()
        if self.storage is not None or self.workdir.is_dir():
            check_database(self.storage_url)
        return self.storage_url, tracker

    def open(
        self,
        kind: StudyKind | str,
        spec: StudySpec,
        study_name: str | None = None,
        experiment: str | None = None,
    ) -> tuple[StudyHandle, Tracker]:
        """Create the study of ``kind`` ("grid", "tpe", "ablation", "pareto") for ``spec``, or resume it.

        Everything is checked (the spec, the study name, the stores, ``experiment``, the name its runs
        will be logged under) before the workdir is created and the study written.
        """
        from kdsearch.search.kinds import STUDY_KINDS

        if isinstance(kind, str):
            if kind not in STUDY_KINDS:
                raise ConfigError(f"study kind must be one of {sorted(STUDY_KINDS)} but got {kind!r}")
            kind = STUDY_KINDS[kind]
        plan = plan_study(kind, spec, study_name)
        storage_url, tracker = self.stores(experiment)
        self.workdir.mkdir(parents=True, exist_ok=True)
        return open_planned(plan, storage_url, self.heartbeat), tracker

    def run(
        self,
        kind: StudyKind | str,
        spec: StudySpec,
        study_name: str | None = None,
        experiment: str | None = None,
        progress: bool = True,
        max_trials: int | None = None,
    ) -> RunSummary:
        """Create or resume the study and run its remaining trials (at most ``max_trials`` in this process)."""
        handle, tracker = self.open(kind, spec, study_name, experiment)
        return run_study(handle, tracker, experiment, progress, max_trials, self.checkpoints)
