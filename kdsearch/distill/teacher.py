"""The teacher: the recipe that trains one (and the defaults of the shared pretrained teacher), loading
it, its logits on the training images and its test accuracy, (what it costs is runtime.costs').

A teacher trained by a study is a state dict in the tensor cache, keyed by its recipe, so every trial,
resume and worker sharing a cache directory trains it once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kdsearch.config import (
    DataConfig,
    Dataset,
    KDConfig,
    ModelConfig,
    OptimConfig,
    OverlayConfig,
    TeacherRecipe,
    TrainConfig,
    replace,
    to_dict,
)
from kdsearch.data.datasets import Splits
from kdsearch.infra.tensor_cache import TensorCache
from kdsearch.models.classifiers import CifarClassifier, load_model, weights_hash
from kdsearch.models.inference import accuracy, predict_logits


def recipe_config(
    data: DataConfig, model: ModelConfig | None = None, recipe: TeacherRecipe | None = None
) -> TrainConfig:
    """The TrainConfig of the recipe: SGD Nesterov, warm-up then linear decay, weight decay 5e-4 off
    BN/bias, label smoothing 0.1, reflect-pad crop + flip; no KD, no IG."""
    recipe = recipe or TeacherRecipe()
    return TrainConfig(
        data=data,
        student=model or ModelConfig(),
        kd=KDConfig(alpha=0.0),
        overlay=OverlayConfig(p=0.0),
        optim=OptimConfig(
            optimizer="sgd",
            lr=recipe.lr,
            weight_decay=5e-4,
            schedule="warmup_linear",
            warmup_fraction=0.15,
            label_smoothing=0.1,
        ),
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        seed=recipe.seed,
        pad_mode="reflect",
    )


def trained_teacher_fields(recipe: TrainConfig) -> dict[str, Any]:
    """The tensor-cache key of a teacher trained by ``recipe``."""
    # Where it was trained does not change what it is; the data split is part of the recipe's config.
    fields = {k: v for k, v in to_dict(recipe).items() if k not in ("cache_dir", "device")}
    if recipe.data.dataset == Dataset.SYNTHETIC:
        # Generated from the config alone: a worker given another --data-dir reuses the teacher.
        fields["data"] = {k: v for k, v in fields["data"].items() if k != "data_dir"}
    return {"recipe": fields}


def trained_teacher_path(recipe: TrainConfig, cache_dir: str | Path) -> Path:
    """Where the teacher trained by ``recipe`` is (or will be) cached: a state dict file."""
    return TensorCache(cache_dir).directory("teacher", trained_teacher_fields(recipe)) / "tensors.pt"


def load_teacher(config: TrainConfig, num_classes: int, device: torch.device) -> CifarClassifier:
    """``config.teacher_checkpoint`` built as ``config.teacher``, in eval mode on ``device``."""
    teacher, _ = load_model(config.teacher_checkpoint, replace(config.teacher, num_classes=num_classes))
    return teacher.to(device).eval()


def cached_teacher_logits(teacher: CifarClassifier, splits: Splits, cache_dir: str | Path, device: torch.device):
    """Teacher logits on the clean training images, computed once (fp32) and kept beside the IG cache."""

    def build(scratch: Path):
        # Batches of 500, as the logits every cached-logit run so far was trained on were computed (the
        # batch size changes the last float bits); computed once, so its speed hardly matters.
        return {"logits": predict_logits(teacher, splits.train_images, 500, device, None)}, {}

    fields = {"teacher": weights_hash(teacher), "data": splits.fingerprint}
    return TensorCache(cache_dir).get_or_build("teacher_logits", fields, build).tensors["logits"]


def cached_teacher_accuracy(
    teacher: CifarClassifier, splits: Splits, cache_dir: str | Path, device: torch.device
) -> float:
    """The teacher's test accuracy (%, fp32), measured once per teacher and data split: every study,
    report and export of the same teacher would otherwise spend a test pass on it (a minute here)."""

    def build(scratch: Path):
        accuracy_percent = accuracy(teacher, splits.test_images, splits.test_labels, device=device)
        return {"test_acc": torch.tensor([accuracy_percent], dtype=torch.float64)}, {}

    fields = {"teacher": weights_hash(teacher), "data": splits.fingerprint}
    return float(TensorCache(cache_dir).get_or_build("teacher_accuracy", fields, build).tensors["test_acc"][0])
