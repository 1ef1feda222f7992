import pytest
import torch

from kdsearch.config import ModelConfig
from kdsearch.errors import CheckpointError, ConfigError
from kdsearch.models.classifiers import (
    build_model,
    count_flops,
    count_parameters,
    fold_batchnorm,
    init_from_teacher,
    load_model,
    save_checkpoint,
    size_on_disk_bytes,
    weights_hash,
)
from tests.fakes import SHARED

SHARED_TEACHER = SHARED / "models/mobilenetv2_cifar10jpeg_teacher.pt"


def test_teacher_has_the_papers_parameter_count():
    assert count_parameters(build_model(ModelConfig())) == 2_236_682


def test_student_with_five_blocks_dropped_has_the_papers_parameter_count():
    assert count_parameters(build_model(ModelConfig(drop_blocks=5))) == 543_498


def test_state_dict_layout_is_the_pytorch_cifar10_layout():
    keys = build_model(ModelConfig()).state_dict().keys()
    assert "features.0.0.weight" in keys and "features.18.1.running_mean" in keys
    assert {"classifier.1.weight", "classifier.1.bias"} <= set(keys)
    assert not any(key.startswith("input_") for key in keys)  # normalisation is config, not weights


def test_stem_and_24_channel_stage_keep_resolution():
    model = build_model(ModelConfig(drop_blocks=16))  # stem + 16-ch block + first 24-ch block
    assert model.features(torch.zeros(1, 3, 32, 32)).shape[-1] == 32


def test_normalization_is_applied_inside_the_model():
    raw = build_model(ModelConfig(arch="tiny_cnn", normalization="none")).eval()
    normalised = build_model(ModelConfig(arch="tiny_cnn", normalization="cifar10")).eval()
    normalised.load_state_dict(raw.state_dict())
    pixels = torch.rand(2, 3, 32, 32)
    expected = raw((pixels - normalised.input_mean) / normalised.input_std)
    torch.testing.assert_close(normalised(pixels), expected)


@pytest.mark.skipif(not SHARED_TEACHER.exists(), reason="shared teacher not beside the checkout")
def test_shared_pytorch_cifar10_checkpoint_loads_without_conversion():
    model, config = load_model(SHARED_TEACHER, ModelConfig())
    assert count_parameters(model) == 2_236_682 and config.drop_blocks == 0


def test_student_checkpoint_in_the_same_layout_loads(tmp_path):
    student = build_model(ModelConfig(drop_blocks=5))
    torch.save(student.state_dict(), tmp_path / "bare.pt")  # a bare state dict, no kdsearch metadata
    loaded, _ = load_model(tmp_path / "bare.pt", ModelConfig(drop_blocks=5))
    assert weights_hash(loaded) == weights_hash(student)


def test_kdsearch_checkpoint_rebuilds_from_its_stored_config(tmp_path):
    config = ModelConfig(arch="tiny_cnn", drop_blocks=1, num_classes=7)
    model = build_model(config)
    save_checkpoint(model, config, tmp_path / "model.pt")
    loaded, stored = load_model(tmp_path / "model.pt")
    assert stored == config and weights_hash(loaded) == weights_hash(model)


def test_checkpoint_of_another_architecture_names_the_mismatch(tmp_path):
    torch.save(build_model(ModelConfig()).state_dict(), tmp_path / "teacher.pt")
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) e.g. features.14") as error:
        load_model(tmp_path / "teacher.pt", ModelConfig(drop_blocks=5))
    assert "\n" not in str(error.value)


def test_checkpoint_with_other_class_count_names_the_shape(tmp_path):
    torch.save(build_model(ModelConfig(arch="tiny_cnn", num_classes=100)).state_dict(), tmp_path / "c100.pt")
    with pytest.raises(CheckpointError, match=r"classifier.1.weight has shape \(100, 32\)"):
        load_model(tmp_path / "c100.pt", ModelConfig(arch="tiny_cnn"))


def test_unreadable_checkpoint_is_a_checkpoint_error(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch file"):
        load_model(tmp_path / "junk.pt", ModelConfig())


def test_student_can_start_from_the_teachers_kept_blocks():
    teacher = build_model(ModelConfig(arch="tiny_cnn"))
    student = build_model(ModelConfig(arch="tiny_cnn", drop_blocks=2))
    init_from_teacher(student, teacher)
    torch.testing.assert_close(student.features[1][0].weight, teacher.features[1][0].weight)


def test_width_multiplier_shrinks_the_student():
    assert count_parameters(build_model(ModelConfig(drop_blocks=5, width_mult=0.5))) < 543_498 / 2


@pytest.mark.slow
def test_cost_measures_rank_teacher_above_student():
    teacher, student = build_model(ModelConfig()), build_model(ModelConfig(drop_blocks=5))
    assert count_flops(teacher) > count_flops(student) > 0
    assert size_on_disk_bytes(teacher) > size_on_disk_bytes(student) > 4 * 543_498


def test_dropping_every_block_is_refused():
    with pytest.raises(ConfigError, match="would remove all 4 feature blocks"):
        build_model(ModelConfig(arch="tiny_cnn", drop_blocks=4))


@pytest.mark.slow
def test_folded_batchnorm_gives_the_same_logits_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = build_model(ModelConfig(drop_blocks=12))
    model.train()
    model(torch.rand(16, 3, 32, 32))  # move BatchNorm running statistics away from (0, 1)
    model.eval()
    before = weights_hash(model)
    folded = fold_batchnorm(model)
    pixels = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(folded(pixels), model(pixels), rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert weights_hash(model) == before and not any(p.requires_grad for p in folded.parameters())


def test_a_student_state_dict_loaded_as_a_teacher_suggests_its_drop_blocks(tmp_path):
    path = tmp_path / "student.pt"
    torch.save(build_model(ModelConfig(drop_blocks=5)).state_dict(), path)
    with pytest.raises(CheckpointError, match="feature blocks end at 13: it looks like --drop-blocks 5"):
        load_model(path, ModelConfig())
    load_model(path, ModelConfig(drop_blocks=5))  # the suggestion fits
