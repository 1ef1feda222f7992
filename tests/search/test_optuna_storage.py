"""kdsearch.search.optuna_storage: heartbeat settings, and Optuna's storage opened with them: a database, or
Optuna's gRPC storage proxy (``kdsearch storage-proxy``) with kdsearch's heartbeats."""

from __future__ import annotations

import re
import warnings

import optuna
import pytest
from optuna.trial import TrialState

from kdsearch.errors import ConfigError
from kdsearch.search import optuna_storage
from kdsearch.search.optuna_storage import HeartbeatConfig, ProxyStorage, open_storage
from tests.fakes import storage_proxy


def test_heartbeat_defaults():
    assert HeartbeatConfig() == HeartbeatConfig(interval=30, grace=120, max_retry=3)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"interval": 0}, "heartbeat interval must be >= 1 second but got 0"),
        ({"interval": 10, "grace": 10}, "heartbeat grace (10s) must exceed the interval (10s)"),
        ({"interval": 30, "grace": 5}, "heartbeat grace (5s) must exceed the interval (30s)"),
        ({"max_retry": -1}, "max_retry must be >= 0 but got -1"),
    ],
)
def test_bad_heartbeat_settings(values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        HeartbeatConfig(**values)


def test_the_smallest_heartbeat_settings_are_accepted():
    assert HeartbeatConfig(interval=1, grace=2, max_retry=0).grace == 2


def test_open_storage_on_sqlite_has_the_heartbeat_and_a_long_lock_timeout(tmp_path):
    path = tmp_path / "studies.db"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        storage = open_storage(f"sqlite:///{path}", HeartbeatConfig(interval=5, grace=20, max_retry=2))
    assert not [w for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
    assert isinstance(storage, optuna.storages.RDBStorage) and path.is_file()
    assert (storage.heartbeat_interval, storage.grace_period) == (5, 20)
    callback = storage.failed_trial_callback
    assert isinstance(callback, optuna.storages.RetryHeartbeatStaleTrialCallback) and callback._max_retry == 2
    assert storage.engine_kwargs == {"connect_args": {"timeout": 60}}  # workers wait for SQLite's lock
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1) * 0 + 3.0, n_trials=1)
    again = optuna.load_study(study_name="s", storage=open_storage(f"sqlite:///{path}", HeartbeatConfig()))
    assert [trial.value for trial in again.trials] == [3.0]


def test_open_storage_pings_server_connections(monkeypatch):
    seen = {}

    class Storage:
        def __init__(self, url, **kwargs):
            seen.update(kwargs, url=url)

    monkeypatch.setattr(optuna.storages, "RDBStorage", Storage)
    open_storage("postgres://kd@db/optuna", HeartbeatConfig(interval=2, grace=9, max_retry=0))
    assert seen["url"].startswith("postgresql+psycopg") and seen["url"].endswith("://kd@db/optuna")
    assert seen["engine_kwargs"] == {"pool_pre_ping": True}
    assert (seen["heartbeat_interval"], seen["grace_period"]) == (2, 9)


# --- through Optuna's gRPC storage proxy ----------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    with storage_proxy(f"sqlite:///{tmp_path_factory.mktemp('proxied') / 'studies.db'}") as address:
        yield address


class Clock:
    """time.time for ProxyStorage's heartbeats, moved by hand."""

    def __init__(self):
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now


def _queued(storage, name: str, points: int) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    for x in range(points):
        study.enqueue_trial({"x": float(x)})
    return study


def _claim(storage, study: optuna.Study) -> int:
    [waiting, *_] = study.get_trials(states=(TrialState.WAITING,))
    assert storage.set_trial_state_values(waiting._trial_id, state=TrialState.RUNNING)
    storage.record_heartbeat(waiting._trial_id)
    return waiting._trial_id


def test_a_proxy_url_opens_optunas_proxy_client_with_kdsearchs_heartbeats(proxy):
    storage = open_storage(proxy, HeartbeatConfig(interval=2, grace=9, max_retry=1))
    assert isinstance(storage, ProxyStorage) and isinstance(storage, optuna.storages.GrpcStorageProxy)
    assert optuna.storages._heartbeat.is_heartbeat_enabled(storage) and storage.get_heartbeat_interval() == 2
    assert storage.get_heartbeat_stale_trial_callback()._max_retry == 1
    assert not optuna.storages._heartbeat.is_heartbeat_enabled(open_storage(proxy))  # for reading: none


def test_a_trial_silent_past_the_grace_period_is_failed_and_queued_again_through_the_proxy(proxy, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(optuna_storage, "time", clock)
    storage = open_storage(proxy, HeartbeatConfig(interval=1, grace=5, max_retry=3))
    study = _queued(storage, "silent", 2)
    dead, alive = _claim(storage, study), _claim(storage, study)
    clock.now += 4
    storage.record_heartbeat(alive)
    optuna.storages.fail_stale_trials(study)
    assert [t.state for t in study.trials] == [TrialState.RUNNING, TrialState.RUNNING]  # within the grace period
    clock.now += 2  # dead's last heartbeat is 6 s old, alive's 2 s
    optuna.storages.fail_stale_trials(study)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    retry = study.trials[2]
    assert retry.params == study.trials[0].params and retry.system_attrs["failed_trial"] == 0
    assert storage.get_trial(dead).state == TrialState.FAIL

    # The retry carries a copy of the dead trial's heartbeat; taken, it is not stale for that old beat.
    assert storage.set_trial_state_values(retry._trial_id, state=TrialState.RUNNING)
    clock.now += 60
    assert storage._get_stale_trial_ids(study._study_id) == [alive]


def test_a_heartbeat_of_a_finished_trial_is_ignored(proxy):
    storage = open_storage(proxy, HeartbeatConfig(interval=1, grace=5))
    study = _queued(storage, "finished", 1)
    trial_id = _claim(storage, study)
    storage.set_trial_state_values(trial_id, state=TrialState.COMPLETE, values=[1.0])
    storage.record_heartbeat(trial_id)  # a heartbeat thread's last beat, after its trial ended
    assert storage.get_trial(trial_id).state == TrialState.COMPLETE


def test_two_workers_cannot_take_the_same_queued_trial_through_the_proxy(proxy):
    first, second = open_storage(proxy), open_storage(proxy)
    study = _queued(first, "race", 1)
    [trial] = study.get_trials(states=(TrialState.WAITING,))
    assert first.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING)
    assert not second.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING)


@pytest.mark.parametrize(
    ("code", "raised"), [("UNKNOWN", optuna.exceptions.StorageInternalError), ("UNAVAILABLE", None)]
)
def test_a_heartbeat_the_database_refuses_is_reported_as_rdbstorage_reports_it(proxy, monkeypatch, code, raised):
    import grpc

    class Refused(grpc.RpcError):
        def code(self):
            return getattr(grpc.StatusCode, code)

        def details(self):
            return "duplicate key value violates unique constraint"

    storage = open_storage(proxy, HeartbeatConfig(interval=1, grace=5))

    def refuse(*args):
        raise Refused()

    monkeypatch.setattr(storage, "set_trial_system_attr", refuse)
    with pytest.raises(raised or Refused):  # the proxy being down is not a claim to move on from
        storage.record_heartbeat(1)
