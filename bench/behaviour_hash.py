"""Weight hashes of one tiny KD+IG run, to show that a refactor changes no result.

Trains the recipe's tiny_cnn teacher on synthetic data, then a KD+IG student for 2 epochs (α 0.5, p 0.5)
in fp32 and under bf16 autocast, and prints the SHA-256 (first 24 hex digits) of each model's weights
with its validation accuracy. Run it on the code before and after a change, on the same machine:
identical lines mean identical training.

    python bench/behaviour_hash.py
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from kdsearch.config import DataConfig, KDConfig, ModelConfig, OverlayConfig, TeacherRecipe, TrainConfig, replace
from kdsearch.distill.teacher import recipe_config
from kdsearch.distill.train import train
from kdsearch.models.classifiers import save_checkpoint


def weight_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def main() -> None:
    os.environ["KDSEARCH_THREADS"] = "2"  # train() sizes its threads to the free cores unless told
    torch.set_num_threads(2)
    data = DataConfig(dataset="synthetic", synthetic_size=400, val_size=100)
    tiny = ModelConfig(arch="tiny_cnn")
    with tempfile.TemporaryDirectory() as scratch:
        cache = str(Path(scratch) / "cache")
        teacher_config = replace(
            recipe_config(data, tiny, TeacherRecipe(epochs=1, batch_size=32, lr=0.05)),
            cache_dir=cache,
            precision="fp32",
        )
        teacher = train(teacher_config, progress=False)
        checkpoint = Path(scratch) / "teacher.pt"
        save_checkpoint(teacher.model, tiny, checkpoint)
        print(f"teacher       {weight_hash(teacher.model)}")
        for precision in ("fp32", "bf16"):
            student = TrainConfig(
                data=data,
                student=ModelConfig(arch="tiny_cnn", drop_blocks=1),
                teacher=tiny,
                teacher_checkpoint=str(checkpoint),
                kd=KDConfig(alpha=0.5),
                overlay=OverlayConfig(p=0.5),
                epochs=2,
                batch_size=32,
                eval_batch_size=100,
                precision=precision,
                cache_dir=cache,
            )
            result = train(student, progress=False)
            print(
                f"student {precision}  {weight_hash(result.model)}  val_acc {result.val_acc:.6f} test_acc {result.test_acc:.6f}"
            )


if __name__ == "__main__":
    main()
