"""Fixtures for the study, ablation and tracking tests: the smoke study, a shared cache, an MLflow store.

A test module that uses them declares ``pytest_plugins = ["fixtures_study"]``. It also imports the
constants, before pytest loads it as a plugin; having no asserts, it opts out of assertion rewriting
(PYTEST_DONT_REWRITE), which would otherwise warn that it was imported too early to be rewritten.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "studies" / "smoke.yaml"
CPU_QUICK = REPO / "studies" / "cpu-quick.yaml"
PAPER = REPO / "studies" / "paper-cifar10.toml"
# One line of Python that runs the real CLI in a fresh process, as a user's shell would.
CLI = [sys.executable, "-c", "import sys; from kdsearch.cli import main; sys.exit(main(sys.argv[1:]))"]


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, migrated once: creating its tables takes seconds, copying it does not."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_uri(_mlflow_template, tmp_path) -> str:
    """A fresh MLflow store of this test: tmp_path/mlruns/mlflow.db."""
    target = tmp_path / "mlruns" / "mlflow.db"
    target.parent.mkdir()
    shutil.copy(_mlflow_template, target)
    return f"sqlite:///{target}"


@pytest.fixture(scope="module")
def _module_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("study-cache")


@pytest.fixture
def shared_cache(_module_cache, monkeypatch) -> Path:
    """A cache directory shared by the tests of one module, so the smoke teacher and IG maps are made once.

    Safe because the cache is keyed by content: a test cannot see another's artefact under its own key.
    """
    monkeypatch.setenv("KDSEARCH_CACHE_DIR", str(_module_cache))
    return _module_cache


@pytest.fixture
def smoke_overrides() -> dict:
    """Study-file overrides for library-level tests: quick latency measurements."""
    return {"latency.repeats": 1, "latency.warmup": 0, "latency.batch_sizes": [1, 8]}
