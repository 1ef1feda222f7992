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
from kdsearch.search.study import RunSummary, StudyHandle, StudyKind, open_study, run_study
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

    def stores(self) -> tuple[str, Tracker]:
        """(Optuna storage URL, MLflow tracker), the tracking store checked; only the workdir is created."""
        import optuna

        from kdsearch.track.tracking import MlflowTracker, default_tracking_uri

        if self.workdir.exists() and not self.workdir.is_dir():
            raise ConfigError(f"--workdir {self.workdir} is a file, not a directory")
        self.workdir.mkdir(parents=True, exist_ok=True)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # kdsearch reports progress itself
        tracker = MlflowTracker(self.tracking_uri or default_tracking_uri(self.workdir))
        tracker.check()
        return self.storage_url, tracker

    def open(
        self, kind: StudyKind | str, spec: StudySpec, study_name: str | None = None
    ) -> tuple[StudyHandle, Tracker]:
        """Create the study of ``kind`` ("grid", "tpe", "ablation", "pareto") for ``spec``, or resume it."""
        from kdsearch.search.kinds import STUDY_KINDS

        if isinstance(kind, str):
            if kind not in STUDY_KINDS:
                raise ConfigError(f"study kind must be one of {sorted(STUDY_KINDS)} but got {kind!r}")
            kind = STUDY_KINDS[kind]
        storage_url, tracker = self.stores()
        return open_study(kind, spec, storage_url, self.heartbeat, study_name), tracker

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
        handle, tracker = self.open(kind, spec, study_name)
        return run_study(handle, tracker, experiment, progress, max_trials, self.checkpoints)
