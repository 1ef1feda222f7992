"""Models from torchvision, timm and the user's own factory, as teacher and student: built, trained one
KD+IG step, rebuilt from their checkpoint alone, exported to ONNX, at 32 pixels and larger."""

from __future__ import annotations

import pytest
import torch

from kdsearch.config import DataConfig, KDConfig, ModelConfig, OverlayConfig, TrainConfig
from kdsearch.distill.preflight import check_student
from kdsearch.distill.train import train
from kdsearch.errors import ConfigError
from kdsearch.models.classifiers import (
    CifarClassifier,
    SourcedClassifier,
    build_model,
    count_parameters,
    init_from_teacher,
    load_model,
    save_checkpoint,
)
from kdsearch.runtime.onnx_runtime import export_onnx, parity, session
from tests.fakes import SYNTHETIC, TINY

FACTORY = "python:tests.models.sample_factory:small_net"
# Four torchvision families, two timm models and a factory of the user's, each with the stem for 32 pixels.
SMALL_STEM = [
    "torchvision:resnet18",
    "torchvision:mobilenet_v3_small",
    "torchvision:shufflenet_v2_x0_5",
    "torchvision:regnet_x_400mf",
    "timm:test_resnet",
    "timm:mobilenetv3_small_050",
]


@pytest.mark.parametrize("arch", [*SMALL_STEM, FACTORY])
def test_a_sourced_model_maps_images_to_logits_and_rebuilds_from_its_checkpoint_alone(arch, tmp_path):
    config = ModelConfig(arch=arch, num_classes=7, cifar_stem=arch in SMALL_STEM, normalization="imagenet")
    torch.manual_seed(0)
    model = build_model(config).eval()
    images = torch.rand(3, 3, 32, 32)
    logits = model(images)
    assert isinstance(model, SourcedClassifier) and logits.shape == (3, 7)
    save_checkpoint(model, config, tmp_path / "model.pt")
    rebuilt, stored = load_model(tmp_path / "model.pt")
    assert stored == config
    assert torch.equal(rebuilt.eval()(images), logits)


@pytest.mark.parametrize(
    ("arch", "builder_args"),
    [
        ("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}),  # a ViT for 32-pixel images
        (FACTORY, {"width": 16}),
    ],
)
def test_builder_args_reach_the_builder_and_the_checkpoint_rebuilds_with_them(arch, builder_args, tmp_path):
    config = ModelConfig(arch=arch, builder_args=builder_args, normalization="imagenet")
    torch.manual_seed(0)
    model = build_model(config).eval()
    images = torch.rand(3, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (3, 10)
    assert count_parameters(model) != count_parameters(build_model(ModelConfig(arch=arch)))
    save_checkpoint(model, config, tmp_path / "model.pt")
    rebuilt, stored = load_model(tmp_path / "model.pt")
    assert stored == config and dict(stored.builder_args) == builder_args
    assert torch.equal(rebuilt.eval()(images), logits)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"arch": "tiny_cnn", "builder_args": {"depth": 3}}, "builder_args are for torchvision, timm and own models"),
        ({"arch": "timm:test_resnet", "builder_args": {"pretrained": True}}, "builder_args cannot set pretrained"),
        ({"arch": "timm:test_resnet", "builder_args": {"num_classes": 3}}, "builder_args cannot set num_classes"),
        ({"arch": "timm:test_resnet", "builder_args": [1, 2]}, "builder_args must be a mapping"),
        ({"arch": "timm:test_resnet", "builder_args": {"act": {"a": 1}}}, "builder_args act: a number, string"),
    ],
)
def test_builder_args_that_cannot_reach_a_builder_are_refused_by_the_config(options, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**options)


def test_the_small_image_stem_keeps_resnets_first_two_downsamplings_out():
    plain = build_model(ModelConfig(arch="torchvision:resnet18")).eval()
    small = build_model(ModelConfig(arch="torchvision:resnet18", cifar_stem=True)).eval()
    sizes = {}
    for name, model in (("plain", plain), ("small", small)):
        model.net.layer1.register_forward_hook(lambda module, args, output, name=name: sizes.setdefault(name, output))
        model(torch.rand(1, 3, 32, 32))
    assert sizes["plain"].shape[-1] == 8 and sizes["small"].shape[-1] == 32  # stride-2 conv and max-pool gone
    assert type(small.net.maxpool).__name__ == "Identity" and small.net.conv1.stride == (1, 1)


def test_a_bare_torchvision_state_dict_loads_into_the_sourced_model(tmp_path):
    import torchvision

    torch.manual_seed(1)
    network = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    torch.save(network.state_dict(), tmp_path / "bare.pt")
    model, _ = load_model(
        tmp_path / "bare.pt", ModelConfig(arch="torchvision:shufflenet_v2_x0_5", normalization="none")
    )
    images = torch.rand(2, 3, 64, 64)
    assert torch.equal(model.eval()(images), network(images))


def test_a_truncated_trunk_is_the_teachers_first_blocks_and_can_start_from_its_weights():
    teacher = build_model(ModelConfig(arch="torchvision:mobilenet_v2", cifar_stem=True))
    student = build_model(ModelConfig(arch="torchvision:mobilenet_v2", cifar_stem=True, drop_blocks=5))
    assert isinstance(student, CifarClassifier) and count_parameters(student) == 543_498  # the paper's student
    init_from_teacher(student, teacher)
    assert torch.equal(student.features[3].conv[0][0].weight, teacher.net.features[3].conv[0][0].weight)


@pytest.mark.parametrize(
    ("arch", "options", "message"),
    [
        ("torchvision:resnet19", {}, "unknown model torchvision:resnet19 (.*); closest: torchvision:resnet18"),
        ("timm:resnet1x", {}, "unknown model timm:resnet1x"),
        ("torchvision:resnet18", {"drop_blocks": 1}, "drop_blocks needs a model with an ordered trunk"),
        ("python:tests.models.nope:f", {}, "cannot import tests.models.nope"),
        ("python:tests.models.sample_factory:missing", {}, "has no callable missing"),
        ("python:tests.models.sample_factory:not_a_module", {}, "returned str, not a torch.nn.Module"),
        ("python:tests.models.sample_factory:wrong_width", {}, r"returns shape \(2, 11\) for 2 images, not \(2, 10\)"),
        ("torchvision:resnet18", {"width_mult": 0.5}, "width_mult is for the built-in architectures"),
        (
            "torchvision:resnet18",
            {"builder_args": {"depth": 3}},
            r"torchvision:resnet18\(num_classes=10, depth=3\) failed: TypeError: .*unexpected keyword argument 'depth'",
        ),
        ("timm:test_resnet", {"builder_args": {"depth": 3}}, r"timm:test_resnet\(num_classes=10, depth=3\) failed"),
        (FACTORY, {"builder_args": {"depth": 3}}, r"small_net\(num_classes=10, depth=3\) failed: TypeError"),
    ],
)
def test_a_model_that_cannot_be_a_student_is_one_line(arch, options, message):
    with pytest.raises(ConfigError, match=message):
        check_student(ModelConfig(arch=arch, **options))


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("resnet18", "arch must be one of"),
        ("keras:resnet18", "arch must be one of"),
        ("torchvision:", "arch must be one of"),
        ("python:module_only", "give python:MODULE:CALLABLE"),
    ],
)
def test_a_misspelt_source_is_refused_by_the_config(arch, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(arch=arch)


def test_the_small_image_stem_is_refused_for_built_in_models():
    with pytest.raises(ConfigError, match="cifar_stem is for torchvision and timm models"):
        ModelConfig(arch="tiny_cnn", cifar_stem=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("student", "image_size"),
    [
        (ModelConfig(arch="torchvision:resnet18", cifar_stem=True), 32),
        (ModelConfig(arch="timm:test_efficientnet", normalization="imagenet"), 96),
        (ModelConfig(arch=FACTORY, normalization="none"), 96),
    ],
)
def test_a_sourced_student_distils_from_the_tiny_teacher_and_exports_with_parity(
    student, image_size, tiny_teacher_checkpoint, tmp_path
):
    data = DataConfig(dataset="synthetic", synthetic_size=80, val_size=20, image_size=image_size)
    config = TrainConfig(
        data=data,
        student=student,
        teacher=TINY,
        teacher_checkpoint=tiny_teacher_checkpoint,
        kd=KDConfig(alpha=0.5),
        overlay=OverlayConfig(p=0.5),
        epochs=1,
        batch_size=40,
        precision="fp32",
        cache_dir=str(tmp_path / "cache"),
    )
    result = train(config, progress=False, run_dir=tmp_path / "run")
    assert result.epochs_completed == 1 and result.history[0]["train_loss"] > 0
    rebuilt, stored = load_model(tmp_path / "run" / "model.pt")
    assert stored.arch == student.arch
    images = (torch.rand(4, 3, image_size, image_size) * 255).to(torch.uint8)
    onnx = export_onnx(rebuilt, tmp_path / "model.onnx", image_size)
    report = parity(rebuilt, session(onnx), images)
    assert report["top1_agreement"] == 100.0 and report["max_abs_logit_diff"] < 1e-3


def test_synthetic_images_come_at_the_asked_size_and_other_data_is_resized_once():
    from kdsearch.data.datasets import load_splits, resized

    splits = load_splits(DataConfig(dataset="synthetic", synthetic_size=40, val_size=10, image_size=48))
    assert splits.train_images.shape[1:] == (3, 48, 48) and splits.image_size == 48
    plain = load_splits(SYNTHETIC)
    assert (
        plain.fingerprint
        != load_splits(DataConfig(dataset="synthetic", synthetic_size=400, val_size=100, image_size=64)).fingerprint
    )
    flat = torch.full((2, 3, 32, 32), 200, dtype=torch.uint8)
    assert torch.equal(resized(flat, 96), torch.full((2, 3, 96, 96), 200, dtype=torch.uint8))


@pytest.mark.slow
def test_a_torchvision_teacher_passes_its_first_blocks_weights_and_attention_to_a_truncated_student(tmp_path):
    from kdsearch.config import AttentionConfig

    teacher_config = ModelConfig(arch="torchvision:mobilenet_v3_small", cifar_stem=True)
    torch.manual_seed(0)
    save_checkpoint(build_model(teacher_config), teacher_config, tmp_path / "teacher.pt")
    config = TrainConfig(
        data=DataConfig(dataset="synthetic", synthetic_size=80, val_size=20),
        student=ModelConfig(arch="torchvision:mobilenet_v3_small", cifar_stem=True, drop_blocks=4),
        teacher=teacher_config,
        teacher_checkpoint=str(tmp_path / "teacher.pt"),
        student_init="teacher",
        kd=KDConfig(alpha=0.5),
        overlay=OverlayConfig(p=0.0),
        attention=AttentionConfig(gamma=1.0),
        epochs=1,
        batch_size=40,
        precision="fp32",
        cache_dir=str(tmp_path / "cache"),
    )
    result = train(config, progress=False)
    assert result.epochs_completed == 1 and result.history[0]["train_loss"] > 0
    assert isinstance(result.model, CifarClassifier) and len(result.model.features) == 13 - 4


@pytest.mark.parametrize(
    "arch",
    [
        "torchvision:resnet18",
        "torchvision:mobilenet_v3_small",
        "timm:test_resnet",
        "timm:test_efficientnet",
        "timm:test_convnext",  # layer_scale: a parameter of a block, kept by its shape
        "torchvision:regnet_x_400mf",  # grouped convolutions: every group loses the same positions
    ],
)
def test_a_pruned_sourced_model_rebuilds_from_the_layers_pruning_changed(arch, tmp_path):
    from kdsearch.config import replace
    from kdsearch.models.classifiers import changed_layers, count_flops
    from kdsearch.models.pruning import prune_classifier

    config = ModelConfig(arch=arch, cifar_stem=True)
    torch.manual_seed(0)
    model = build_model(config).eval()
    pruned = prune_classifier(model, ratio=0.5).eval()
    layers = changed_layers(pruned, build_model(config))
    # Half of each group pruned, rounded to multiples of 8: at least 40 % of the parameters and FLOPs go.
    assert layers and count_parameters(pruned) < 0.6 * count_parameters(model)
    assert count_flops(pruned) < 0.6 * count_flops(model)
    save_checkpoint(pruned, replace(config, pruned_layers=layers), tmp_path / "pruned.pt")
    rebuilt, stored = load_model(tmp_path / "pruned.pt")
    images = torch.rand(2, 3, 32, 32)
    assert stored.pruned_layers == layers and torch.equal(rebuilt.eval()(images), pruned(images))


@pytest.mark.parametrize(
    ("arch", "options", "reason"),
    [
        ("torchvision:shufflenet_v2_x0_5", {"cifar_stem": True}, "ShuffleNetV2: ZeroDivisionError"),
        # pruned without a word by Torch-Pruning, but its attention no longer fits: the layer is named
        (
            "timm:levit_128s",
            {"builder_args": {"img_size": 32}},
            r"LevitDistilled \(the pruned model fails in net\.stages\.1\.downsample\.attn_downsample\.q\.ln\.linear\): "
            "RuntimeError: mat1 and mat2 shapes cannot be multiplied",
        ),
    ],
)
def test_a_model_torch_pruning_cannot_prune_is_refused_in_one_line_before_training(arch, options, reason):
    from kdsearch.config import PruneConfig
    from kdsearch.distill.preflight import check_inputs

    config = TrainConfig(
        data=DataConfig(dataset="synthetic", synthetic_size=40, val_size=10),
        student=ModelConfig(arch=arch, **options),
        teacher=ModelConfig(arch=arch, **options),
        teacher_checkpoint="teacher.pt",
        kd=KDConfig(alpha=0.0),
        overlay=OverlayConfig(p=0.0),
        prune=PruneConfig(ratio=0.5),
    )
    with pytest.raises(ConfigError, match=f"student {arch}: Torch-Pruning cannot prune {reason}"):
        check_inputs(config)


def test_pruned_layers_that_do_not_fit_the_model_are_one_line():
    with pytest.raises(ConfigError, match="does not name a layer of this model"):
        build_model(ModelConfig(arch="torchvision:resnet18", pruned_layers=("net.nope=3,8,1",)))
    with pytest.raises(ConfigError, match="does not fit BatchNorm2d"):
        build_model(ModelConfig(arch="torchvision:resnet18", pruned_layers=("net.bn1=3,8,1",)))


@pytest.mark.slow
def test_a_sourced_teacher_pruned_into_its_student_trains_and_its_checkpoint_rebuilds_it(tmp_path):
    from kdsearch.config import PruneConfig

    teacher = ModelConfig(arch="timm:test_resnet", cifar_stem=True)
    torch.manual_seed(0)
    save_checkpoint(build_model(teacher), teacher, tmp_path / "teacher.pt")
    config = TrainConfig(
        data=DataConfig(dataset="synthetic", synthetic_size=80, val_size=20),
        student=teacher,
        teacher=teacher,
        teacher_checkpoint=str(tmp_path / "teacher.pt"),
        kd=KDConfig(alpha=0.5),
        overlay=OverlayConfig(p=0.0),
        prune=PruneConfig(flops_target=0.5),
        epochs=1,
        batch_size=40,
        precision="fp32",
        cache_dir=str(tmp_path / "cache"),
    )
    result = train(config, progress=False, run_dir=tmp_path / "run")
    rebuilt, stored = load_model(tmp_path / "run" / "model.pt")
    images = torch.rand(2, 3, 32, 32)
    # allclose: the trained model is channels_last, whose kernels round differently from the rebuilt one's.
    trained = result.model.eval().to(memory_format=torch.contiguous_format)
    assert stored.pruned_layers and torch.allclose(rebuilt.eval()(images), trained(images), atol=1e-5)
    from kdsearch.models.classifiers import count_flops

    assert count_flops(rebuilt) <= 0.5 * count_flops(build_model(teacher))
