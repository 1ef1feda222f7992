"""Experiment tracking: one interface, an MLflow backend, and an in-memory one for tests.

A study or ablation is one parent run; each trial (or arm × seed) is a run nested under it. The parent
run is found again by its key (the study's name), so a resumed study or a worker in another process
adds its runs under the same parent instead of starting a new one.

The default store is MLflow's SQLite backend in ``./mlruns/mlflow.db`` with artifacts in
``./mlruns/artifacts``: MLflow 3 keeps the plain file store in maintenance mode and refuses it unless
told otherwise, and recommends a database backend.
"""

from __future__ import annotations

import abc
import functools
import itertools
import json
import logging
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdsearch.errors import KdsearchError
from kdsearch.infra.urls import sqlite_file, sqlite_url

log = logging.getLogger(__name__)

PARENT_KEY_TAG = "kdsearch.key"
ROLE_TAG = "kdsearch.role"


class TrackingError(KdsearchError):
    """The tracking store cannot be reached or written."""


def default_tracking_uri(workdir: str | Path = ".") -> str:
    return sqlite_url(Path(workdir) / "mlruns" / "mlflow.db")


class Tracker(abc.ABC):
    """Where runs, their params, metrics and artefacts go.

    ``check`` must write nothing: commands call it before they create anything, so a bad URI fails
    cleanly. ``parent_run`` is find-or-create by key. Values are logged as given; params are
    stringified by the backend.
    """

    @abc.abstractmethod
    def check(self) -> None:
        """Raise TrackingError when the store cannot be reached."""

    @abc.abstractmethod
    def parent_run(self, experiment: str, key: str, name: str, tags: dict[str, str]) -> str:
        """The id of the parent run with this key in the experiment, created when missing."""

    @abc.abstractmethod
    def start_run(self, experiment: str, name: str, parent_id: str, tags: dict[str, str]) -> str:
        """Create a run nested under ``parent_id`` and return its id."""

    @abc.abstractmethod
    def log_params(self, run_id: str, params: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None: ...

    @abc.abstractmethod
    def set_tags(self, run_id: str, tags: dict[str, str]) -> None: ...

    @abc.abstractmethod
    def log_dict(self, run_id: str, payload: dict[str, Any], filename: str) -> None: ...

    @abc.abstractmethod
    def log_text(self, run_id: str, text: str, filename: str) -> None: ...

    @abc.abstractmethod
    def log_artifact(self, run_id: str, path: str | Path) -> None: ...

    @abc.abstractmethod
    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """status: FINISHED | FAILED | KILLED (MLflow's run states)."""

    @abc.abstractmethod
    def running_children(self, parent_id: str, tag: str, values: Collection[str]) -> list[str]:
        """Ids of the runs nested under ``parent_id`` that are still RUNNING and whose ``tag`` is one of ``values``."""


class MlflowTracker(Tracker):
    def __init__(self, uri: str):
        from kdsearch.infra.storage import database_url

        self.uri = database_url(uri)
        self._experiments: dict[str, str] = {}

    @functools.cached_property
    def client(self):
        # Created on first use, after `check`: opening a SQLite store creates its file and tables.
        from mlflow import MlflowClient

        for name in ("alembic", "mlflow.store.db.utils"):
            logging.getLogger(name).setLevel(logging.WARNING)  # schema-migration chatter on first use
        path = sqlite_file(self.uri)
        if path is None:
            return MlflowClient(tracking_uri=self.uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Two workers opening a new SQLite store at once both run MLflow's schema migration, and one
        # fails ("expected to match one row ... in 'alembic_version'"): create it under a file lock.
        from filelock import FileLock

        with FileLock(str(path) + ".lock"):
            client = MlflowClient(tracking_uri=self.uri)
            client.search_experiments(max_results=1)  # creates and migrates the store
        return client

    def check(self) -> None:
        scheme = self.uri.split(":", 1)[0].lower() if ":" in self.uri else "file"
        if scheme == "sqlite":
            from kdsearch.infra.storage import check_sqlite_file

            store = sqlite_file(self.uri)
            # ./mlruns itself is created on first use; beyond it, a missing directory is a typo.
            if not (store.parent.is_dir() or (store.parent.name == "mlruns" and store.parent.parent.is_dir())):
                raise TrackingError(f"tracking store {self.uri}: directory {store.parent} does not exist")
            check_sqlite_file(store, f"tracking store {self.uri}", TrackingError)
        elif scheme in ("http", "https"):
            try:
                with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=5):
                    pass
            except (urllib.error.URLError, OSError) as error:
                raise TrackingError(f"cannot reach the MLflow server at {self.uri} ({error})") from None
        elif scheme in ("postgresql", "mysql", "mssql") or scheme.startswith(("postgresql+", "mysql+", "mssql+")):
            from kdsearch.infra.storage import check_database

            check_database(self.uri, what="tracking store", error=TrackingError)
        elif scheme == "file":
            raise TrackingError(
                f"tracking store {self.uri}: MLflow 3 refuses the file store; use sqlite:///PATH/mlflow.db or a server"
            )
        else:  # MLflow would take it, then fail on its first write with a traceback (or its UI after seconds)
            raise TrackingError(
                f"tracking store {self.uri}: not a tracking URI kdsearch can use; give sqlite:///PATH/mlflow.db, "
                "an MLflow server http(s)://HOST:PORT, or a database postgresql://, mysql://, mssql://"
            )

    def _artifact_location(self, experiment: str) -> str | None:
        # A server or database store chooses its own artifact root; a local SQLite store keeps them beside it.
        path = sqlite_file(self.uri)
        return str(path.parent / "artifacts" / experiment) if path is not None else None

    def _experiment_id(self, name: str) -> str:
        if name not in self._experiments:
            from mlflow.exceptions import MlflowException

            found = self.client.get_experiment_by_name(name)
            if found is None:
                try:
                    experiment_id = self.client.create_experiment(name, self._artifact_location(name))
                except MlflowException:  # another worker created it first
                    experiment_id = self.client.get_experiment_by_name(name).experiment_id
            else:
                experiment_id = found.experiment_id
            self._experiments[name] = experiment_id
        return self._experiments[name]

    def parent_run(self, experiment: str, key: str, name: str, tags: dict[str, str]) -> str:
        experiment_id = self._experiment_id(experiment)
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{PARENT_KEY_TAG}` = '{key}'", max_results=1
        )
        if found:
            return found[0].info.run_id
        run = self.client.create_run(
            experiment_id, run_name=name, tags={**tags, PARENT_KEY_TAG: key, ROLE_TAG: "parent"}
        )
        return run.info.run_id

    def start_run(self, experiment: str, name: str, parent_id: str, tags: dict[str, str]) -> str:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        run = self.client.create_run(
            self._experiment_id(experiment),
            run_name=name,
            tags={**tags, MLFLOW_PARENT_RUN_ID: parent_id, ROLE_TAG: "child"},
        )
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]
        self.client.log_batch(run_id, metrics=entries)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_dict(self, run_id: str, payload: dict[str, Any], filename: str) -> None:
        self.client.log_dict(run_id, payload, filename)

    def log_text(self, run_id: str, text: str, filename: str) -> None:
        self.client.log_text(run_id, text, filename)

    def log_artifact(self, run_id: str, path: str | Path) -> None:
        self.client.log_artifact(run_id, str(path))

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def running_children(self, parent_id: str, tag: str, values: Collection[str]) -> list[str]:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        experiment_id = self.client.get_run(parent_id).info.experiment_id
        found = self.client.search_runs(
            [experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}' and attributes.status = 'RUNNING'"
        )
        return [run.info.run_id for run in found if run.data.tags.get(tag) in values]


@dataclass
class RecordedRun:
    experiment: str
    name: str
    parent_id: str | None
    tags: dict[str, str]
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # name → [(step, value)]
    artifacts: dict[str, Any] = field(default_factory=dict)  # filename → dict, text or file bytes
    status: str = "RUNNING"

    def latest(self, metric: str) -> float:
        return self.metrics[metric][-1][1]


class MemoryTracker(Tracker):
    """Keeps runs in a dict: for tests, and for callers that want no tracking store."""

    def __init__(self) -> None:
        self.runs: dict[str, RecordedRun] = {}
        self._ids = itertools.count()

    def check(self) -> None:
        pass

    def parent_run(self, experiment: str, key: str, name: str, tags: dict[str, str]) -> str:
        for run_id, run in self.runs.items():
            if run.experiment == experiment and run.tags.get(PARENT_KEY_TAG) == key:
                return run_id
        return self._new(RecordedRun(experiment, name, None, {**tags, PARENT_KEY_TAG: key, ROLE_TAG: "parent"}))

    def start_run(self, experiment: str, name: str, parent_id: str, tags: dict[str, str]) -> str:
        return self._new(RecordedRun(experiment, name, parent_id, {**tags, ROLE_TAG: "child"}))

    def _new(self, run: RecordedRun) -> str:
        run_id = f"run{next(self._ids)}"
        self.runs[run_id] = run
        return run_id

    def children(self, parent_id: str) -> list[RecordedRun]:
        return [run for run in self.runs.values() if run.parent_id == parent_id]

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        self.runs[run_id].params.update(params)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.runs[run_id].metrics.setdefault(key, []).append((step or 0, float(value)))

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.runs[run_id].tags.update(tags)

    def log_dict(self, run_id: str, payload: dict[str, Any], filename: str) -> None:
        self.runs[run_id].artifacts[filename] = json.loads(json.dumps(payload, default=str))

    def log_text(self, run_id: str, text: str, filename: str) -> None:
        self.runs[run_id].artifacts[filename] = text

    def log_artifact(self, run_id: str, path: str | Path) -> None:
        self.runs[run_id].artifacts[Path(path).name] = Path(path).read_bytes()

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.runs[run_id].status = status

    def running_children(self, parent_id: str, tag: str, values: Collection[str]) -> list[str]:
        return [
            run_id
            for run_id, run in self.runs.items()
            if run.parent_id == parent_id and run.status == "RUNNING" and run.tags.get(tag) in values
        ]


def existing_store(uri: str) -> MlflowTracker:
    """A tracker on a store that exists and answers; a SQLite file that does not exist is an error, not created."""
    tracker = MlflowTracker(uri)
    tracker.check()
    store = sqlite_file(tracker.uri)
    if store is not None and not store.is_file():
        raise TrackingError(f"tracking store {uri}: no such file (nothing was logged there yet); give --tracking-uri")
    return tracker


def tracking_failed(error: BaseException) -> bool:
    """Whether ``error`` is a request to the tracking server that got no answer (the server restarting, the
    network, MLflow's client itself) rather than the server refusing what was logged.

    MLflow raises a plain MlflowException worded "API request to … failed with exception …" for those, after
    its own retries; a refusal is a RestException.
    """
    from mlflow.exceptions import MlflowException, RestException

    return (
        isinstance(error, MlflowException)
        and not isinstance(error, RestException)
        and str(error).startswith("API request to ")
    )


def mlflow_client(uri: str):
    """An MlflowClient on an existing store (``existing_store``)."""
    return existing_store(uri).client


@functools.cache
def git_commit() -> str:
    """The commit of the kdsearch checkout, with ``+dirty`` for uncommitted changes; "unknown" outside git."""
    where = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def run_tags(device) -> dict[str, str]:
    """Tags on every run: where and with what it ran."""
    from importlib.metadata import version

    import torch

    from kdsearch.infra.device import device_name

    commit = git_commit()
    return {
        "git_commit": commit,
        "mlflow.source.git.commit": commit.removesuffix("+dirty"),
        "device": device_name(device),
        "torch_version": torch.__version__,
        "kdsearch_version": version("kdsearch"),
        "optuna_version": version("optuna"),
        "host": socket.gethostname(),
    }
