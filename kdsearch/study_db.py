"""Where studies live: Optuna RDB storage URLs (a SQLite file by default, PostgreSQL to share), checked
before anything is written, and opened with heartbeats so a trial whose worker died is run again."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna

from kdsearch.errors import ConfigError, KdsearchError, NotWritable, StudyError
from kdsearch.urls import sqlite_url


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


# --- storage ---------------------------------------------------------------------------------


def default_storage(workdir: str | Path = ".") -> str:
    return sqlite_url(Path(workdir) / "studies.db")


def database_url(url: str) -> str:
    """``postgresql://…`` with the PostgreSQL driver that is installed made explicit.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, while kdsearch[postgres] installs
    psycopg2; naming the driver keeps the URL users write (and MLflow's) working with either.
    """
    import importlib.util

    scheme, separator, rest = url.partition("://")
    if separator and scheme in ("postgresql", "postgres"):
        driver = "psycopg" if importlib.util.find_spec("psycopg") is not None else "psycopg2"
        return f"postgresql+{driver}://{rest}"
    return url


# What installs the driver SQLAlchemy asks for, by module name; kdsearch ships an extra for PostgreSQL only.
DRIVER_PACKAGES = {
    "psycopg2": "'kdsearch[postgres]'",
    "psycopg": "'kdsearch[postgres]'",
    "MySQLdb": "mysqlclient, or use mysql+pymysql://… with pip install pymysql",
    "pymysql": "pymysql",
    "mysql": "mysql-connector-python",
}


def check_database(
    url: str,
    what: str = "storage",
    must_exist: bool = False,
    error: type[KdsearchError] = StudyError,
    writes: bool | None = None,
) -> None:
    """Raise ``error`` unless ``url`` names a database that can be reached. Writes nothing.

    SQLite: its directory must exist (and with ``must_exist`` the file too); the file itself is only
    created by the first study. ``writes`` (default: when the file need not exist, i.e. for a caller that
    creates) also requires that SQLite can write there. Servers: one connection is opened and closed.
    """
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(database_url(url))
    except sqlalchemy.exc.ArgumentError:
        raise error(f"{what} {url!r} is not a database URL (sqlite:///FILE or postgresql://…)") from None
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise error(f"{what} {shown}: an in-memory database cannot be shared or resumed; name a file")
        path = Path(parsed.database)
        if not path.parent.is_dir():
            raise error(f"{what} {shown}: directory {path.parent} does not exist")
        if must_exist and not path.is_file():
            raise error(f"{what} {shown}: no such file (no study has been created there)")
        if writes if writes is not None else not must_exist:
            _check_sqlite_writable(path, f"{what} {shown}", error)
        return
    connect_args = {"connect_timeout": 5} if parsed.get_backend_name() == "postgresql" else {}
    try:
        engine = sqlalchemy.create_engine(parsed, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect():
            pass
    except ModuleNotFoundError as missing:
        package = DRIVER_PACKAGES.get(missing.name, missing.name)
        raise error(
            f"{what} {shown} needs the {missing.name} driver, which is not installed (pip install {package})"
        ) from None
    except Exception as failure:  # drivers raise their own errors: any failure means "cannot use it"
        reason = str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
        raise error(f"cannot reach {what} {shown}: {reason}") from None


def _check_sqlite_writable(path: Path, what: str, error: type[KdsearchError]) -> None:
    """SQLite writes the database file and a journal beside it: both need a writable folder."""
    from kdsearch.preflight import check_writable

    try:
        check_writable(path.parent, f"{what}: folder")
    except NotWritable as failure:
        raise error(str(failure)) from None
    if path.is_file() and not os.access(path, os.W_OK):
        raise error(f"{what}: file {path} is read-only")


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
