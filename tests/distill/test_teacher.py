"""kdsearch.distill.teacher: the teacher recipe's config, where a trained teacher is cached, loading a
teacher, and its logits on the training images computed once."""

from __future__ import annotations

import re

import pytest
import torch

import kdsearch.distill.teacher as teacher_module
from kdsearch.config import DataConfig, ModelConfig, TeacherRecipe, TrainConfig, replace, to_dict
from kdsearch.data.datasets import load_splits
from kdsearch.distill.teacher import (
    cached_teacher_accuracy,
    cached_teacher_logits,
    load_teacher,
    recipe_config,
    trained_teacher_fields,
    trained_teacher_path,
)
from kdsearch.errors import CheckpointError
from kdsearch.infra.tensor_cache import content_key
from kdsearch.models.classifiers import load_model, weights_hash
from kdsearch.models.inference import predict_logits
from tests.fakes import SYNTHETIC, TINY

CPU = torch.device("cpu")


def test_the_recipe_is_sgd_with_warmup_label_smoothing_and_reflect_padding():
    config = recipe_config(SYNTHETIC, TINY, TeacherRecipe(epochs=3, batch_size=16, lr=0.2, seed=7))
    assert config.data == SYNTHETIC and config.student == TINY
    assert (config.epochs, config.batch_size, config.seed) == (3, 16, 7)
    optim = config.optim
    assert (optim.optimizer, optim.lr, optim.weight_decay) == ("sgd", 0.2, 5e-4)
    assert (optim.schedule, optim.warmup_fraction, optim.label_smoothing) == ("warmup_linear", 0.15, 0.1)
    assert config.pad_mode == "reflect" and config.crop_padding == 4
    assert config.kd.alpha == 0.0 and config.overlay.p == 0.0 and not config.needs_teacher
    assert config.teacher_checkpoint is None


def test_the_default_recipe_is_the_shared_pretrained_teachers():
    config = recipe_config(DataConfig(dataset="cifar10"))
    assert config.student == ModelConfig(arch="mobilenetv2_cifar", drop_blocks=0)
    assert (config.epochs, config.batch_size, config.optim.lr, config.seed) == (18, 256, 0.1, 0)


def test_a_trained_teachers_key_is_its_recipe_without_where_it_ran():
    recipe = recipe_config(DataConfig(dataset="cifar10", data_dir="/data"), TINY, TeacherRecipe(epochs=1))
    fields = trained_teacher_fields(recipe)
    expected = {k: v for k, v in to_dict(recipe).items() if k not in ("cache_dir", "device")}
    assert fields == {"recipe": expected} and fields["recipe"]["data"]["data_dir"] == "/data"
    moved = replace(recipe, cache_dir="/elsewhere", device="cpu")
    assert trained_teacher_fields(moved) == fields
    for changed in (replace(recipe, epochs=2), replace(recipe, precision="fp32"), replace(recipe, seed=1)):
        assert trained_teacher_fields(changed) != fields


def test_trained_teacher_path(tmp_path):
    recipe = recipe_config(SYNTHETIC, TINY, TeacherRecipe(epochs=1))
    path = trained_teacher_path(recipe, tmp_path)
    assert path == tmp_path / "teacher" / content_key(trained_teacher_fields(recipe)) / "tensors.pt"
    assert not path.parent.exists()  # where it will be: nothing is written
    assert trained_teacher_path(replace(recipe, cache_dir=str(tmp_path / "x")), tmp_path) == path


def test_load_teacher_builds_the_checkpoint_in_eval_mode(tiny_teacher_checkpoint):
    config = TrainConfig(data=SYNTHETIC, student=TINY, teacher=TINY, teacher_checkpoint=tiny_teacher_checkpoint)
    teacher = load_teacher(config, 10, CPU)
    stored, _ = load_model(tiny_teacher_checkpoint)
    assert not teacher.training and weights_hash(teacher) == weights_hash(stored)
    assert next(teacher.parameters()).device == CPU
    message = "classifier.1.weight has shape (10, 32) in the checkpoint, (3, 32) in the model"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_teacher(config, 3, CPU)  # the data's class count, not the config's, shapes the head


def test_cached_teacher_logits_are_computed_once_per_teacher_and_data(tiny_teacher_checkpoint, tmp_path, monkeypatch):
    config = TrainConfig(data=SYNTHETIC, student=TINY, teacher=TINY, teacher_checkpoint=tiny_teacher_checkpoint)
    teacher = load_teacher(config, 10, CPU)
    splits = load_splits(SYNTHETIC, tmp_path)
    computed = []
    real = teacher_module.predict_logits
    monkeypatch.setattr(teacher_module, "predict_logits", lambda *args: computed.append(args[1]) or real(*args))

    before = weights_hash(teacher)
    first = cached_teacher_logits(teacher, splits, tmp_path, CPU)
    assert weights_hash(teacher) == before  # batchnorm is folded in a copy, not in the teacher
    again = cached_teacher_logits(load_teacher(config, 10, CPU), splits, tmp_path, CPU)  # the same weights, reloaded
    assert len(computed) == 1 and computed[0] is splits.train_images
    assert torch.equal(first, again) and first.shape == (300, 10)
    torch.testing.assert_close(first, predict_logits(teacher, splits.train_images, 64, CPU, None), atol=1e-4, rtol=1e-4)
    [entry] = _entries(tmp_path)
    assert entry.name == content_key({"teacher": weights_hash(teacher), "data": splits.fingerprint})

    other_split = load_splits(replace(SYNTHETIC, val_size=50), tmp_path)
    cached_teacher_logits(teacher, other_split, tmp_path, CPU)
    with torch.no_grad():
        teacher.classifier[1].bias.add_(1.0)
    cached_teacher_logits(teacher, splits, tmp_path, CPU)
    assert len(computed) == 3 and len(_entries(tmp_path)) == 3


def test_the_teachers_test_accuracy_is_measured_once_per_teacher_and_data(
    tiny_teacher_checkpoint, tmp_path, monkeypatch
):
    config = TrainConfig(data=SYNTHETIC, student=TINY, teacher=TINY, teacher_checkpoint=tiny_teacher_checkpoint)
    teacher = load_teacher(config, 10, CPU)
    splits = load_splits(SYNTHETIC, tmp_path)
    measured = []
    real = teacher_module.accuracy
    monkeypatch.setattr(
        teacher_module, "accuracy", lambda *args, **kwargs: measured.append(args[1]) or real(*args, **kwargs)
    )

    first = cached_teacher_accuracy(teacher, splits, tmp_path, CPU)
    again = cached_teacher_accuracy(load_teacher(config, 10, CPU), splits, tmp_path, CPU)
    assert len(measured) == 1 and measured[0] is splits.test_images
    logits = predict_logits(teacher, splits.test_images, 64, CPU, None)
    assert first == again == 100.0 * int((logits.argmax(1) == splits.test_labels).sum()) / len(splits.test_labels)

    with torch.no_grad():
        teacher.classifier[1].bias[0].add_(100.0)  # every image now predicted as class 0
    changed = cached_teacher_accuracy(teacher, splits, tmp_path, CPU)
    assert len(measured) == 2
    assert changed == 100.0 * int((splits.test_labels == 0).sum()) / len(splits.test_labels) != first


def _entries(cache_dir, kind="teacher_logits"):
    return [path for path in (cache_dir / kind).iterdir() if path.is_dir()]
