"""One training run: ``train(config) -> TrainResult``. Students with KD + IG overlay, and teachers.

The training split lives as one uint8 tensor on the device; every batch is gathered, cropped, flipped
and overlaid in a few batched tensor ops (see ``augment``). Each epoch draws from a generator seeded by
(seed, epoch), so a run resumed from its per-epoch checkpoint ends with the same weights as one that
was never interrupted.

    kdsearch train --teacher-checkpoint teacher.pt --t 2.5 --alpha 0.01 --p 0.1 --epochs 4
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kdsearch.attribution import ig_maps
from kdsearch.augment import OVERLAY_MODES, ig_overlay, random_crop_flip
from kdsearch.config import (
    DataConfig,
    KDConfig,
    ModelConfig,
    OptimConfig,
    OverlayConfig,
    TrainConfig,
    replace,
    to_dict,
)
from kdsearch.data import Splits, load_splits
from kdsearch.device import autocast_context, resolve_device, resolve_precision
from kdsearch.errors import CheckpointError
from kdsearch.losses import kd_loss
from kdsearch.models import (
    CifarClassifier,
    build_model,
    fold_batchnorm,
    init_from_teacher,
    load_model,
    save_checkpoint,
    weights_hash,
)
from kdsearch.store import ArtifactStore

log = logging.getLogger(__name__)

OVERLAY_STREAM = 1 << 40  # offsets the overlay's per-epoch seed far from every (seed, epoch) of the data stream

EpochCallback = Callable[[int, dict], None]  # (epoch index, history row); may raise to stop (pruning)


@dataclass
class TrainResult:
    val_acc: float  # % on the held-out validation split, after the last epoch
    test_acc: float  # % on the test set (for reporting only; never used for selection)
    train_time_s: float  # wall time of the epochs, including per-epoch validation, over every resume
    setup_time_s: float  # data, teacher, IG maps and teacher logits (cached after the first run)
    images_per_s: float  # training images per second in the training steps alone
    epochs_completed: int
    history: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None
    model: CifarClassifier | None = None
    teacher_hash: str | None = None
    ig_cache_key: str | None = None


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device, dtype: torch.dtype | None
) -> torch.Tensor:
    """Logits (float32, on CPU) for uint8 images, in eval mode."""
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device).float().div_(255)
        with autocast_context(device, dtype):
            outputs.append(model(batch.contiguous(memory_format=torch.channels_last)).float().cpu())
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device, dtype) -> float:
    if len(labels) == 0:
        return math.nan
    logits = predict_logits(model, images, batch_size, device, dtype)
    return 100.0 * int((logits.argmax(dim=1) == labels).sum()) / len(labels)


def load_teacher(config: TrainConfig, num_classes: int, device: torch.device) -> CifarClassifier:
    teacher, _ = load_model(config.teacher_checkpoint, replace(config.teacher, num_classes=num_classes))
    return teacher.to(device).eval()


def cached_teacher_logits(
    teacher: CifarClassifier, splits: Splits, cache_dir: str, device: torch.device
) -> torch.Tensor:
    """Teacher logits on the clean training images, computed once (fp32) and kept beside the IG cache."""

    def build(scratch: Path):
        return {"logits": predict_logits(fold_batchnorm(teacher), splits.train_images, 500, device, None)}, {}

    fields = {"teacher": weights_hash(teacher), "data": splits.fingerprint}
    return ArtifactStore(cache_dir).get_or_build("teacher_logits", fields, build).tensors["logits"]


def _optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    # Weight decay on BatchNorm scales and biases only fights the normalisation; leave them out.
    decayed = [p for p in model.parameters() if p.ndim > 1]
    undecayed = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decayed, "weight_decay": config.weight_decay},
        {"params": undecayed, "weight_decay": 0.0},
    ]
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)


def _schedule(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int):
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    warmup = max(1, round(config.warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(
    config: TrainConfig,
    *,
    run_dir: str | Path | None = None,
    resume: bool = False,
    discard_foreign_checkpoint: bool = False,
    on_epoch: EpochCallback | None = None,
    progress: bool = True,
    splits: Splits | None = None,
) -> TrainResult:
    """Train a student (or, with a teacher recipe, a teacher) and return its metrics.

    ``run_dir`` receives ``last.pt`` after every epoch and ``model.pt`` at the end; ``resume`` continues
    from ``last.pt``, and refuses one written by another configuration unless ``discard_foreign_checkpoint``
    (a study's retried trial, whose checkpoint a worker given other paths may have written) starts afresh.
    ``on_epoch`` is called after each epoch's validation (studies prune there).
    ``splits`` may be passed to reuse data already in memory (studies run many trials on one split).
    """
    from tqdm import tqdm

    setup_start = time.perf_counter()
    device = resolve_device(config.device)
    dtype = resolve_precision(config.precision, device)
    splits = splits if splits is not None else load_splits(config.data, config.cache_dir)

    teacher = load_teacher(config, splits.num_classes, device) if config.needs_teacher else None
    teacher_hash = weights_hash(teacher) if teacher is not None else None
    maps, ig_key = None, None
    if config.overlay.p > 0:
        artifact = ig_maps(teacher, splits, config.ig, config.cache_dir, device, progress)
        maps, ig_key = artifact.tensors["maps"].to(device), artifact.path.name
    teacher_logits = None
    if config.kd.alpha > 0 and config.kd.teacher_logits == "cached":
        teacher_logits = cached_teacher_logits(teacher, splits, config.cache_dir, device).to(device)

    torch.manual_seed(config.seed)
    student = build_model(replace(config.student, num_classes=splits.num_classes)).to(device)
    if config.student_init == "teacher":
        init_from_teacher(student, teacher)
    online_teacher = None
    if config.kd.alpha > 0 and teacher_logits is None:
        online_teacher = fold_batchnorm(teacher)  # the teacher only runs in eval mode here
    if config.channels_last:
        student = student.to(memory_format=torch.channels_last)
        if online_teacher is not None:
            online_teacher = online_teacher.to(memory_format=torch.channels_last)
    optimizer = _optimizer(student, config.optim)
    count = len(splits.train_labels)
    steps_per_epoch = math.ceil(count / config.batch_size)
    scheduler = _schedule(optimizer, config.optim, steps_per_epoch * config.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    run_dir = Path(run_dir) if run_dir is not None else None
    history: list[dict] = []
    start_epoch = 0
    earlier_train_time = 0.0  # spent before a resume, so that train_time_s is the whole run's
    if resume and run_dir is not None and (run_dir / "last.pt").exists():
        state = torch.load(run_dir / "last.pt", map_location=device, weights_only=False)
        foreign = state["config"] != to_dict(config)
        if foreign and not discard_foreign_checkpoint:
            raise CheckpointError(f"{run_dir / 'last.pt'} was written by a different configuration; use a new run dir")
        if foreign:
            log.warning("discarding %s: written by another configuration", run_dir / "last.pt")
        else:
            student.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            history, start_epoch = state["history"], state["epoch"]
            # A checkpoint from before kdsearch recorded it: the time already spent is unknown, not zero.
            earlier_train_time = state.get("train_time_s", math.nan)
            log.info("resuming %s after epoch %d", run_dir, start_epoch)

    train_images = splits.train_images.to(device)
    train_labels = splits.train_labels.to(device)
    map_index = OVERLAY_MODES[config.overlay.mode]
    setup_time = time.perf_counter() - setup_start
    loop_start = time.perf_counter()
    step_seconds = 0.0
    images_seen = 0

    for epoch in range(start_epoch, config.epochs):
        epoch_seed = config.seed * 1_000_003 + epoch
        generator = torch.Generator().manual_seed(epoch_seed)
        # The overlay draws from its own stream so that every arm of one seed gets the same batches,
        # crops and flips: arm-vs-baseline differences are then paired on the data, not only the init.
        overlay_generator = torch.Generator().manual_seed(epoch_seed + OVERLAY_STREAM)
        torch.manual_seed(epoch_seed)  # dropout draws, for exact resumes
        order = torch.randperm(count, generator=generator).to(device)
        student.train()
        epoch_loss, step_start = 0.0, time.perf_counter()
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="step",
            leave=False,
            disable=not progress,
        )
        for step in bar:
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            images = train_images[index].float().div_(255)
            if maps is not None:
                overlay_maps = maps[map_index(index, count, overlay_generator)].float().unsqueeze(1)
                stacked = random_crop_flip(
                    torch.cat([images, overlay_maps], 1), config.crop_padding, generator, config.pad_mode
                )
                images, _ = ig_overlay(stacked[:, :3], stacked[:, 3], config.overlay.p, overlay_generator)
            else:
                images = random_crop_flip(images, config.crop_padding, generator, config.pad_mode)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, dtype):
                logits = student(images)
                soft_targets = None
                if config.kd.alpha > 0:
                    if teacher_logits is not None:
                        soft_targets = teacher_logits[index]
                    else:
                        with torch.no_grad():
                            soft_targets = online_teacher(images)
            loss = kd_loss(
                logits,
                soft_targets,
                train_labels[index],
                config.kd.alpha,
                config.kd.temperature,
                config.optim.label_smoothing,
            )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            epoch_loss += loss.item() * len(index)
        epoch_seconds = time.perf_counter() - step_start
        step_seconds += epoch_seconds
        images_seen += count
        row = {
            "epoch": epoch + 1,
            "train_loss": epoch_loss / count,
            "val_acc": accuracy(student, splits.val_images, splits.val_labels, config.eval_batch_size, device, dtype),
            "lr": scheduler.get_last_lr()[0],
        }
        history.append(row)
        # Also without progress bars: a background run's log then shows how far it got.
        log.info(
            "epoch %d/%d  train_loss %.4f  val_acc %.2f  (%.0f img/s)",
            row["epoch"],
            config.epochs,
            row["train_loss"],
            row["val_acc"],
            count / epoch_seconds,
        )
        if run_dir is not None:
            elapsed = earlier_train_time + time.perf_counter() - loop_start
            _save_training_state(run_dir, student, optimizer, scheduler, scaler, epoch + 1, history, config, elapsed)
        if on_epoch is not None:
            on_epoch(epoch, row)

    train_time = earlier_train_time + time.perf_counter() - loop_start
    test_acc = accuracy(student, splits.test_images, splits.test_labels, config.eval_batch_size, device, dtype)
    checkpoint = None
    if run_dir is not None:
        checkpoint = run_dir / "model.pt"
        save_checkpoint(student, replace(config.student, num_classes=splits.num_classes), checkpoint)
    return TrainResult(
        val_acc=history[-1]["val_acc"] if history else math.nan,
        test_acc=test_acc,
        train_time_s=train_time,
        setup_time_s=setup_time,
        images_per_s=images_seen / step_seconds if step_seconds > 0 else math.nan,
        epochs_completed=len(history),
        history=history,
        checkpoint=checkpoint,
        model=student,
        teacher_hash=teacher_hash,
        ig_cache_key=ig_key,
    )


def _save_training_state(
    run_dir: Path, model, optimizer, scheduler, scaler, epoch, history, config, train_time_s: float
) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "history": history,
        "config": to_dict(config),
        "train_time_s": train_time_s,
    }
    tmp = run_dir / "last.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(run_dir / "last.pt")


def teacher_recipe(
    data: DataConfig,
    model: ModelConfig | None = None,
    epochs: int = 18,
    batch_size: int = 256,
    lr: float = 0.1,
    seed: int = 0,
) -> TrainConfig:
    """The recipe of the shared pretrained teacher (../shared/models/README.md): SGD Nesterov, warm-up
    then linear decay, weight decay 5e-4 off BN/bias, label smoothing 0.1, reflect-pad crop + flip."""
    return TrainConfig(
        data=data,
        student=model or ModelConfig(),
        kd=KDConfig(alpha=0.0),
        overlay=OverlayConfig(p=0.0),
        optim=OptimConfig(
            optimizer="sgd",
            lr=lr,
            weight_decay=5e-4,
            schedule="warmup_linear",
            warmup_fraction=0.15,
            label_smoothing=0.1,
        ),
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        pad_mode="reflect",
    )
