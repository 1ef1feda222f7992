"""The MLflow UI for the project's tracking store, on 127.0.0.1 and a free port.

    kdsearch ui                                   # ./mlruns/mlflow.db, as the study commands write it
    kdsearch ui --tracking-uri sqlite:///elsewhere/mlflow.db --experiment smoke

A database store (SQLite, PostgreSQL) gets its own ``mlflow ui`` process, one worker (a laptop or a
2-core machine), bound to the loopback interface only. A store that is already a server (``http://…``)
is that server's UI: nothing is started.

MLflow 3 opens an experiment on its GenAI overview; kdsearch's links ask for the model-training view
(``workflowType=machine_learning``), where the runs table is.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from kdsearch.errors import ConfigError
from kdsearch.infra.urls import sqlite_file
from kdsearch.serve.local_server import HOST, LocalServer, check_port_free, start_server
from kdsearch.track.tracking import TrackingError

# MLflow 3 also starts a job runner (for GenAI scorers) beside the server by default: browsing runs
# needs none, and on a small machine it costs a process and seconds of start-up.
SERVER_SETTINGS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@dataclass
class UIServer(LocalServer):
    tracking_uri: str = ""

    def experiment_url(self, experiment_id: str) -> str:
        return f"{self.url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def _command(backend_uri: str, port: int) -> list[str]:
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", backend_uri]
    command += ["--host", HOST, "--port", str(port), "--workers", "1"]
    store = sqlite_file(backend_uri)
    if store is not None:
        # Where kdsearch's MlflowTracker keeps a local store's artefacts: new experiments land there too.
        command += ["--default-artifact-root", str(store.parent / "artifacts")]
    return command


def start_ui(tracking_uri: str, port: int | None = None, timeout: float = 90.0, attempts: int = 3) -> UIServer:
    """Start the MLflow UI on 127.0.0.1 for ``tracking_uri`` and wait until it answers.

    ``port`` None picks a free one (and another when it was taken meanwhile). Raises TrackingError
    when the store cannot be reached, or the server does not come up within ``timeout`` seconds;
    ConfigError when ``port`` is in use.
    """
    from kdsearch.track.tracking import existing_store

    tracker = existing_store(tracking_uri)
    if tracker.uri.startswith(("http://", "https://")):
        return UIServer(tracker.uri.rstrip("/"), None, tracking_uri=tracker.uri)
    if port is not None:
        check_port_free(port, ConfigError)
    return start_server(
        "the MLflow UI",
        lambda chosen: _command(tracker.uri, chosen),
        "/health",
        lambda url, process, log_path: UIServer(url, process, log_path, tracking_uri=tracker.uri),
        TrackingError,
        port,
        SERVER_SETTINGS,
        timeout,
        attempts,
    )


def experiment_id(tracking_uri: str, name: str) -> str:
    """The id of the experiment called ``name``; TrackingError naming the experiments there otherwise."""
    from kdsearch.track.tracking import mlflow_client

    client = mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is None:
        names = [experiment.name for experiment in client.search_experiments()]
        raise TrackingError(f"no experiment {name!r} in {tracking_uri}; experiments there: {names}")
    return found.experiment_id
