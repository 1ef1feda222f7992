"""Optuna's storage of the studies, opened with heartbeats so that a trial whose worker died is run again."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import optuna

from kdsearch.errors import ConfigError
from kdsearch.infra.storage import database_url


@dataclass(frozen=True)
class HeartbeatConfig:
    interval: int = 30  # seconds between heartbeats of a running trial
    grace: int = 120  # a trial silent for this long is taken as dead: failed, and queued again
    max_retry: int = 3  # times one trial is queued again after its worker died

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ConfigError(f"heartbeat interval must be >= 1 second but got {self.interval}")
        if self.grace <= self.interval:
            raise ConfigError(f"heartbeat grace ({self.grace}s) must exceed the interval ({self.interval}s)")
        if self.max_retry < 0:
            raise ConfigError(f"max_retry must be >= 0 but got {self.max_retry}")


def open_storage(url: str, heartbeat: HeartbeatConfig) -> optuna.storages.RDBStorage:
    url = database_url(url)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat.interval,
            grace_period=heartbeat.grace,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=heartbeat.max_retry
            ),
        )
