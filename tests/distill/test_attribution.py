import copy
import json
import math
import re

import pytest
import torch

from kdsearch.config import AttributionConfig, AttributionMethod, IGConfig, ModelConfig, replace
from kdsearch.data.datasets import load_splits
from kdsearch.distill.attribution import (
    BASELINES,
    CHUNK_IMAGES,
    Attribution,
    attribution_maps,
    attribution_panel,
    cache_fields,
    check_method,
    default_layer,
    explain,
    explainable,
    ig_maps,
    maps_in_calls,
    resolve_ig_precision,
)
from kdsearch.errors import ConfigError
from kdsearch.models.classifiers import build_model, fold_batchnorm, load_model, weights_hash
from tests.fakes import SYNTHETIC, TINY


def _teacher(checkpoint):
    model, _ = load_model(checkpoint, TINY)
    return model.eval()


def integrated_gradients(model, images, labels, baseline, config: IGConfig):
    return explain(model, images, labels, baseline, Attribution(ig=config))


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
    monkeypatch.setattr("kdsearch.distill.attribution.explain", lambda *a, **k: pytest.fail("recomputed"))
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
    real = explain
    calls = []

    def crash_after_first_chunk(*args, **kwargs):
        calls.append(len(args[1]))
        if sum(calls) > CHUNK_IMAGES:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr("kdsearch.distill.attribution.explain", crash_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        ig_maps(teacher, splits, ig, tmp_path, torch.device("cpu"), progress=False)
    calls.clear()
    monkeypatch.setattr(
        "kdsearch.distill.attribution.explain", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k)
    )
    artifact = ig_maps(teacher, splits, ig, tmp_path, torch.device("cpu"), progress=False)
    assert sum(calls) == len(splits.train_labels) - CHUNK_IMAGES  # the finished chunk was not recomputed
    assert artifact.tensors["maps"].shape[0] == len(splits.train_labels)
    assert not (artifact.path / "partial").exists()
    whole = ig_maps(teacher, splits, ig, tmp_path / "uninterrupted", torch.device("cpu"), progress=False)
    assert torch.equal(artifact.tensors["maps"], whole.tensors["maps"])  # the chunks assembled in order


def test_panel_of_one_method_shows_three_tiles():
    panel = attribution_panel(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8), {"ig": torch.rand(32, 32)}, 2)
    assert panel.mode == "RGB" and panel.width > 2.9 * panel.height


def test_panel_of_several_methods_has_two_tiles_each_and_a_caption():
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    one = attribution_panel(image, {"a": torch.rand(32, 32)}, 2)
    three = attribution_panel(image, {name: torch.rand(32, 32) for name in "abc"}, 2)
    tile = 33 * 2  # a tile and its padding
    assert three.width == one.width + 4 * tile and three.height > one.height


# --- the other methods -------------------------------------------------------------------------

FP32 = IGConfig(precision="fp32", n_steps=4)


def _captum_directly(method: str, model, images, labels, settings: AttributionConfig) -> torch.Tensor:
    """Captum's own attribution of ``images`` as the docs call it, summed over channels of its magnitude."""
    import captum.attr as captum

    black = torch.zeros_like(images)
    if method == "integrated_gradients":
        raw = captum.IntegratedGradients(model).attribute(
            images, black, target=labels, n_steps=FP32.n_steps, method=FP32.method
        )
    elif method == "saliency":
        raw = captum.Saliency(model).attribute(images, target=labels)
    elif method == "input_x_gradient":
        raw = captum.InputXGradient(model).attribute(images, target=labels)
    elif method == "smoothgrad":
        raw = captum.NoiseTunnel(captum.Saliency(model)).attribute(
            images, nt_type="smoothgrad", nt_samples=settings.samples, stdevs=settings.sigma, target=labels, abs=False
        )
    elif method == "gradient_shap":
        raw = captum.GradientShap(model).attribute(
            images, black[:1], n_samples=settings.samples, stdevs=settings.sigma, target=labels
        )
    elif method == "deeplift":
        raw = captum.DeepLift(model).attribute(images, black, target=labels)
    else:
        cam = captum.LayerGradCam(model, model.features).attribute(images, target=labels, relu_attributions=True)
        raw = captum.LayerAttribution.interpolate(cam, (32, 32), interpolate_mode="bilinear")
    return raw.abs().sum(dim=1)


SLOW_METHODS = ("smoothgrad", "gradient_shap", "deeplift")  # seconds on tiny_cnn: many passes or hooks per call


@pytest.mark.parametrize(
    "method", [pytest.param(m.value, marks=[pytest.mark.slow] if m in SLOW_METHODS else []) for m in AttributionMethod]
)
def test_each_cached_map_equals_captum_on_the_folded_teacher(method, tiny_teacher_checkpoint, tmp_path):
    import numpy as np

    splits = load_splits(SYNTHETIC, tmp_path)
    teacher = _teacher(tiny_teacher_checkpoint)
    # 12 passes a call: the random methods (3 samples an image) take 4 images a call, seeded by the first's index.
    settings = AttributionConfig(samples=3, sigma=0.1)
    attribution = Attribution(method, replace(FP32, internal_batch_size=12), settings)
    artifact = attribution_maps(teacher, splits, attribution, tmp_path, torch.device("cpu"), progress=False)
    maps = artifact.tensors["maps"]
    assert maps.shape == (300, 32, 32) and maps.dtype == torch.float16 and not maps.requires_grad
    folded = explainable(fold_batchnorm(teacher), attribution)
    for index in (0, 40, 296):  # the first image of a call of the random methods
        images = (splits.train_images[index : index + 4].float() / 255).contiguous(memory_format=torch.channels_last)
        torch.manual_seed(index)
        np.random.seed(index)
        expected = _captum_directly(method, folded, images, splits.train_labels[index : index + 4], settings)
        torch.testing.assert_close(maps[index : index + 4].float(), expected, rtol=2e-3, atol=2e-4)
    meta = json.loads((artifact.path / "meta.json").read_text())
    assert meta["method"] == method and meta["cost"]["maps_per_s"] > 0 and meta["cost"]["images"] == 300
    assert ("completeness_relative_error" in meta) == (method in ("integrated_gradients", "gradient_shap", "deeplift"))


def _saturated() -> torch.nn.Module:
    """A conv whose ReLU6 is mostly above 6, where a wrong rule for its top would show."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU6(), torch.nn.Flatten(), torch.nn.Linear(4 * 30 * 30, 10)
    )
    model[0].weight.data.abs_().mul_(30)
    return model.eval()


@pytest.mark.parametrize("model", ["tiny teacher", "saturated"])
def test_deeplift_sums_to_the_output_difference_through_relu6(model, tiny_teacher_checkpoint):
    # Captum's DeepLift treats ReLU6 as linear: split into two ReLUs, the attributions are complete (below
    # ReLU6's top and above it); left as it is, they are far from it.
    teacher = fold_batchnorm(_teacher(tiny_teacher_checkpoint)) if model == "tiny teacher" else _saturated()
    images, labels = torch.rand(6, 3, 32, 32), torch.arange(6)
    if model == "saturated":
        assert (teacher[:2](images) == 6).float().mean() > 0.5
    deeplift = Attribution("deeplift", FP32)
    black = torch.zeros(1, 3, 1, 1)
    _, split = explain(explainable(copy.deepcopy(teacher), deeplift), images, labels, black, deeplift)
    _, linear = explain(teacher, images, labels, black, deeplift)
    assert split.nan_to_num(0).max() < 1e-4 and linear.nanmean() > 0.05


def test_the_ig_cache_keeps_its_kind_and_key_fields(tiny_teacher_checkpoint, tmp_path):
    splits = load_splits(SYNTHETIC, tmp_path)
    teacher = _teacher(tiny_teacher_checkpoint)
    kind, fields = cache_fields(teacher, splits, Attribution(ig=IGConfig(precision="fp32")))
    ig = {"baseline": "black", "n_steps": 24, "method": "riemann_trapezoid", "precision": "fp32"}
    assert (kind, fields) == ("ig", {"teacher": weights_hash(teacher), "data": splits.fingerprint, "ig": ig})
    # The other settings do not touch it.
    other = Attribution(ig=IGConfig(precision="fp32"), settings=AttributionConfig(samples=2, layer="features"))
    assert cache_fields(teacher, splits, other) == (kind, fields)


@pytest.mark.slow
def test_caches_of_two_methods_or_settings_never_collide(tiny_teacher_checkpoint, tmp_path):
    splits = load_splits(SYNTHETIC, tmp_path)
    teacher = _teacher(tiny_teacher_checkpoint)
    cpu = torch.device("cpu")
    made = {
        name: attribution_maps(teacher, splits, attribution, tmp_path, cpu, progress=False)
        for name, attribution in {
            "ig": Attribution(ig=FP32),
            "saliency": Attribution("saliency", FP32),
            "input_x_gradient": Attribution("input_x_gradient", FP32),
            "smoothgrad": Attribution("smoothgrad", FP32, AttributionConfig(samples=2)),
            "smoothgrad more noise": Attribution("smoothgrad", FP32, AttributionConfig(samples=2, sigma=0.3)),
            "grad_cam": Attribution("grad_cam", FP32),
            "grad_cam earlier": Attribution("grad_cam", FP32, AttributionConfig(layer="features.2")),
        }.items()
    }
    assert len({artifact.path for artifact in made.values()}) == len(made)
    maps = list(made.values())
    assert all(not torch.equal(a.tensors["maps"], b.tensors["maps"]) for a, b in zip(maps, maps[1:], strict=False))
    # grad_cam's default layer is keyed by its name: naming it finds the same cache.
    named = Attribution("grad_cam", FP32, AttributionConfig(layer="features"))
    assert attribution_maps(teacher, splits, named, tmp_path, cpu, progress=False).path == made["grad_cam"].path


def test_random_methods_are_seeded_per_call(tiny_teacher_checkpoint):
    teacher = explainable(fold_batchnorm(_teacher(tiny_teacher_checkpoint)), Attribution("smoothgrad"))
    images, labels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.arange(4)
    smoothgrad = Attribution("smoothgrad", FP32, AttributionConfig(samples=4))
    torch.manual_seed(123)
    first, _ = maps_in_calls(teacher, images, labels, torch.zeros(1, 3, 1, 1), smoothgrad, first_index=8)
    after = torch.rand(1)
    second, _ = maps_in_calls(teacher, images, labels, torch.zeros(1, 3, 1, 1), smoothgrad, first_index=8)
    elsewhere, _ = maps_in_calls(teacher, images, labels, torch.zeros(1, 3, 1, 1), smoothgrad, first_index=9)
    assert torch.equal(first, second) and not torch.equal(first, elsewhere)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1))  # the caller's random stream is left where it was


def test_grad_cams_default_layer_is_the_last_stage_of_any_model():
    with torch.device("meta"):
        assert default_layer(build_model(ModelConfig(arch="mobilenetv2_cifar")), 32) == "features"
    resnet = build_model(ModelConfig(arch="torchvision:resnet18", cifar_stem=True))
    assert default_layer(resnet, 32) == "net.layer4"
    mobilenet = build_model(ModelConfig(arch="torchvision:mobilenet_v3_small"))
    assert default_layer(mobilenet, 64) == "net.features"
    # At 32 pixels a plain ResNet-18's last stage is 1x1: its last map larger than that is layer3's.
    assert default_layer(build_model(ModelConfig(arch="torchvision:resnet18")), 32) == "net.layer3"


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (
            "features.9",
            "grad_cam layer 'features.9' is not a module of the teacher; close: ['features.3', 'features.2', "
            "'features.1']; the last stage is 'features'",
        ),
        ("classifier.1", "grad_cam layer 'classifier.1' gives (2, 10), not a feature map (N, C, H, W)"),
    ],
)
def test_a_grad_cam_layer_the_teacher_cannot_give_is_one_line(layer, message):
    attribution = Attribution("grad_cam", settings=AttributionConfig(layer=layer))
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        check_method(build_model(TINY), attribution, 32)
    assert "\n" not in str(error.value)


class _ReusedReLU(torch.nn.Module):
    def __init__(self, activation: torch.nn.Module):
        super().__init__()
        self.conv1, self.conv2, self.act = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3), activation
        self.head = torch.nn.Linear(4, 10)

    def forward(self, x):
        return self.head(self.act(self.conv2(self.act(self.conv1(x)))).mean(dim=(2, 3)))


@pytest.mark.parametrize(
    ("activation", "message"),
    [
        (torch.nn.ReLU(), "deeplift: the teacher uses 'act' more than once in its forward"),
        (torch.nn.SiLU(), "deeplift: Captum's DeepLift has no rule for SiLU (act)"),
    ],
)
def test_deeplift_refuses_a_model_it_would_explain_wrongly(activation, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_method(_ReusedReLU(activation), Attribution("deeplift"), 32)
    check_method(build_model(TINY), Attribution("deeplift"), 32)  # ReLU6 once per block: fine
