"""Fixtures of every test: an isolated cache, a tiny teacher trained for one epoch, a student config."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kdsearch.config import KDConfig, OverlayConfig, TrainConfig, replace
from kdsearch.distill.teacher import TeacherRecipe, recipe_config
from kdsearch.distill.train import train
from kdsearch.models.classifiers import save_checkpoint
from tests.fakes import SYNTHETIC, TINY, TINY_STUDENT

# Fixtures that run whole studies (a grid and an ablation through the CLI): every test using them is slow.
END_TO_END_FIXTURES = {"stores", "grid_report", "ablation_report"}


def pytest_collection_modifyitems(items):
    for item in items:
        if END_TO_END_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("postgres") or item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KDSEARCH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    # The machine's CPU-share locks and process registry, per test: a test sees only its own processes.
    monkeypatch.setenv("KDSEARCH_RUNTIME_DIR", str(tmp_path_factory.mktemp("runtime")))
    monkeypatch.delenv("KDSEARCH_DATA_DIR", raising=False)
    # Two threads whatever else runs on the machine: results that tests compare exactly (a resumed run
    # against an uninterrupted one) must not depend on a thread count sized to the moment's load.
    monkeypatch.setenv("KDSEARCH_THREADS", "2")
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_teacher_checkpoint(tmp_path_factory) -> str:
    """A tiny_cnn teacher trained for one epoch on the synthetic data (well above chance)."""
    directory = tmp_path_factory.mktemp("teacher")
    config = replace(
        recipe_config(SYNTHETIC, TINY, TeacherRecipe(epochs=1, batch_size=32, lr=0.05)),
        cache_dir=str(directory / "cache"),
        precision="fp32",
    )
    result = train(config, progress=False)
    path = directory / "teacher.pt"
    save_checkpoint(result.model, TINY, path)
    return str(path)


@pytest.fixture
def student_config(tiny_teacher_checkpoint, tmp_path) -> TrainConfig:
    """A one-epoch KD+IG training of a tiny student, fp32 for reproducibility."""
    return TrainConfig(
        data=SYNTHETIC,
        student=TINY_STUDENT,
        teacher=TINY,
        teacher_checkpoint=tiny_teacher_checkpoint,
        kd=KDConfig(alpha=0.5, temperature=2.0),
        overlay=OverlayConfig(p=0.5),
        epochs=1,
        batch_size=32,
        precision="fp32",
        cache_dir=str(tmp_path / "cache"),
    )


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
