"""Shared fakes: a tiny synthetic dataset, a tiny teacher trained for one epoch, an isolated cache."""

from __future__ import annotations

import pytest
import torch

from kdsearch.config import DataConfig, KDConfig, ModelConfig, OverlayConfig, TrainConfig, replace
from kdsearch.models import save_checkpoint
from kdsearch.teacher import TeacherRecipe, recipe_config
from kdsearch.train import train

TINY = ModelConfig(arch="tiny_cnn")
TINY_STUDENT = ModelConfig(arch="tiny_cnn", drop_blocks=1)
SYNTHETIC = DataConfig(dataset="synthetic", synthetic_size=400, val_size=100)


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
    monkeypatch.delenv("KDSEARCH_DATA_DIR", raising=False)
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
