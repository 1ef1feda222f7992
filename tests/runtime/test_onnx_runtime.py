import math
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from kdsearch.config import ModelConfig
from kdsearch.data.datasets import load_splits
from kdsearch.errors import CheckpointError, ConfigError
from kdsearch.models.classifiers import build_model, load_model
from kdsearch.models.inference import predict_logits
from kdsearch.models.pruning import prune_classifier
from kdsearch.runtime import onnx_runtime
from kdsearch.runtime.onnx_runtime import export_onnx, onnx_latency_ms, onnx_logits, parity, quantize_int8, session
from tests.fakes import SYNTHETIC


def _images(count: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return load_splits(SYNTHETIC, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def model(tiny_teacher_checkpoint) -> nn.Module:
    return load_model(tiny_teacher_checkpoint)[0].eval()  # trained: its int8 accuracy means something


@pytest.fixture(scope="module")
def fp32_path(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="module")
def int8_path(fp32_path, splits):
    return quantize_int8(fp32_path, fp32_path.with_name("tiny.int8.onnx"), splits.train_images[:64])


def test_export_matches_torch(model, fp32_path, splits):
    assert sorted(path.name for path in fp32_path.parent.iterdir()) == ["tiny.onnx"]  # no temporary left
    runner = session(fp32_path)
    assert [(i.name, i.type) for i in runner.get_inputs()] == [("pixels", "tensor(float)")]
    assert [o.name for o in runner.get_outputs()] == ["logits"]
    report = parity(model, runner, splits.test_images, batch_size=32, labels=splits.test_labels)
    assert report["top1_agreement"] >= 99.9
    assert report["max_abs_logit_diff"] < 1e-4
    assert report["torch_accuracy"] > 30  # the tiny teacher is far above chance (10 %)
    assert report["accuracy_delta"] == report["onnx_accuracy"] - report["torch_accuracy"]


def test_batch_axis_is_dynamic(model, fp32_path):
    runner = session(fp32_path)
    assert onnx_logits(runner, _images(1)).shape == (1, 10)
    images = _images(7)
    logits = onnx_logits(runner, images, batch_size=3)  # batches of 3, 3 and 1
    assert logits.shape == (7, 10) and logits.dtype == torch.float32
    expected = predict_logits(model, images, 7, torch.device("cpu"), None)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(onnx_logits(runner, images), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_pruned_mobilenetv2_exports_with_parity(tmp_path):
    torch.manual_seed(0)
    student = prune_classifier(build_model(ModelConfig(drop_blocks=5, width_mult=0.5)), ratio=0.5).eval()
    runner = session(export_onnx(student, tmp_path / "student.onnx"))
    report = parity(student, runner, _images(64), batch_size=32)
    assert set(report) == {"top1_agreement", "max_abs_logit_diff"}
    assert report["top1_agreement"] >= 99.9
    assert report["max_abs_logit_diff"] < 1e-4


def test_int8_model_is_quantised_and_close_to_fp32(model, fp32_path, int8_path, splits, record_property):
    operators = {node.op_type for node in onnx.load(str(int8_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= operators
    assert int8_path.stat().st_size < 0.6 * fp32_path.stat().st_size
    runner = session(int8_path)
    assert onnx_logits(runner, _images(5)).shape == (5, 10)
    report = parity(model, runner, splits.test_images, batch_size=32, labels=splits.test_labels)
    record_property("int8_accuracy_delta", report["accuracy_delta"])
    print(f"int8 vs fp32 on {len(splits.test_labels)} synthetic test images: {report}")
    assert report["top1_agreement"] >= 90
    assert abs(report["accuracy_delta"]) <= 5
    assert 1e-4 < report["max_abs_logit_diff"] < 1  # really quantised, and not broken


def test_latency_is_positive_and_uses_the_given_threads(fp32_path):
    runner = session(fp32_path, threads=2)
    options = runner.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)
    assert runner.get_providers() == ["CPUExecutionProvider"]
    milliseconds = onnx_latency_ms(runner, batch_size=2, warmup=1, repeats=3)
    assert milliseconds > 0 and math.isfinite(milliseconds)


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.export cannot capture it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.conv(pixels)
        return features if features.sum() > 0 else -features


def test_failed_export_leaves_no_file_and_keeps_the_old_one(fp32_path, tmp_path):
    with pytest.raises(torch.onnx.OnnxExporterError):
        export_onnx(_Untraceable(), tmp_path / "new.onnx")
    assert list(tmp_path.iterdir()) == []
    old = fp32_path.read_bytes()
    with pytest.raises(torch.onnx.OnnxExporterError):
        export_onnx(_Untraceable(), fp32_path)
    assert fp32_path.read_bytes() == old
    assert sorted(path.name for path in fp32_path.parent.iterdir()) == sorted(["tiny.onnx", "tiny.int8.onnx"])


def test_failed_quantisation_leaves_no_file(fp32_path, tmp_path, monkeypatch):
    def write_half_then_fail(model_input, model_output, *args, **kwargs):
        Path(model_output).write_bytes(b"half a model")
        raise RuntimeError("calibration failed")

    monkeypatch.setattr(onnx_runtime, "quantize_static", write_half_then_fail)
    with pytest.raises(RuntimeError, match="calibration failed"):
        quantize_int8(fp32_path, tmp_path / "int8.onnx", _images(4))
    assert list(tmp_path.iterdir()) == []


def test_calibration_images_must_fit_the_model(fp32_path, tmp_path):
    with pytest.raises(ConfigError, match=r"calibration images are \(3, 16, 16\) but .* takes \(3, 32, 32\)"):
        quantize_int8(fp32_path, tmp_path / "int8.onnx", _images(4, size=16))
    assert list(tmp_path.iterdir()) == []


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="missing.onnx does not exist"):
        session(tmp_path / "missing.onnx")


def test_unreadable_model_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="broken.onnx cannot be loaded"):
        session(path)


@pytest.mark.parametrize(
    "images",
    [
        torch.rand(2, 3, 32, 32),
        torch.zeros(2, 1, 32, 32, dtype=torch.uint8),
        torch.zeros(0, 3, 32, 32, dtype=torch.uint8),
    ],
    ids=["float", "one-channel", "empty"],
)
def test_images_must_be_uint8_rgb(fp32_path, images):
    with pytest.raises(ConfigError, match="images must be uint8"):
        onnx_logits(session(fp32_path), images)


def test_labels_must_match_the_images(model, fp32_path):
    with pytest.raises(ConfigError, match=r"labels must have shape \(4,\) but got \(3,\)"):
        parity(model, session(fp32_path), _images(4), labels=torch.zeros(3, dtype=torch.int64))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repeats": 0}, "repeats must be a positive integer but got 0"),
        ({"batch_size": 0}, "batch_size must be a positive integer but got 0"),
        ({"warmup": -1}, "warmup must be an integer >= 0 but got -1"),
    ],
)
def test_bad_latency_settings(fp32_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        onnx_latency_ms(session(fp32_path), **kwargs)


def test_bad_thread_count(fp32_path):
    with pytest.raises(ConfigError, match="threads must be a positive integer but got 0"):
        session(fp32_path, threads=0)
