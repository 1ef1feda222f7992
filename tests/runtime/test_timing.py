"""kdsearch.runtime.timing: deployment latency metric names, the latency cache and its key, and the
ONNX latency metrics of a model (what test_pareto does not cover: keys, busy machines, aggregation)."""

from __future__ import annotations

import json

import pytest
import torch

import kdsearch.runtime.timing as timing
from kdsearch.config import LatencyConfig, ModelConfig
from kdsearch.infra.device import device_name
from kdsearch.models.classifiers import build_model
from kdsearch.runtime.timing import Exported, Timing, metric_name, onnx_latency_metrics, runtime_latency
from tests.fakes import TINY, TINY_STUDENT

QUICK = LatencyConfig(warmup=0, repeats=1, batch_sizes=(1,), onnx_runtimes=())
CALIBRATION = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)  # training images: their size is the timed size


@pytest.mark.parametrize(
    ("runtime", "batch", "name"),
    [
        ("torch", 1, "latency_ms_torch_b1"),
        ("onnx-fp32", 1, "latency_ms_onnx_fp32_b1"),
        ("onnx-int8", 128, "latency_ms_onnx_int8_b128"),
    ],
)
def test_metric_name(runtime, batch, name):
    assert metric_name(runtime, batch) == name


def test_metric_name_of_an_unknown_runtime():
    with pytest.raises(ValueError, match="'tensorrt' is not a valid Runtime"):
        metric_name("tensorrt", 1)


def _stored(cache_dir) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((cache_dir / "latency").glob("*.json"))]


def test_a_quiet_timing_is_cached_under_everything_it_depends_on(tmp_path, monkeypatch):
    monkeypatch.setattr(timing, "BUSY_CORES", float("inf"))  # this test machine is busy: cache anyway
    model = build_model(TINY)
    first = runtime_latency(model, TINY, "torch", 2, 1, QUICK, CALIBRATION, tmp_path)
    assert first.latency_ms > 0 and not first.cached
    [stored] = _stored(tmp_path)
    assert stored == {
        "architecture": {
            "arch": "tiny_cnn",
            "num_classes": 10,
            "drop_blocks": 0,
            "width_mult": 1.0,
            "normalization": "cifar10",
            "dropout": 0.2,
        },
        "runtime": "torch",
        "batch": 2,
        "threads": 1,
        "warmup": 0,
        "repeats": 1,
        "cpu": device_name(torch.device("cpu")).split(" (")[0],  # without the thread count, which is a field
        "versions": {"torch": torch.__version__},
        "latency_ms": first.latency_ms,
        "other_cores": first.other_cores,
    }
    # What is read back is the stored value, found by its key.
    path = next((tmp_path / "latency").glob("*.json"))
    path.write_text(json.dumps({**stored, "latency_ms": 123.0, "other_cores": 0.01}))
    assert runtime_latency(model, TINY, "torch", 2, 1, QUICK, CALIBRATION, tmp_path) == Timing(123.0, 0.01, True)
    # Any other field is another key: measured again.
    for args in [(TINY, "torch", 1, 1, QUICK), (TINY, "torch", 2, 2, QUICK), (TINY_STUDENT, "torch", 2, 1, QUICK)]:
        assert not runtime_latency(model, *args, CALIBRATION, tmp_path).cached
    again = LatencyConfig(warmup=1, repeats=1, onnx_runtimes=())
    assert not runtime_latency(model, TINY, "torch", 2, 1, again, CALIBRATION, tmp_path).cached
    assert len(_stored(tmp_path)) == 5


def test_a_timing_on_a_busy_machine_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(timing, "BUSY_CORES", 0.0)  # any other process's use counts as busy
    model = build_model(TINY)
    timings = [runtime_latency(model, TINY, "torch", 1, 1, QUICK, CALIBRATION, tmp_path) for _ in range(2)]
    assert [t.cached for t in timings] == [False, False]
    assert not (tmp_path / "latency").exists() or _stored(tmp_path) == []


def test_the_torch_timing_runs_at_the_asked_thread_count_and_restores_it(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(
        timing, "latency_ms", lambda model, batch, device, config, *size: seen.append(torch.get_num_threads()) or 1.5
    )
    before = torch.get_num_threads()
    result = runtime_latency(build_model(TINY), TINY, "torch", 1, 1, QUICK, CALIBRATION, tmp_path)
    assert seen == [1] and result.latency_ms == 1.5 and torch.get_num_threads() == before


def test_exported_has_no_onnx_file_for_torch(tmp_path):
    with pytest.raises(ValueError, match="torch has no ONNX file"):
        Exported(build_model(TINY), CALIBRATION, tmp_path).path("torch")


@pytest.mark.slow
def test_an_onnx_timing_is_keyed_with_onnxruntimes_version(tmp_path, monkeypatch):
    from importlib.metadata import version

    monkeypatch.setattr(timing, "BUSY_CORES", float("inf"))
    result = runtime_latency(build_model(TINY).eval(), TINY, "onnx-fp32", 1, 1, QUICK, CALIBRATION, tmp_path)
    [stored] = _stored(tmp_path)
    assert result.latency_ms > 0 and stored["latency_ms"] == result.latency_ms and stored["runtime"] == "onnx-fp32"
    assert stored["versions"] == {"torch": torch.__version__, "onnxruntime": version("onnxruntime")}


def test_onnx_latency_metrics_names_each_runtime_and_batch_and_reports_the_busiest_fresh_timing(tmp_path, monkeypatch):
    calls = []
    answers = {
        ("onnx-fp32", 1): Timing(1.0, 0.2, cached=False),
        ("onnx-fp32", 8): Timing(4.0, None, cached=False),  # unmeasurable: no contribution
        ("onnx-int8", 1): Timing(0.5, 0.9, cached=True),  # timed earlier: its contention is not now's
        ("onnx-int8", 8): Timing(2.0, 0.4, cached=False),
    }

    def fake(model, architecture, runtime, batch, threads, latency, calibration, cache_dir, exported):
        calls.append((runtime, batch, threads, exported))
        return answers[(runtime, batch)]

    monkeypatch.setattr(timing, "runtime_latency", fake)
    latency = LatencyConfig(batch_sizes=(1, 8), onnx_runtimes=("onnx-fp32", "onnx-int8"))
    metrics = onnx_latency_metrics(build_model(TINY), TINY, latency, CALIBRATION, tmp_path, "latency_ms_student")
    assert metrics == {
        "latency_ms_student_onnx_fp32_b1": 1.0,
        "latency_ms_student_onnx_fp32_b8": 4.0,
        "latency_ms_student_onnx_int8_b1": 0.5,
        "latency_ms_student_onnx_int8_b8": 2.0,
        "latency_ms_student_onnx_other_cores": 0.4,
    }
    assert [(runtime, batch) for runtime, batch, _, _ in calls] == list(answers)
    assert {threads for _, _, threads, _ in calls} == {torch.get_num_threads()}
    assert len({id(exported) for _, _, _, exported in calls}) == 1  # one export shared by every timing


def test_onnx_latency_metrics_without_fresh_timings_has_no_contention(tmp_path, monkeypatch):
    monkeypatch.setattr(timing, "runtime_latency", lambda *args: Timing(3.0, 0.7, cached=True))
    latency = LatencyConfig(batch_sizes=(4,), onnx_runtimes=("onnx-int8",))
    assert onnx_latency_metrics(build_model(TINY), TINY, latency, CALIBRATION, tmp_path, "x") == {"x_onnx_int8_b4": 3.0}
    assert onnx_latency_metrics(build_model(TINY), TINY, QUICK, CALIBRATION, tmp_path, "x") == {}  # no runtimes


def test_a_model_is_timed_for_what_it_is_built_as(tmp_path, monkeypatch):
    """The cache key is the architecture passed in, so a pruned student's channels make their own key."""
    monkeypatch.setattr(timing, "BUSY_CORES", float("inf"))
    pruned = ModelConfig(arch="tiny_cnn", channels=(4, 8, 12, 16))
    model = build_model(pruned)
    runtime_latency(model, pruned, "torch", 1, 1, QUICK, CALIBRATION, tmp_path)
    [stored] = _stored(tmp_path)
    assert stored["architecture"]["channels"] == [4, 8, 12, 16]
    assert not runtime_latency(model, TINY, "torch", 1, 1, QUICK, CALIBRATION, tmp_path).cached


@pytest.mark.parametrize("runtime", ["torch", pytest.param("onnx-fp32", marks=pytest.mark.slow)])
def test_interleaved_latency_measures_each_model_and_caches_nothing(runtime, tmp_path):
    small = build_model(TINY_STUDENT).eval()
    large = build_model(ModelConfig(arch="mobilenetv2_cifar")).eval()
    models = [Exported(model, CALIBRATION, tmp_path / name) for name, model in (("small", small), ("large", large))]
    for exported in models:
        exported.folder.mkdir()
    medians, other_cores = timing.interleaved_latency(models, runtime, 8, 1, LatencyConfig(warmup=1, repeats=5))
    assert len(medians) == 2 and 0 < medians[0] < medians[1]  # the full MobileNetV2 is slower than tiny_cnn
    assert other_cores is None or other_cores >= 0
    assert not (tmp_path / "latency").exists()


def test_interleaved_latency_warms_every_model_up_then_times_bursts_of_each_in_turns(tmp_path, monkeypatch):
    passes = []
    monkeypatch.setattr(timing, "_torch_runner", lambda exported, batch: lambda: passes.append(exported.folder.name))
    models = [Exported(build_model(TINY), CALIBRATION, tmp_path / name) for name in ("a", "b", "c")]
    timing.interleaved_latency(models, "torch", 1, 1, LatencyConfig(warmup=2, repeats=3))
    burst = timing.BURST
    assert passes == ["a", "a", "b", "b", "c", "c"] + (["a"] * burst + ["b"] * burst + ["c"] * burst) * 3
