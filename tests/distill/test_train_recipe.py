"""The pieces of a training recipe checked against hand computations: schedule, weight decay, label
smoothing, reflect padding, bf16 autocast, and the tensor cache under two concurrent builders."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kdsearch.distill.train as train_module
from kdsearch.config import OptimConfig, replace
from kdsearch.distill.augment import random_crop_flip
from kdsearch.distill.losses import kd_loss
from kdsearch.distill.train import _optimizer, _schedule, train
from kdsearch.models.classifiers import build_model
from tests.fakes import TINY


def test_warmup_linear_rises_then_falls_to_zero():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    schedule = _schedule(optimizer, OptimConfig(lr=1.0, schedule="warmup_linear", warmup_fraction=0.2), 10)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    # 2 warm-up steps (0.2 x 10) reaching the peak, then (10 - step) / 8 down to the last step's 1/8.
    assert rates == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_weight_decay_spares_batchnorm_and_biases():
    model = build_model(TINY)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    optimizer = _optimizer(model, OptimConfig(optimizer="sgd", lr=0.1, weight_decay=0.1))
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)  # only the decay moves a parameter
    optimizer.step()
    moved = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}
    matrices = {name for name, parameter in model.named_parameters() if parameter.ndim > 1}
    assert moved == matrices and any("weight" in name for name in before.keys() - matrices)


def test_label_smoothing_mixes_the_label_with_the_uniform_distribution():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 1])
    log_probs = logits.log_softmax(dim=1)
    smoothing = 0.1
    by_hand = -((1 - smoothing) * log_probs[[0, 1], labels] + smoothing * log_probs.mean(dim=1)).mean()
    assert kd_loss(logits, None, labels, 0.0, 1.0, label_smoothing=smoothing).item() == pytest.approx(by_hand.item())
    assert kd_loss(logits, None, labels, 0.0, 1.0).item() != pytest.approx(by_hand.item())


def test_reflect_padding_crops_mirror_pixels_not_zeros():
    batch = torch.arange(1.0, 17.0).view(1, 1, 4, 4)
    padded = F.pad(batch, (1,) * 4, mode="reflect")
    windows = [padded[..., r : r + 4, c : c + 4] for r in range(3) for c in range(3)]
    windows += [window.flip(-1) for window in windows]
    shifted = 0
    for seed in range(20):
        crop = random_crop_flip(batch, 1, torch.Generator().manual_seed(seed), "reflect")
        assert any(torch.equal(crop, window) for window in windows) and crop.min() >= 1
        zeros = random_crop_flip(batch, 1, torch.Generator().manual_seed(seed), "constant")
        shifted += bool((zeros == 0).any())  # the same draw with zero padding shows the border
    assert shifted > 0


@pytest.mark.slow
def test_default_cpu_training_runs_the_student_under_bf16_autocast(student_config, monkeypatch):
    dtypes = []
    real_loss = train_module.kd_loss
    monkeypatch.setattr(train_module, "kd_loss", lambda s, *a: dtypes.append(s.dtype) or real_loss(s, *a))
    result = train(replace(student_config, precision="bf16"), progress=False)
    assert set(dtypes) == {torch.bfloat16} and len(dtypes) > 1
    assert all(parameter.dtype == torch.float32 for parameter in result.model.parameters())
    assert math.isfinite(result.history[0]["train_loss"])
    fp32 = train(replace(student_config, precision="fp32"), progress=False)
    assert fp32.history[0]["train_loss"] != result.history[0]["train_loss"]


BUILD_ONCE = """
import sys, time, torch
from pathlib import Path
from kdsearch.infra.tensor_cache import TensorCache

root, log = Path(sys.argv[1]), Path(sys.argv[2])

def build(scratch):
    with log.open("a") as file:
        file.write("built\\n")
    time.sleep(1.0)  # long enough that the other process arrives while this one builds
    return {"x": torch.arange(5)}, {}

artifact = TensorCache(root).get_or_build("demo", {"key": 1}, build)
print(artifact.tensors["x"].tolist())
"""


@pytest.mark.slow
def test_two_processes_building_one_cache_entry_build_it_once(tmp_path):
    log = tmp_path / "builds.log"
    command = [sys.executable, "-c", BUILD_ONCE, str(tmp_path / "cache"), str(log)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=120)[0].strip() for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    assert outputs == ["[0, 1, 2, 3, 4]"] * 2 and log.read_text() == "built\n"
