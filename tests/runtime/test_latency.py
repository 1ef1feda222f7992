from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import kdsearch.runtime.latency as latency_module
from kdsearch.config import LatencyConfig, ModelConfig
from kdsearch.errors import ConfigError
from kdsearch.infra import cpu_load
from kdsearch.infra.cpu_load import OtherProcesses
from kdsearch.models.classifiers import build_model
from kdsearch.runtime.latency import latency_ms, measure_latency


class _Timed(nn.Module):
    """A model whose forward passes "take" given seconds on a fake clock: ``durations[batch size]``, one per
    pass, the warm-up first (latency_ms times a copy, so each batch size starts from its list's head)."""

    def __init__(self, clock: list[float], durations: dict[int, list[float]]):
        super().__init__()
        # A function, which deepcopy shares: the copy advances this clock, not a copy of it.
        self.advance = lambda seconds: clock.__setitem__(0, clock[0] + seconds)
        self.durations, self.passes = durations, 0

    def forward(self, images):
        self.advance(self.durations[images.shape[0]][self.passes])
        self.passes += 1
        return images


@pytest.mark.parametrize("proc_stat", [True, False])
def test_latency_is_the_median_of_the_timed_passes_after_the_warmup(monkeypatch, proc_stat):
    clock = [0.0]
    monkeypatch.setattr(latency_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(cpu_load, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    # The whole machine was busy 60 CPU-seconds while the measurement ran, this process 10 of them.
    busy = iter([1000.0, 1060.0] if proc_stat else [None, None])
    own = iter([5.0, 15.0])
    monkeypatch.setattr(cpu_load, "machine_busy_seconds", lambda: next(busy))
    monkeypatch.setattr(cpu_load, "own_cpu_seconds", lambda: next(own))
    durations = {1: [50.0, 0.004, 0.001, 0.002], 16: [50.0, 0.010, 0.030, 0.020]}  # a slow warm-up, 3 repeats
    config = LatencyConfig(warmup=1, repeats=3, batch_sizes=(1, 16))
    metrics = measure_latency(_Timed(clock, durations), torch.device("cpu"), config, "x")
    expected = {"x_b1": pytest.approx(2.0), "x_b16": pytest.approx(20.0), "latency_threads": torch.get_num_threads()}
    if proc_stat:  # 50 CPU-seconds of other processes over the 100.067 s the fake clock moved
        expected["x_other_cores"] = pytest.approx(50 / 100.067)
    assert metrics == expected


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
