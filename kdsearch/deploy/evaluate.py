"""The test accuracy (fp32) and costs of any checkpoint, a teacher's or a student's, on a dataset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdsearch.config import DataConfig, ModelConfig, replace


@dataclass(frozen=True)
class Evaluation:
    checkpoint: str
    dataset: str  # the dataset's label
    test_images: int
    test_acc: float  # % in fp32, like the teacher's accuracy in every study
    params: int
    flops: int
    size_bytes: int
    assumed: ModelConfig | None  # how a bare state dict was built (None: the checkpoint carried its config)

    def record(self) -> dict[str, Any]:
        """What `kdsearch eval` prints."""
        return {key: value for key, value in vars(self).items() if key != "assumed"}


def evaluate(
    checkpoint: str | Path,
    data: DataConfig,
    bare: ModelConfig,
    device: str = "auto",
    cache_dir: str | Path | None = None,
) -> Evaluation:
    """Evaluate ``checkpoint`` on ``data``'s test split; inputs are checked before anything is written.

    A kdsearch checkpoint carries its architecture; a bare state dict is built as ``bare`` (its
    ``num_classes`` taken from the data), which the result reports as ``assumed``.
    """
    from kdsearch.config import default_cache_dir
    from kdsearch.data.datasets import load_splits
    from kdsearch.distill.preflight import check_data, check_device
    from kdsearch.infra.device import resolve_device
    from kdsearch.infra.storage import check_writable
    from kdsearch.models.classifiers import (
        count_flops,
        count_parameters,
        load_model,
        read_checkpoint,
        size_on_disk_bytes,
    )
    from kdsearch.models.inference import accuracy

    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    check_device(device)
    check_writable(cache_dir, "--cache-dir")
    layout = check_data(data, cache_dir)
    _, stored = read_checkpoint(checkpoint)
    assumed = None if stored else replace(bare, num_classes=layout.classes)
    model, _ = load_model(checkpoint, assumed)
    splits = load_splits(data, cache_dir)
    target = resolve_device(device)
    model = model.to(target)
    return Evaluation(
        checkpoint=str(checkpoint),
        dataset=splits.label,
        test_images=len(splits.test_labels),
        test_acc=accuracy(model, splits.test_images, splits.test_labels, device=target),
        params=count_parameters(model),
        flops=count_flops(model),
        size_bytes=size_on_disk_bytes(model),
        assumed=assumed,
    )
