"""kdsearch.search.optuna_storage: heartbeat settings, and Optuna's storage opened with them."""

from __future__ import annotations

import re
import warnings

import optuna
import pytest

from kdsearch.errors import ConfigError
from kdsearch.search.optuna_storage import HeartbeatConfig, open_storage


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
