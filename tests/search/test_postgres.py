"""Workers in separate processes sharing one grid study on PostgreSQL (.ci/run starts one on 127.0.0.1)."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import time
import uuid

import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from kdsearch.infra.storage import database_url
from kdsearch.search.optuna_storage import HeartbeatConfig
from kdsearch.search.study import open_study
from kdsearch.search.studyfile import load_study
from kdsearch.search.trial import prepare
from kdsearch.search.tune import GRID
from tests.fakes import CLI, SMOKE

pytestmark = pytest.mark.postgres

URL = os.environ.get("KDSEARCH_TEST_POSTGRES_URL")
if not URL:
    pytest.skip(
        "KDSEARCH_TEST_POSTGRES_URL is not set (.ci/run starts PostgreSQL on 127.0.0.1 and sets it)",
        allow_module_level=True,
    )

HEARTBEAT = HeartbeatConfig(interval=1, grace=5)


def _worker(name: str, tracking_uri: str, cwd) -> subprocess.Popen:
    args = ["study", "worker", "--study-name", name, "--storage", URL, "--tracking-uri", tracking_uri]
    args += ["--heartbeat-interval", str(HEARTBEAT.interval), "--grace-period", str(HEARTBEAT.grace), "--no-progress"]
    return subprocess.Popen([*CLI, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


@functools.cache
def _storage() -> optuna.storages.RDBStorage:
    # One connection pool for every read here: a storage per poll (20 a second while waiting for the victim)
    # left a pool per poll open and ran a CI PostgreSQL out of connection slots.
    return optuna.storages.RDBStorage(database_url(URL))


def _study(name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=_storage())


def _completed_points(study: optuna.Study) -> list[str]:
    return sorted(json.dumps(t.params, sort_keys=True) for t in study.get_trials(states=(TrialState.COMPLETE,)))


def test_two_workers_evaluate_every_grid_point_exactly_once(tmp_path, mlflow_uri, shared_cache):
    spec = load_study(SMOKE, {"grid.t": [1.0, 2.0, 4.0], "train.epochs": 2, "latency.repeats": 1})
    name = f"pg-two-workers-{uuid.uuid4().hex[:8]}"
    handle = open_study(GRID, spec, URL, HEARTBEAT, study_name=name)
    prepare(
        spec, GRID.trial_configs(spec, handle.space), progress=False
    )  # teacher and IG cache, so both workers start at once
    workers = [_worker(name, mlflow_uri, tmp_path) for _ in range(2)]
    for worker in workers:
        _finish(worker)

    study = _study(name)
    points = _completed_points(study)
    assert len(points) == 6 and len(set(points)) == 6  # the whole 3 x 2 x 1 grid, each point once
    assert len(study.trials) == 6 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert {t.user_attrs["worker"].split(":")[-1] for t in study.trials} == {str(w.pid) for w in workers}

    # The report needs only the two stores: run it from another directory, as on another machine.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = ["report", "--study", name, "--storage", URL, "--tracking-uri", mlflow_uri, "--out", "report"]
    report = subprocess.run([*CLI, *args], cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stderr
    table = pd.read_csv(elsewhere / "report" / "tables" / "trials.csv")
    assert sorted(table["trial"]) == sorted(t.number for t in study.trials)
    for trial in study.trials:
        [row] = table[table["trial"] == trial.number].to_dict("records")
        assert row["val acc (%)"] == pytest.approx(trial.value) and row["T"] == trial.params["t"]
        assert row["test acc (%)"] == pytest.approx(trial.user_attrs["test_acc"])


def test_a_worker_killed_mid_trial_leaves_every_point_completed(tmp_path, mlflow_uri, shared_cache):
    spec = load_study(SMOKE, {"train.epochs": 4, "latency.repeats": 1})
    name = f"pg-sigkill-{uuid.uuid4().hex[:8]}"
    open_study(GRID, spec, URL, HEARTBEAT, study_name=name)
    victim = _worker(name, mlflow_uri, tmp_path)
    deadline = time.monotonic() + 180
    killed = None
    while killed is None and time.monotonic() < deadline:
        for trial in _study(name).get_trials(states=(TrialState.RUNNING,)):
            if trial.user_attrs.get("worker", "").endswith(f":{victim.pid}"):  # training has started
                os.kill(victim.pid, signal.SIGKILL)
                killed = trial.number
                break
        time.sleep(0.05)
    victim.communicate(timeout=30)
    assert killed is not None and victim.returncode == -signal.SIGKILL
    assert _study(name).trials[killed].state == TrialState.RUNNING  # the dead worker left it running

    output = _finish(_worker(name, mlflow_uri, tmp_path))

    study = _study(name)
    points = _completed_points(study)
    assert len(points) == 4 and len(set(points)) == 4, output
    assert study.trials[killed].state == TrialState.FAIL
    retries = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if "failed_trial" in t.system_attrs]
    assert [t.system_attrs["failed_trial"] for t in retries] == [killed]
    assert retries[0].params == study.trials[killed].params
    dead_run = MlflowClient(mlflow_uri).get_run(study.trials[killed].user_attrs["run_id"])
    assert dead_run.info.status == "FAILED"  # closed by the worker that ran the retry
