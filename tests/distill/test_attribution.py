import json
import math

import pytest
import torch

from kdsearch.config import IGConfig, ModelConfig
from kdsearch.data.datasets import load_splits
from kdsearch.distill.attribution import (
    BASELINES,
    CHUNK_IMAGES,
    ig_maps,
    ig_panel,
    integrated_gradients,
    resolve_ig_precision,
)
from kdsearch.models.classifiers import build_model, load_model
from tests.fakes import SYNTHETIC, TINY


def _teacher(checkpoint):
    model, _ = load_model(checkpoint, TINY)
    return model.eval()


@pytest.mark.slow
def test_ig_is_complete_on_a_tiny_model():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="tiny_cnn")).eval()
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    exact = IGConfig(n_steps=256, method="gausslegendre", precision="fp32")  # bf16 rounding is not the path integral
    _, errors = integrated_gradients(model, images, labels, torch.zeros(1, 3, 1, 1), exact)
    assert errors.max() < 0.01  # sum of attributions = F(x) - F(baseline), to within 1 %


def test_completeness_error_is_undefined_where_the_image_is_the_baseline():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="tiny_cnn")).eval()
    images = torch.stack([torch.zeros(3, 32, 32), torch.rand(3, 32, 32)])  # the first is the black baseline
    _, errors = integrated_gradients(model, images, torch.tensor([0, 1]), torch.zeros(1, 3, 1, 1), IGConfig())
    assert errors[0].isnan() and errors[1].isfinite()


@pytest.mark.slow
def test_more_steps_reduce_the_completeness_error():
    torch.manual_seed(1)
    model = build_model(ModelConfig(arch="tiny_cnn")).eval()
    images, labels = torch.rand(6, 3, 32, 32), torch.arange(6)
    coarse = integrated_gradients(
        model, images, labels, torch.zeros(1, 3, 1, 1), IGConfig(n_steps=2, method="riemann_right", precision="fp32")
    )[1]
    fine = integrated_gradients(
        model, images, labels, torch.zeros(1, 3, 1, 1), IGConfig(n_steps=256, precision="fp32")
    )[1]
    assert fine.mean() < coarse.mean()


def test_baselines_differ_as_documented(tiny_teacher_checkpoint, tmp_path):
    splits = load_splits(SYNTHETIC, tmp_path)
    teacher = _teacher(tiny_teacher_checkpoint)
    assert BASELINES["black"](teacher, splits).abs().sum() == 0
    torch.testing.assert_close(BASELINES["zeros_normalized"](teacher, splits), teacher.input_mean)
    mean = splits.train_images.float().mean(dim=(0, 2, 3)) / 255
    torch.testing.assert_close(BASELINES["mean"](teacher, splits).flatten(), mean)


@pytest.mark.slow
def test_cached_map_i_is_the_ig_of_training_image_i(tiny_teacher_checkpoint, tmp_path):
    splits = load_splits(SYNTHETIC, tmp_path)
    teacher = _teacher(tiny_teacher_checkpoint)
    # Calls that straddle batches; fp32, so that the folded teacher's maps match the plain one's closely.
    config = IGConfig(n_steps=8, images_per_call=7, precision="fp32")
    artifact = ig_maps(teacher, splits, config, tmp_path, torch.device("cpu"), progress=False)
    maps = artifact.tensors["maps"]
    assert maps.shape == (300, 32, 32) and maps.dtype == torch.float16
    for index in (0, 41, 299):
        image = splits.train_images[index : index + 1].float() / 255
        expected, _ = integrated_gradients(
            teacher, image, splits.train_labels[index : index + 1], torch.zeros(1, 3, 1, 1), config
        )
        torch.testing.assert_close(maps[index].float(), expected[0], rtol=2e-3, atol=1e-4)
    meta = json.loads((artifact.path / "meta.json").read_text())
    stats = meta["completeness_relative_error"]
    assert meta["images"] == 300 and 0 <= stats["median"] <= stats["p95"] and math.isfinite(stats["mean"])
    assert stats["undefined_images"] == int(artifact.tensors["relative_error"].isnan().sum())


@pytest.mark.slow
def test_auto_precision_is_resolved_before_the_cache_is_keyed(tiny_teacher_checkpoint, tmp_path, monkeypatch):
    splits = load_splits(SYNTHETIC, tmp_path)
    teacher = _teacher(tiny_teacher_checkpoint)
    cpu = torch.device("cpu")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr("kdsearch.infra.device.native_bf16", lambda device, native=native: native)
        assert resolve_ig_precision(IGConfig(), cpu).precision == expected
        artifact = ig_maps(teacher, splits, IGConfig(n_steps=2), tmp_path / expected, cpu, progress=False)
        assert json.loads((artifact.path / "meta.json").read_text())["settings"]["precision"] == expected
    assert resolve_ig_precision(IGConfig(precision="fp32"), cpu).precision == "fp32"


def test_second_request_loads_instead_of_computing(tiny_teacher_checkpoint, tmp_path, monkeypatch):
    splits = load_splits(SYNTHETIC, tmp_path)
    teacher = _teacher(tiny_teacher_checkpoint)
    first = ig_maps(teacher, splits, IGConfig(n_steps=4), tmp_path, torch.device("cpu"), progress=False)
    monkeypatch.setattr("kdsearch.distill.attribution.integrated_gradients", lambda *a, **k: pytest.fail("recomputed"))
    second = ig_maps(
        teacher, splits, IGConfig(n_steps=4, internal_batch_size=9), tmp_path, torch.device("cpu"), progress=False
    )
    assert second.path == first.path and torch.equal(second.tensors["maps"], first.tensors["maps"])


@pytest.mark.slow
def test_other_settings_get_another_cache(tiny_teacher_checkpoint, tmp_path):
    splits = load_splits(SYNTHETIC, tmp_path)
    teacher = _teacher(tiny_teacher_checkpoint)
    a = ig_maps(teacher, splits, IGConfig(n_steps=4), tmp_path, torch.device("cpu"), progress=False)
    b = ig_maps(teacher, splits, IGConfig(n_steps=4, baseline="mean"), tmp_path, torch.device("cpu"), progress=False)
    assert a.path != b.path and not torch.equal(a.tensors["maps"], b.tensors["maps"])


@pytest.mark.slow
def test_truncated_cache_is_detected_and_rebuilt(tiny_teacher_checkpoint, tmp_path):
    splits = load_splits(SYNTHETIC, tmp_path)
    teacher = _teacher(tiny_teacher_checkpoint)
    config = IGConfig(n_steps=4)
    good = ig_maps(teacher, splits, config, tmp_path, torch.device("cpu"), progress=False)
    expected = good.tensors["maps"].clone()
    tensors_file = good.path / "tensors.pt"
    tensors_file.write_bytes(tensors_file.read_bytes()[: tensors_file.stat().st_size // 2])
    rebuilt = ig_maps(teacher, splits, config, tmp_path, torch.device("cpu"), progress=False)
    torch.testing.assert_close(rebuilt.tensors["maps"], expected)


@pytest.mark.slow
def test_corrupt_bytes_of_the_same_size_are_detected(tiny_teacher_checkpoint, tmp_path):
    splits = load_splits(SYNTHETIC, tmp_path)
    teacher = _teacher(tiny_teacher_checkpoint)
    config = IGConfig(n_steps=4)
    good = ig_maps(teacher, splits, config, tmp_path, torch.device("cpu"), progress=False)
    expected = good.tensors["maps"].clone()
    data = bytearray((good.path / "tensors.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (good.path / "tensors.pt").write_bytes(bytes(data))
    rebuilt = ig_maps(teacher, splits, config, tmp_path, torch.device("cpu"), progress=False)
    torch.testing.assert_close(rebuilt.tensors["maps"], expected)


@pytest.mark.slow
def test_interrupted_computation_resumes_from_finished_chunks(tiny_teacher_checkpoint, tmp_path, monkeypatch):
    config = SYNTHETIC.__class__(dataset="synthetic", synthetic_size=2400, val_size=100)
    splits = load_splits(config, tmp_path)
    assert len(splits.train_labels) > CHUNK_IMAGES  # at least two chunks
    teacher = _teacher(tiny_teacher_checkpoint)
    ig = IGConfig(n_steps=2, images_per_call=512)
    real = integrated_gradients
    calls = []

    def crash_after_first_chunk(*args, **kwargs):
        calls.append(len(args[1]))
        if sum(calls) > CHUNK_IMAGES:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr("kdsearch.distill.attribution.integrated_gradients", crash_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        ig_maps(teacher, splits, ig, tmp_path, torch.device("cpu"), progress=False)
    calls.clear()
    monkeypatch.setattr(
        "kdsearch.distill.attribution.integrated_gradients", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k)
    )
    artifact = ig_maps(teacher, splits, ig, tmp_path, torch.device("cpu"), progress=False)
    assert sum(calls) == len(splits.train_labels) - CHUNK_IMAGES  # the finished chunk was not recomputed
    assert artifact.tensors["maps"].shape[0] == len(splits.train_labels)
    assert not (artifact.path / "partial").exists()


def test_panel_shows_three_tiles(tmp_path):
    panel = ig_panel(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8), torch.rand(32, 32), scale=2)
    assert panel.dtype == torch.uint8 and panel.shape[0] == 3 and panel.shape[2] > 2.9 * panel.shape[1]
