from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from kdsearch.config import IGConfig, LatencyConfig, ModelConfig, OverlayConfig, Runtime, replace
from kdsearch.data.datasets import load_splits
from kdsearch.distill.attribution import BASELINES, Attribution, maps_in_calls
from kdsearch.distill.train import prepare_inputs, train
from kdsearch.infra import cpu_share
from kdsearch.infra.cpu_share import CpuShare, Presence, fair_threads, machine_share, runtime_dir, share_threads
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_process_stopped_inside_a_step_holds_a_timing_back_only_for_its_bounded_wait(tmp_path, caplog):
    logs = tmp_path / "steps.txt"
    stepper = subprocess.Popen([sys.executable, "-c", STEPPER, str(tmp_path / "locks"), "30", str(logs)])
    try:
        deadline = time.monotonic() + 30
        while not (logs.exists() and _intervals(logs)):
            assert time.monotonic() < deadline, "the stepper did not start"
            time.sleep(0.05)
        # Stopped (as Ctrl-Z would) while it holds its step's shared lock, it never lets go.
        while True:
            os.kill(stepper.pid, signal.SIGSTOP)
            if _step_lock_held(tmp_path / "locks"):
                break
            os.kill(stepper.pid, signal.SIGCONT)
            time.sleep(0.005)
        share = CpuShare(tmp_path / "locks", timing_wait_s=1.0)
        asked = time.monotonic()
        with caplog.at_level("WARNING"), share.timing():
            waited = time.monotonic() - asked
        assert 1.0 <= waited < 2.5
        assert "held the CPU share for over 1 s (stopped?)" in caplog.text
        with share.timing():  # the next timing waits (and warns) again: nothing is left behind
            pass
    finally:
        os.kill(stepper.pid, signal.SIGCONT)
        stepper.kill()
        stepper.wait(timeout=60)


def _step_lock_held(directory: Path) -> bool:
    descriptor = os.open(directory / "cpu-share.steps", os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)


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


@pytest.mark.slow  # each holds a timing for a second
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


@pytest.mark.slow
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


def test_the_machine_share_lives_in_the_runtime_directory_whatever_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSEARCH_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("KDSEARCH_CACHE_DIR", str(tmp_path / "cache-a"))
    share = machine_share()
    monkeypatch.setenv("KDSEARCH_CACHE_DIR", str(tmp_path / "cache-b"))  # another cache, the same machine
    assert share is machine_share() and share.directory == tmp_path / "run"
    with share.step():
        pass
    assert sorted(path.name for path in share.directory.iterdir()) == ["cpu-share.steps", "cpu-share.turnstile"]
    assert not (tmp_path / "cache-a").exists()


def test_the_runtime_directory_is_kdsearchs_own_else_the_sessions_else_a_temporary_one(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSEARCH_RUNTIME_DIR", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    assert runtime_dir() == tmp_path / "own"
    monkeypatch.delenv("KDSEARCH_RUNTIME_DIR")
    assert runtime_dir() == tmp_path / "xdg" / "kdsearch"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert runtime_dir() == Path(tempfile.gettempdir()) / f"kdsearch-{os.getuid()}"


# A kdsearch process that counts itself on the machine until it is killed.
JOINER = """
import sys, time
from kdsearch.infra.cpu_share import Presence
Presence(sys.argv[1]).join()
print("joined", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def _other_processes(directory: Path, count: int):
    others = [
        subprocess.Popen([sys.executable, "-c", JOINER, str(directory)], stdout=subprocess.PIPE, text=True)
        for _ in range(count)
    ]
    try:
        for other in others:
            assert other.stdout.readline().strip() == "joined"
        yield others
    finally:
        for other in others:
            other.kill()
            other.wait(timeout=30)


def test_presence_counts_the_live_processes_and_forgets_those_that_exited(tmp_path):
    presence = Presence(tmp_path)
    assert presence.count() == 0
    presence.join()
    presence.join()  # joining twice counts once
    with _other_processes(tmp_path, 2) as others:
        assert presence.count() == 3
        others[0].kill()
        others[0].wait(timeout=30)
        assert presence.count() == 2
        assert len(list(tmp_path.glob("*.lock"))) == 2  # the exited one's file is gone
    assert presence.count() == 1


@pytest.mark.parametrize(
    ("cores", "processes", "others_busy", "threads"),
    [
        (2, 1, None, 2),
        (2, 2, None, 1),
        (2, 4, None, 1),  # never fewer than one
        (16, 3, None, 5),
        (2, 1, 1.0, 1),  # an install keeping a core busy
        (2, 1, 0.4, 2),  # a little noise leaves both
        (8, 2, 7.9, 1),
        (8, 2, 2.0, 4),
    ],
)
def test_threads_are_the_share_of_the_cores_others_left_free(cores, processes, others_busy, threads):
    assert fair_threads(cores, processes, others_busy) == threads


def test_a_process_sizes_its_threads_to_its_share_unless_told(tmp_path, monkeypatch):
    monkeypatch.delenv("KDSEARCH_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_share, "usable_cores", lambda: 4)
    with _other_processes(runtime_dir() / "processes", 1):
        assert share_threads() == 2 and torch.get_num_threads() == 2  # two kdsearch processes on 4 cores
        assert share_threads(others_busy=3.0) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert share_threads() == 3 and torch.get_num_threads() == 3
        monkeypatch.setenv("KDSEARCH_THREADS", "1")
        assert share_threads() == 1 and torch.get_num_threads() == 1


def test_training_runs_on_its_share_of_the_cores(student_config, monkeypatch):
    monkeypatch.delenv("KDSEARCH_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_share, "usable_cores", lambda: 2)
    threads_seen: list[int] = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda *_: threads_seen.append(torch.get_num_threads())
    )
    try:
        with _other_processes(runtime_dir() / "processes", 1):
            train(replace(student_config, overlay=OverlayConfig(p=0.0)), progress=False)
    finally:
        hook.remove()
    assert threads_seen and set(threads_seen) == {1}
