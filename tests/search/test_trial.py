"""kdsearch.search.trial: what the trials of a study share (Prepared) and what one trial logs, without
training (the trials themselves run in test_study)."""

from __future__ import annotations

import pytest
import torch

import kdsearch.search.trial as trial_module
from kdsearch.config import LatencyConfig, ModelConfig, flatten, replace
from kdsearch.data.datasets import load_splits
from kdsearch.distill.train import TrainInputs
from kdsearch.models.classifiers import build_model
from kdsearch.runtime.timing import CALIBRATION_IMAGES
from kdsearch.search.trial import Prepared, TrialRunner
from kdsearch.track.tracking import MemoryTracker
from tests.fakes import SYNTHETIC, TINY, TINY_STUDENT

QUICK = LatencyConfig(warmup=0, repeats=1, batch_sizes=(1,), onnx_runtimes=())
TEACHER_PARAMS = 12_226.0  # tiny_cnn: 11736 conv weights, 160 BatchNorm, 330 head
STUDENT_PARAMS = 5_170.0  # one block fewer: 4824 conv weights, 96 BatchNorm, 250 head


@pytest.fixture
def prepared(tmp_path) -> Prepared:
    splits = load_splits(SYNTHETIC, tmp_path)
    metrics = {"teacher_params": TEACHER_PARAMS, "teacher_test_acc": 80.0}
    return Prepared(TrainInputs(splits), torch.device("cpu"), metrics, QUICK, str(tmp_path / "cache"))


def test_student_costs_are_measured_once_per_architecture(prepared, monkeypatch):
    measured = []
    real = trial_module.model_costs

    def model_costs(model, architecture, role, calibration, *args):
        measured.append((architecture, role, calibration))
        return real(model, architecture, role, calibration, *args)

    monkeypatch.setattr(trial_module, "model_costs", model_costs)
    first = prepared.student_metrics(build_model(TINY_STUDENT), TINY_STUDENT)
    retrained = prepared.student_metrics(build_model(TINY_STUDENT), replace(TINY_STUDENT))  # equal, not the same
    teacher_sized = prepared.student_metrics(build_model(TINY), TINY)
    assert [architecture for architecture, _, _ in measured] == [TINY_STUDENT, TINY]
    assert all(role == "student" for _, role, _ in measured)
    assert torch.equal(measured[0][2], prepared.splits.train_images[:CALIBRATION_IMAGES])
    assert first == retrained and first["student_params"] == STUDENT_PARAMS
    assert first["compression_factor"] == TEACHER_PARAMS / STUDENT_PARAMS
    assert teacher_sized["student_params"] == TEACHER_PARAMS and teacher_sized["compression_factor"] == 1.0
    assert "compression_factor" not in prepared._student_costs[next(iter(prepared._student_costs))]


def test_compression_follows_the_teacher_of_the_process(prepared, monkeypatch):
    monkeypatch.setattr(trial_module, "model_costs", lambda *args: {"student_params": 1000.0, "student_flops": 5.0})
    assert prepared.student_metrics(build_model(TINY_STUDENT), TINY_STUDENT) == {
        "student_params": 1000.0,
        "student_flops": 5.0,
        "compression_factor": TEACHER_PARAMS / 1000.0,
    }
    prepared.teacher_metrics["teacher_params"] = 4000.0
    assert prepared.student_metrics(build_model(TINY_STUDENT), TINY_STUDENT)["compression_factor"] == 4.0


def test_a_pruned_student_is_its_own_architecture(prepared, monkeypatch):
    calls = []
    monkeypatch.setattr(
        trial_module, "model_costs", lambda model, arch, *args: calls.append(arch) or {"student_params": 1.0}
    )
    pruned = ModelConfig(arch="tiny_cnn", drop_blocks=1, channels=(4, 8, 12))
    for architecture in (TINY_STUDENT, pruned, pruned, TINY_STUDENT):
        prepared.student_metrics(None, architecture)
    assert calls == [TINY_STUDENT, pruned]


def test_a_trials_params_are_its_config_and_its_data(prepared, student_config):
    runner = TrialRunner(prepared, MemoryTracker(), "experiment", "parent")
    prepared.inputs.teacher_hash = "t-hash"
    prepared.inputs.map_keys = {"integrated_gradients": "ig-key", "saliency": "saliency-key"}
    params = runner.params(student_config)
    assert params == {
        **flatten(student_config),
        "data.name": "synthetic",
        "data.train_images": 300,
        "data.val_images": 100,
        "data.test_images": 100,
        "teacher_hash": "t-hash",
        "ig_cache_key": "ig-key",
    }
    assert (
        runner.params(replace(student_config, overlay=replace(student_config.overlay, p=0.0)))["ig_cache_key"] == "none"
    )
    saliency = runner.params(replace(student_config, overlay=replace(student_config.overlay, method="saliency")))
    assert saliency["ig_cache_key"] == "none" and saliency["attribution_cache_key"] == "saliency-key"
