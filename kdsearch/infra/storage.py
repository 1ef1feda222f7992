"""Where kdsearch writes: database URLs (a SQLite file by default, PostgreSQL to share, or Optuna's gRPC
storage proxy in front of one) and folders, checked before anything is written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from kdsearch.errors import ConfigError, KdsearchError, NotWritable, StudyError
from kdsearch.infra.urls import sqlite_url

# Study and experiment names become folder names (a file name has at most 255 bytes), and a study's
# default name adds up to 18 characters to the study file's name ("-ablation-1a2b3c4d").
NAME_BYTES = 200


def check_name_length(name: str, what: str) -> None:
    """Raise ConfigError when ``name`` is too long to name a folder; ``what`` is how the user gave it."""
    size = len(name.encode())
    if size > NAME_BYTES:
        raise ConfigError(f"{what} {name[:24]!r}... is {size} bytes long; at most {NAME_BYTES}, as it names a folder")


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


PROXY_SCHEME = "grpc"  # grpc://HOST:PORT: Optuna's gRPC storage proxy (``kdsearch storage-proxy``)
PROXY_TIMEOUT_S = 5.0  # how long a storage proxy may take to answer a check, as a database's connect_timeout


def proxy_address(url: str) -> tuple[str, int] | None:
    """(host, port) of a ``grpc://HOST:PORT`` storage URL; None for a database URL."""
    from urllib.parse import urlsplit

    scheme, separator, _ = url.partition("://")
    if not separator or scheme.lower() != PROXY_SCHEME:
        return None
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port = None
    if not parts.hostname or port is None or parts.path.strip("/") or parts.query or parts.username:
        raise ConfigError(f"storage {url!r}: a storage proxy's URL is grpc://HOST:PORT")
    return parts.hostname, port


# What installs the driver SQLAlchemy asks for, by module name; kdsearch ships an extra for PostgreSQL only.
DRIVER_PACKAGES = {
    "psycopg2": "'kdsearch[postgres]'",
    "psycopg": "'kdsearch[postgres]'",
    "MySQLdb": "mysqlclient, or use mysql+pymysql://… with pip install pymysql",
    "pymysql": "pymysql",
    "mysql": "mysql-connector-python",
    "grpc": "'kdsearch[grpc]'",
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
    creates) also requires that SQLite can write there. Servers: one connection is opened and closed; a
    storage proxy must answer, and so must the database behind it.
    """
    import sqlalchemy

    address = proxy_address(url)
    if address is not None:
        _check_proxy(url, *address, what, error)
        return
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
        check_sqlite_file(path, f"{what} {shown}", error)
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


def _check_proxy(url: str, host: str, port: int, what: str, error: type[KdsearchError]) -> None:
    import warnings

    import optuna

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the proxy is "experimental"
            proxy = optuna.storages.GrpcStorageProxy(host=host, port=port)
        try:
            proxy.wait_server_ready(timeout=PROXY_TIMEOUT_S)
            proxy.get_all_studies()  # a query of the database behind the proxy
        finally:
            proxy.close()
    except ModuleNotFoundError as missing:
        package = DRIVER_PACKAGES.get(missing.name, missing.name)
        raise error(f"{what} {url} needs {missing.name}, which is not installed (pip install {package})") from None
    except ConnectionError:
        raise error(f"cannot reach {what} {url}: no storage proxy answers there within {PROXY_TIMEOUT_S:g} s") from None
    except Exception as failure:  # grpc.RpcError: the proxy answers, the database behind it does not
        details = failure.details() if hasattr(failure, "details") else str(failure)
        reason = (details or type(failure).__name__).strip().splitlines()[0]
        raise error(f"{what} {url}: the storage proxy answers but its database does not: {reason}") from None


def _check_sqlite_writable(path: Path, what: str, error: type[KdsearchError]) -> None:
    """SQLite writes the database file and a journal beside it: both need a writable folder."""
    try:
        check_writable(path.parent, f"{what}: folder")
    except NotWritable as failure:
        raise error(str(failure)) from None
    if path.is_file() and not os.access(path, os.W_OK):
        raise error(f"{what}: file {path} is read-only")


def check_sqlite_file(path: Path, what: str, error: type[KdsearchError]) -> None:
    """Raise ``error`` when ``path`` exists but is not a sound SQLite database (another file, a truncated
    or corrupt one): the stores would fail on it with a traceback, some after writing elsewhere.

    ``quick_check`` reads every page, so a database cut short is found too; an empty file is an empty
    database, as SQLite takes it.
    """
    import sqlite3

    if not path.is_file():
        return
    try:
        # mode=rw: never creates the file; a hot journal left by a killed writer is rolled back, as the store would.
        with contextlib.closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=rw", uri=True)) as connection:
            problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as failure:
        raise error(f"{what}: {failure} (not a sound SQLite database file)") from None
    if problems != ["ok"]:
        raise error(f"{what}: {problems[0]} (not a sound SQLite database file)")


def check_writable(path: str | Path, what: str) -> None:
    """Raise NotWritable unless ``path`` is a folder kdsearch can write in, or can be created as one.

    Tries a nameless temporary file in the nearest existing folder rather than ``os.access``, which
    answers yes for root on a read-only mount and in folders root may not write (e.g. /sys).
    """
    path = Path(path).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise NotWritable(f"{what} {path} {where}, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        if existing == path:
            raise NotWritable(f"{what} {path} is not writable ({error.strerror})") from None
        raise NotWritable(f"{what} {path} cannot be created: {existing} is not writable ({error.strerror})") from None
