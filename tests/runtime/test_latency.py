from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from kdsearch.config import ModelConfig
from kdsearch.errors import ConfigError
from kdsearch.models.classifiers import build_model
from kdsearch.runtime.latency import LatencyConfig, OtherProcesses, latency_ms, measure_latency


def test_latency_of_each_batch_size_and_the_thread_count():
    model = build_model(ModelConfig(arch="tiny_cnn"))
    metrics = measure_latency(model, torch.device("cpu"), LatencyConfig(warmup=1, repeats=3, batch_sizes=(1, 16)), "x")
    assert set(metrics) == {"x_b1", "x_b16", "latency_threads", "x_other_cores"}
    assert 0 < metrics["x_b1"] and 0 < metrics["x_b16"]
    assert metrics["latency_threads"] == torch.get_num_threads() and metrics["x_other_cores"] >= 0


def test_a_neighbour_keeping_a_core_busy_is_measured():
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        with OtherProcesses() as others:
            time.sleep(1.0)
    finally:
        neighbour.kill()
        neighbour.wait()
    assert others.cores is not None and others.cores >= 0.7


def test_latency_leaves_the_model_as_it_was():
    model = build_model(ModelConfig(arch="tiny_cnn")).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    latency_ms(model, 4, torch.device("cpu"), LatencyConfig(warmup=1, repeats=1))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics untouched


@pytest.mark.parametrize("values", [{"repeats": 0}, {"warmup": -1}, {"batch_sizes": (0,)}, {"batch_sizes": ()}])
def test_bad_latency_settings(values):
    with pytest.raises(ConfigError):
        LatencyConfig(**values)
