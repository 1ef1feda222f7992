"""Optuna's storage of the studies, opened with heartbeats so that a trial whose worker died is run again:
a database (SQLite, PostgreSQL) directly, or through Optuna's gRPC storage proxy (``grpc://HOST:PORT``),
which ``serve_storage`` runs in front of a database when many workers would overload it."""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import optuna
from optuna.storages._heartbeat import BaseHeartbeat  # the extension point RDBStorage implements; not re-exported
from optuna.trial import FrozenTrial, TrialState

from kdsearch.errors import ConfigError
from kdsearch.infra.storage import check_database, database_url, proxy_address


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

    def retry(self) -> optuna.storages.RetryHeartbeatStaleTrialCallback:
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=self.max_retry)


def open_storage(url: str, heartbeat: HeartbeatConfig | None = None) -> optuna.storages.BaseStorage:
    """The storage at ``url``; with ``heartbeat``, running trials send heartbeats and stale ones are retried.

    Without ``heartbeat`` it is for reading and for taking queued trials (``study status``, ``defer``).
    """
    with warnings.catch_warnings():
        # Heartbeats and the gRPC proxy are "experimental" in Optuna.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        address = proxy_address(url)
        if address is not None:
            return ProxyStorage(*address, heartbeat=heartbeat)
        url = database_url(url)
        if heartbeat is None:
            return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=_engine_kwargs(url),
            heartbeat_interval=heartbeat.interval,
            grace_period=heartbeat.grace,
            heartbeat_stale_trial_callback=heartbeat.retry(),
        )


def storage_failed(error: BaseException) -> bool:
    """Whether ``error`` is the study storage failing (a database restarting, a proxy out of reach) rather
    than anything the trial did."""
    import sqlalchemy

    if isinstance(error, optuna.exceptions.StorageInternalError | sqlalchemy.exc.OperationalError):
        return True
    grpc = sys.modules.get("grpc")  # imported by the proxy's client only
    return grpc is not None and isinstance(error, grpc.RpcError)


def _engine_kwargs(url: str) -> dict:
    """SQLite: wait for the other workers' write locks rather than fail; servers: a connection is checked
    before use, so one that died with a database restart is replaced instead of failing the call."""
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}


HEARTBEAT_ATTR = "kdsearch:heartbeat"  # a trial system attribute: {"trial_id": …, "at": unix seconds}


class ProxyStorage(optuna.storages.GrpcStorageProxy, BaseHeartbeat):
    """Optuna's gRPC proxy client, with heartbeats.

    The proxy's protocol has no heartbeat calls (Optuna's client is not a ``BaseHeartbeat``, so through it
    ``fail_stale_trials`` does nothing and a dead worker's trial would stay RUNNING forever). Here a
    heartbeat is a trial system attribute written through the proxy, and a RUNNING trial whose last one is
    older than the grace period is stale, as RDBStorage decides from its heartbeat table. The times are the
    workers' clocks (RDBStorage uses the database's): clocks apart by more than the grace period would fail
    live trials, so keep the machines on NTP.
    """

    def __init__(self, host: str, port: int, heartbeat: HeartbeatConfig | None = None) -> None:
        super().__init__(host=host, port=port)
        self.heartbeat = heartbeat
        self.retry = heartbeat.retry() if heartbeat is not None else None

    def record_heartbeat(self, trial_id: int) -> None:
        import grpc

        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, {"trial_id": trial_id, "at": time.time()})
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # the trial has ended (another worker may have failed it): nothing left to keep alive
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNKNOWN:  # e.g. UNAVAILABLE: the proxy is down
                raise
            # The database behind the proxy refused the write (two workers adding a queued trial's first
            # heartbeat at once): reported as RDBStorage reports it, so a claim moves on to the next trial.
            raise optuna.exceptions.StorageInternalError(error.details()) from None

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(HEARTBEAT_ATTR)
            # A retry carries a copy of its failed trial's system attributes: that trial's heartbeat is not its own.
            if beat is not None and beat["trial_id"] == trial._trial_id and now - beat["at"] > self.heartbeat.grace:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat.interval if self.heartbeat is not None else None

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.retry


def serve_storage(
    url: str, host: str, port: int, threads: int = 10, on_ready: Callable[[str], None] | None = None
) -> None:
    """Serve the database at ``url`` through Optuna's gRPC storage proxy on ``host:port`` (0: a free port)
    until interrupted; ``on_ready`` is told the proxy's address (``grpc://HOST:PORT``) once everything is checked.

    Workers then open that address instead of the database: one process holds the database connections
    and a cache of finished trials, so many workers cost the database one client.
    """
    from kdsearch.serve.local_server import check_port_free, free_port

    if proxy_address(url) is not None:
        raise ConfigError(f"--storage {url}: a storage proxy serves a database, not another proxy")
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1 but got {threads}")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535] but got {port}")
    check_database(url)
    check_port_free(port, ConfigError, host)
    port = port or free_port(host)  # the gRPC server would pick one too, but would not say which
    url = database_url(url)
    pool = {} if url.startswith("sqlite") else {"pool_size": threads}  # a connection for every serving thread
    database = optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url) | pool)
    if on_ready is not None:
        on_ready(f"grpc://{host}:{port}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # get_storage adds Optuna's cache of finished trials, as the proxy's documentation asks.
        optuna.storages.run_grpc_proxy_server(
            optuna.storages.get_storage(database), host=host, port=port, thread_pool=ThreadPoolExecutor(threads)
        )
