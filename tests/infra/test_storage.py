"""kdsearch.infra.storage: the default SQLite storage, driver naming, and the checks that write nothing."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

from kdsearch.errors import ConfigError, NotWritable, StudyError
from kdsearch.infra import storage
from kdsearch.infra.storage import check_database, check_writable, database_url, default_storage, proxy_address
from kdsearch.serve.local_server import free_port

ROOT = os.geteuid() == 0
# Writing in /sys fails even for root, where a read-only mode bit does not stop anyone.
SYS = Path("/sys")


def _entries(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# --- default_storage, database_url ---------------------------------------------------------------


def test_default_storage_is_an_absolute_sqlite_file_in_the_workdir(tmp_path, monkeypatch):
    assert default_storage(tmp_path) == f"sqlite:///{tmp_path.resolve()}/studies.db"
    monkeypatch.chdir(tmp_path)
    assert default_storage() == f"sqlite:///{tmp_path.resolve()}/studies.db"
    assert default_storage("sub/../work") == f"sqlite:///{tmp_path.resolve()}/work/studies.db"


@pytest.mark.parametrize("installed", ["psycopg", "psycopg2"])
@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_database_url_names_the_installed_postgresql_driver(monkeypatch, installed, scheme):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        if name == "psycopg":
            return real("json") if installed == "psycopg" else None  # any spec means "installed"
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert (
        database_url(f"{scheme}://kd:pw@db-host:5432/optuna") == f"postgresql+{installed}://kd:pw@db-host:5432/optuna"
    )


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg2://kd@h/db",  # a driver given is kept
        "mysql://u@h/db",
        "sqlite:///studies.db",
        "sqlite://",
        "postgresql",  # not a URL: left to check_database to refuse
    ],
)
def test_database_url_leaves_other_urls_alone(url):
    assert database_url(url) == url


# --- check_database --------------------------------------------------------------------------------


def test_a_new_sqlite_file_in_an_existing_folder_is_fine_and_not_created(tmp_path):
    check_database(f"sqlite:///{tmp_path}/studies.db", writes=True)
    (tmp_path / "there.db").write_bytes(b"")
    check_database(f"sqlite:///{tmp_path}/there.db", must_exist=True)
    assert _entries(tmp_path) == ["there.db"]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "storage 'not a url' is not a database URL (sqlite:///FILE or postgresql://…)"),
        ("sqlite://", "storage sqlite://: an in-memory database cannot be shared or resumed; name a file"),
        ("sqlite:///:memory:", ": an in-memory database cannot be shared or resumed; name a file"),
    ],
)
def test_urls_that_name_no_shareable_database(url, message):
    with pytest.raises(StudyError, match=re.escape(message)):
        check_database(url)


def test_a_sqlite_file_in_a_missing_folder_or_missing_when_it_must_exist(tmp_path):
    url = f"sqlite:///{tmp_path}/no/such/studies.db"
    with pytest.raises(StudyError, match=re.escape(f"storage {url}: directory {tmp_path}/no/such does not exist")):
        check_database(url)
    url = f"sqlite:///{tmp_path}/studies.db"
    with pytest.raises(StudyError, match=re.escape(f"storage {url}: no such file (no study has been created there)")):
        check_database(url, must_exist=True)
    assert _entries(tmp_path) == []


def test_the_caller_names_the_error_type_and_what_the_url_is_for(tmp_path):
    url = f"sqlite:///{tmp_path}/none/mlflow.db"
    with pytest.raises(ConfigError, match=re.escape(f"tracking store {url}: directory")):
        check_database(url, what="tracking store", error=ConfigError)


@pytest.mark.skipif(not SYS.is_dir(), reason="no /sys")
def test_a_sqlite_file_in_a_folder_nobody_can_write(tmp_path):
    url = "sqlite:////sys/studies.db"
    with pytest.raises(StudyError, match=re.escape(f"storage {url}: folder /sys is not writable (")):
        check_database(url)
    check_database(url, writes=False)  # a reader need not write there (the file itself is not required)


@pytest.mark.skipif(ROOT, reason="root writes read-only files")
def test_a_read_only_sqlite_file(tmp_path):
    path = tmp_path / "studies.db"
    path.write_bytes(b"")
    path.chmod(0o444)
    with pytest.raises(StudyError, match=re.escape(f"storage sqlite:///{path}: file {path} is read-only")):
        check_database(f"sqlite:///{path}")


def test_an_unreachable_server_is_named_without_its_password():
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is None:
        pytest.skip("no PostgreSQL driver")
    # Nothing listens on port 1: the connection is refused at once.
    with pytest.raises(StudyError) as raised:
        check_database("postgresql://kd:secret@127.0.0.1:1/optuna")
    message = str(raised.value)
    assert re.match(r"cannot reach storage postgresql\+psycopg2?://kd:\*\*\*@127\.0\.0\.1:1/optuna: \S", message)
    assert "secret" not in message and "\n" not in message


# --- check_writable ------------------------------------------------------------------------------


def test_a_folder_that_exists_or_can_be_created_is_writable_and_nothing_is_made(tmp_path, monkeypatch):
    check_writable(tmp_path, "cache_dir")
    check_writable(tmp_path / "a" / "b" / "c", "cache_dir")
    monkeypatch.setenv("HOME", str(tmp_path))
    check_writable("~/later", "cache_dir")
    assert _entries(tmp_path) == []


def test_a_file_where_a_folder_should_be(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("")
    with pytest.raises(NotWritable, match=re.escape(f"--run-dir {tmp_path}/f is a file, not a folder")):
        check_writable(tmp_path / "f", "--run-dir")
    monkeypatch.chdir(tmp_path)  # a relative path is shown absolute
    with pytest.raises(
        NotWritable,
        match=re.escape(f"cache_dir {tmp_path}/f/x/y cannot be created: {tmp_path}/f is a file, not a folder"),
    ):
        check_writable("f/x/y", "cache_dir")


@pytest.mark.skipif(not SYS.is_dir(), reason="no /sys")
def test_a_folder_nobody_can_write_in():
    with pytest.raises(NotWritable, match=re.escape("out /sys is not writable (")):
        check_writable("/sys", "out")
    with pytest.raises(NotWritable, match=re.escape("out /sys/kdsearch/x cannot be created: /sys is not writable (")):
        check_writable("/sys/kdsearch/x", "out")


# --- the gRPC storage proxy: grpc://HOST:PORT ------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("grpc://db-host:13000", ("db-host", 13000)),
        ("GRPC://127.0.0.1:1/", ("127.0.0.1", 1)),
        ("postgresql://kd@db/optuna", None),
        ("sqlite:///studies.db", None),
    ],
)
def test_a_proxy_url_gives_its_host_and_port_and_is_no_database_url(url, address):
    assert proxy_address(url) == address
    if address is not None:
        assert database_url(url) == url  # no driver to name: the proxy is not a database


@pytest.mark.parametrize(
    "url",
    [
        "grpc://db-host",
        "grpc://db-host:port",
        "grpc://db-host:70000",
        "grpc://:13000",
        "grpc://db-host:13000/optuna",
        "grpc://kd:pw@db-host:13000",
        "grpc://db-host:13000?timeout=5",
    ],
)
def test_a_proxy_url_that_is_not_host_and_port(url):
    with pytest.raises(ConfigError, match=re.escape(f"storage {url!r}: a storage proxy's URL is grpc://HOST:PORT")):
        check_database(url)


def test_a_proxy_that_does_not_answer_is_one_line(monkeypatch):
    monkeypatch.setattr(storage, "PROXY_TIMEOUT_S", 0.5)
    port = free_port()
    message = f"cannot reach storage grpc://127.0.0.1:{port}: no storage proxy answers there within 0.5 s"
    with pytest.raises(StudyError, match=re.escape(message)):
        check_database(f"grpc://127.0.0.1:{port}")


def test_a_proxy_url_without_grpcio_says_what_to_install(monkeypatch):
    import optuna

    def missing(**address):
        raise ModuleNotFoundError("No module named 'grpc'", name="grpc")

    monkeypatch.setattr(optuna.storages, "GrpcStorageProxy", missing)
    message = "storage grpc://db-host:13000 needs grpc, which is not installed (pip install 'kdsearch[grpc]')"
    with pytest.raises(StudyError, match=re.escape(message)):
        check_database("grpc://db-host:13000")
