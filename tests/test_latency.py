from __future__ import annotations

import pytest
import torch

from kdsearch.config import ModelConfig
from kdsearch.errors import ConfigError
from kdsearch.latency import LatencyConfig, latency_ms, measure_latency
from kdsearch.models import build_model


def test_latency_of_each_batch_size_and_the_thread_count():
    model = build_model(ModelConfig(arch="tiny_cnn"))
    metrics = measure_latency(model, torch.device("cpu"), LatencyConfig(warmup=1, repeats=3, batch_sizes=(1, 16)), "x")
    assert set(metrics) == {"x_b1", "x_b16", "latency_threads"}
    assert 0 < metrics["x_b1"] and 0 < metrics["x_b16"]
    assert metrics["latency_threads"] == torch.get_num_threads()


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
