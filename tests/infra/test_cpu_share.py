from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdsearch.config import IGConfig, LatencyConfig, ModelConfig, OverlayConfig, Runtime, replace
from kdsearch.data.datasets import load_splits
from kdsearch.distill.attribution import BASELINES, Attribution, maps_in_calls
from kdsearch.distill.train import prepare_inputs, train
from kdsearch.infra.cpu_share import CpuShare, machine_share
from kdsearch.models.classifiers import build_model
from kdsearch.models.inference import predict_logits
from kdsearch.runtime.latency import measure_latency
from kdsearch.runtime.timing import runtime_latency

# A process that takes 20 ms CPU steps for ``seconds`` and writes each one's (start, end) on the
# monotonic clock, which all processes of the machine share.
STEPPER = """
import sys, time
from kdsearch.infra.cpu_share import CpuShare
share, until = CpuShare(sys.argv[1]), time.monotonic() + float(sys.argv[2])
with open(sys.argv[3], "w", buffering=1) as out:
    while time.monotonic() < until:
        with share.step():
            start = time.monotonic()
            while time.monotonic() - start < 0.02:
                pass
            out.write(f"{start} {time.monotonic()}\\n")
"""

# A process that holds the machine's timing lock for ``seconds``: "held" once it has it, then the
# monotonic time at which it lets go.
TIMER = """
import sys, time
from kdsearch.infra.cpu_share import machine_share
with machine_share().timing():
    print("held", flush=True)
    time.sleep(float(sys.argv[1]))
    released = time.monotonic()
print(released, flush=True)
"""


def _intervals(path: Path) -> list[tuple[float, float]]:
    return [tuple(map(float, line.split())) for line in path.read_text().splitlines() if line.count(" ") == 1]


def test_a_timing_waits_for_the_steps_under_way_and_no_step_runs_during_it(tmp_path):
    logs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    # Two steppers whose shared steps overlap: without the turnstile the timing could wait for ever.
    steppers = [
        subprocess.Popen([sys.executable, "-c", STEPPER, str(tmp_path / "locks"), "4", str(log)]) for log in logs
    ]
    try:
        deadline = time.monotonic() + 30
        while not all(log.exists() and _intervals(log) for log in logs):
            assert time.monotonic() < deadline, "the steppers did not start"
            time.sleep(0.05)
        share, asked = CpuShare(tmp_path / "locks"), time.monotonic()
        with share.timing():
            start = time.monotonic()
            with share.step():  # this process's own work inside its timing neither blocks nor lets others in
                time.sleep(0.3)
            with share.timing():
                time.sleep(0.2)
            end = time.monotonic()
    finally:
        for stepper in steppers:
            assert stepper.wait(timeout=60) == 0
    assert start - asked < 1.0
    for log in logs:
        steps = _intervals(log)
        assert not [(a, b) for a, b in steps if a < end and b > start]
        assert any(b <= start for _, b in steps) and any(a >= end for a, _ in steps)  # it stepped before and after


@contextlib.contextmanager
def _held_by_another_process(seconds: float):
    """Another process holds this machine's timing lock for ``seconds``; yields a dict that gets
    "released", the monotonic time at which it let go."""
    timer = subprocess.Popen([sys.executable, "-c", TIMER, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert timer.stdout.readline().strip() == "held"
    times: dict[str, float] = {}
    try:
        yield times
    finally:
        times["released"] = float(timer.stdout.readline())
        assert timer.wait(timeout=60) == 0


TINY = ModelConfig(arch="tiny_cnn")


def _predict():
    predict_logits(build_model(TINY), torch.zeros(8, 3, 32, 32, dtype=torch.uint8), 4, torch.device("cpu"), None)


def _measure_latency():
    measure_latency(build_model(TINY), torch.device("cpu"), LatencyConfig(warmup=0, repeats=1, batch_sizes=(1,)), "x")


def _runtime_latency(tmp_path):
    latency = LatencyConfig(warmup=0, repeats=1, batch_sizes=(1,), onnx_runtimes=())
    calibration = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    runtime_latency(build_model(TINY), TINY, Runtime.TORCH, 1, 1, latency, calibration, tmp_path / "latency")


def _ig(student_config):
    splits = load_splits(student_config.data, student_config.cache_dir)
    model = build_model(TINY).eval()
    config = IGConfig(n_steps=4, images_per_call=4)
    baseline = BASELINES[config.baseline](model, splits)

    def attribute():
        maps_in_calls(model, splits.train_images[:8], splits.train_labels[:8], baseline, Attribution(ig=config))

    attribute()  # Captum's import and first call take longer than the lock is held
    return attribute


@pytest.mark.parametrize("work", ["predict_logits", "measure_latency", "runtime_latency", "maps_in_calls"])
def test_kdsearch_work_waits_while_another_process_times(work, student_config, tmp_path):
    run = {
        "predict_logits": lambda: _predict,
        "measure_latency": lambda: _measure_latency,
        "runtime_latency": lambda: lambda: _runtime_latency(tmp_path),
        "maps_in_calls": lambda: _ig(student_config),
    }[work]()
    with _held_by_another_process(1.0) as times:
        run()
        finished = time.monotonic()
    assert finished >= times["released"]


def test_training_steps_wait_while_another_process_times(student_config):
    config = replace(student_config, overlay=OverlayConfig(p=0.0))  # KD with the online teacher, no IG maps
    inputs = prepare_inputs(config, progress=False)
    forwards: list[float] = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda *_: forwards.append(time.monotonic()))
    try:
        with _held_by_another_process(1.0) as times:
            train(config, inputs=inputs, progress=False)
    finally:
        hook.remove()
    assert forwards and forwards[0] >= times["released"]  # the first forward is the first training step's


def test_the_machine_share_lives_in_the_kdsearch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSEARCH_CACHE_DIR", str(tmp_path / "elsewhere"))
    share = machine_share()
    assert share is machine_share() and share.directory == tmp_path / "elsewhere"
    with share.step():
        pass
    assert sorted(path.name for path in share.directory.iterdir()) == ["cpu-share.steps", "cpu-share.turnstile"]
