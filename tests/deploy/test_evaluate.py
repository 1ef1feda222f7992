"""evaluate: any checkpoint's test accuracy and costs; a bare state dict is built as told, and says so."""

from __future__ import annotations

import pytest
import torch

from kdsearch.config import ModelConfig
from kdsearch.data.datasets import load_splits
from kdsearch.deploy.evaluate import evaluate
from kdsearch.errors import KdsearchError
from kdsearch.models.classifiers import load_model
from tests.fakes import SYNTHETIC, TINY


def _accuracy_by_hand(model, splits) -> float:
    model.eval()
    with torch.no_grad():
        predicted = model(splits.test_images.float() / 255).argmax(dim=1)
    return 100.0 * int((predicted == splits.test_labels).sum()) / len(splits.test_labels)


def test_a_kdsearch_checkpoint_is_evaluated_as_it_was_saved(tiny_teacher_checkpoint, tmp_path):
    result = evaluate(tiny_teacher_checkpoint, SYNTHETIC, ModelConfig(), "cpu", tmp_path / "cache")
    splits = load_splits(SYNTHETIC, tmp_path / "cache")
    model, _ = load_model(tiny_teacher_checkpoint)
    assert result.assumed is None  # the checkpoint carried tiny_cnn: the mobilenet default was not used
    assert result.test_images == len(splits.test_labels) == 100
    assert result.test_acc == pytest.approx(_accuracy_by_hand(model, splits), abs=1e-9)
    assert result.params == sum(p.numel() for p in model.parameters())
    assert set(result.record()) == {"checkpoint", "dataset", "test_images", "test_acc", "params", "flops", "size_bytes"}


def test_a_bare_state_dict_is_built_as_told_with_the_datas_classes(tiny_teacher_checkpoint, tmp_path):
    model, _ = load_model(tiny_teacher_checkpoint)
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    result = evaluate(bare, SYNTHETIC, ModelConfig(arch="tiny_cnn", num_classes=3), "cpu", tmp_path / "cache")
    assert result.assumed == ModelConfig(arch="tiny_cnn", num_classes=10)
    with_metadata = evaluate(tiny_teacher_checkpoint, SYNTHETIC, TINY, "cpu", tmp_path / "cache")
    assert result.test_acc == with_metadata.test_acc and result.params == with_metadata.params


def test_bad_input_fails_before_anything_is_written(tiny_teacher_checkpoint, tmp_path):
    with pytest.raises(KdsearchError, match="device must be auto, cpu or cuda\\[:N\\] but got 'tpu'"):
        evaluate(tiny_teacher_checkpoint, SYNTHETIC, TINY, "tpu", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
