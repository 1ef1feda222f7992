"""kdsearch.runtime.costs: parameters, FLOPs, bytes on disk and latency of a teacher or a student."""

from __future__ import annotations

import pytest
import torch

import kdsearch.runtime.costs as costs
from kdsearch.config import LatencyConfig
from kdsearch.models.classifiers import build_model
from kdsearch.runtime.costs import model_costs
from tests.fakes import TINY, TINY_STUDENT

QUICK = LatencyConfig(warmup=0, repeats=1, batch_sizes=(1, 4), onnx_runtimes=())
CPU = torch.device("cpu")

# Multiply-adds of tiny_cnn by hand (3x3 convs, 32x32 input, strides 1, 2, 2, 2; linear head), 2 FLOPs each:
# 8*3*9*32*32 + 16*8*9*16*16 + 24*16*9*8*8 + 32*24*9*4*4 + 32*10 = 848192.
TINY_FLOPS = 2 * 848_192
# The student drops the last block: 221184 + 294912 + 221184 conv multiply-adds and a 24 -> 10 head.
TINY_STUDENT_FLOPS = 2 * (221_184 + 294_912 + 221_184 + 24 * 10)


@pytest.mark.parametrize(("role", "architecture", "flops"), [("teacher", TINY, TINY_FLOPS), ("student", TINY_STUDENT, TINY_STUDENT_FLOPS)])  # fmt: skip
def test_costs_of_a_model_in_its_role(role, architecture, flops, tmp_path):
    model = build_model(architecture)
    calibration = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)  # training images, CIFAR-sized
    metrics = model_costs(model, architecture, role, calibration, CPU, QUICK, tmp_path)
    expected = {
        f"{role}_params",
        f"{role}_flops",
        f"{role}_size_bytes",
        f"latency_ms_{role}_b1",
        f"latency_ms_{role}_b4",
    }
    expected |= {"latency_threads", f"latency_ms_{role}_other_cores"}
    assert set(metrics) == expected
    assert metrics[f"{role}_params"] == sum(parameter.numel() for parameter in model.parameters())
    assert metrics[f"{role}_flops"] == flops
    # The file torch.save writes; its zip records are named after the file's stem ("archive" in memory).
    torch.save(model.state_dict(), tmp_path / "archive.pt")
    assert metrics[f"{role}_size_bytes"] == (tmp_path / "archive.pt").stat().st_size
    data = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    assert data < metrics[f"{role}_size_bytes"] < data + 512 * len(model.state_dict()) + 4096  # weights + zip records
    assert metrics["latency_threads"] == torch.get_num_threads()
    assert all(isinstance(value, float) for value in metrics.values())


def test_onnx_latencies_are_asked_for_with_the_roles_prefix(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(
        costs,
        "onnx_latency_metrics",
        lambda *args: asked.append(args) or {"latency_ms_student_onnx_fp32_b1": 0.25},
    )
    model, calibration = build_model(TINY_STUDENT), torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    metrics = model_costs(model, TINY_STUDENT, "student", calibration, CPU, QUICK, tmp_path)
    [(passed_model, architecture, latency, passed_calibration, cache_dir, prefix)] = asked
    assert passed_model is model and architecture == TINY_STUDENT and latency == QUICK
    assert passed_calibration is calibration and cache_dir == tmp_path and prefix == "latency_ms_student"
    assert metrics["latency_ms_student_onnx_fp32_b1"] == 0.25 and metrics["student_params"] == 5170.0
