"""Frozen, validated configuration for every piece of a kdsearch run.

Study files and CLI flags are turned into these dataclasses and nothing else; checkpoints and MLflow
runs store ``to_dict(config)`` so a run can be rebuilt from its record alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdsearch.errors import ConfigError


def _check(condition: bool, message: str) -> None:
    # Raised instead of `assert` so the check survives `python -O`.
    if not condition:
        raise ConfigError(message)


def _check_unit_interval(name: str, value: float) -> None:
    _check(isinstance(value, int | float) and 0.0 <= value <= 1.0, f"{name} must be in [0, 1] but got {value!r}")


def default_data_dir() -> str | None:
    return os.environ.get("KDSEARCH_DATA_DIR") or None


def default_cache_dir() -> Path:
    return Path(os.environ.get("KDSEARCH_CACHE_DIR") or Path.home() / ".cache" / "kdsearch")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "cifar10"  # cifar10 | cifar100 | folder | synthetic
    data_dir: str | None = field(default_factory=default_data_dir)  # download root, or the folder with train/ test/
    label: str | None = None  # human name shown in reports, e.g. "CIFAR-10 (JPEG q75 copy)"
    val_size: int = 5000  # images held out of the training set, stratified, for model selection
    train_subset: int | None = None  # stratified subset of the remaining training images, for quick runs
    split_seed: int = 0  # seeds the validation split and the subset, not the training
    synthetic_size: int = 1200  # synthetic only: training images (test set is a quarter of it)

    def __post_init__(self) -> None:
        from kdsearch.data import DATASETS

        _check(self.dataset in DATASETS, f"dataset must be one of {sorted(DATASETS)} but got {self.dataset!r}")
        if self.dataset == "folder":
            _check(
                self.data_dir is not None,
                "dataset 'folder' needs --data-dir (a folder with train/ and test/)",
            )
        _check(self.val_size >= 0, f"val_size must be >= 0 but got {self.val_size}")
        _check(
            self.train_subset is None or self.train_subset > 0,
            f"train_subset must be positive but got {self.train_subset}",
        )
        _check(self.synthetic_size >= 40, f"synthetic_size must be >= 40 but got {self.synthetic_size}")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "mobilenetv2_cifar"  # a name in kdsearch.models.ARCHITECTURES
    num_classes: int = 10
    drop_blocks: int = 0  # trailing feature blocks removed (the paper's student: 5)
    width_mult: float = 1.0  # channel multiplier, as in torchvision's MobileNetV2
    normalization: str = "cifar10"  # per-channel input normalisation applied inside the model, or "none"
    dropout: float = 0.2  # before the linear head (classifier.0)

    def __post_init__(self) -> None:
        from kdsearch.models import ARCHITECTURES, NORMALIZATIONS

        _check(self.arch in ARCHITECTURES, f"arch must be one of {sorted(ARCHITECTURES)} but got {self.arch!r}")
        _check(
            self.normalization in NORMALIZATIONS,
            f"normalization must be one of {sorted(NORMALIZATIONS)} but got {self.normalization!r}",
        )
        _check(self.num_classes >= 2, f"num_classes must be >= 2 but got {self.num_classes}")
        _check(self.drop_blocks >= 0, f"drop_blocks must be >= 0 but got {self.drop_blocks}")
        _check(self.width_mult > 0, f"width_mult must be > 0 but got {self.width_mult}")
        _check_unit_interval("dropout", self.dropout)


@dataclass(frozen=True)
class KDConfig:
    alpha: float = 0.01  # weight of the KL term; 0 is plain cross-entropy
    temperature: float = 2.5
    teacher_logits: str = "online"  # online: teacher on the augmented batch | cached: once, on clean images

    def __post_init__(self) -> None:
        _check_unit_interval("alpha", self.alpha)
        _check(
            isinstance(self.temperature, int | float) and self.temperature > 0 and math.isfinite(self.temperature),
            f"temperature must be > 0 but got {self.temperature!r}",
        )
        _check(
            self.teacher_logits in ("online", "cached"),
            f"teacher_logits must be 'online' or 'cached' but got {self.teacher_logits!r}",
        )


@dataclass(frozen=True)
class IGConfig:
    baseline: str = "black"  # a name in kdsearch.attribution.BASELINES
    # 24 trapezoid steps with bf16 autocast: mean map agreement 0.991 with a 256-step map and 8.8x the
    # images/s of Captum's 50 fp32 steps, with a lower completeness error than the equally fast
    # 20 steps in fp32 (bench/ig_throughput.py, BENCHMARKS.md).
    n_steps: int = 24
    method: str = "riemann_trapezoid"  # Captum's approximation method
    internal_batch_size: int = 256  # interpolated images per forward/backward pass
    images_per_call: int = 64  # images given to one Captum attribute() call
    # auto: bf16 autocast where the hardware runs bf16 natively, else fp32; the cache records which.
    precision: str = "auto"

    def __post_init__(self) -> None:
        from kdsearch.attribution import BASELINES

        _check(
            self.baseline in BASELINES,
            f"IG baseline must be one of {sorted(BASELINES)} but got {self.baseline!r}",
        )
        _check(self.n_steps >= 2, f"IG n_steps must be >= 2 but got {self.n_steps}")
        methods = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")
        _check(self.method in methods, f"IG method must be one of {list(methods)} but got {self.method!r}")
        _check(
            self.internal_batch_size >= 1,
            f"internal_batch_size must be >= 1 but got {self.internal_batch_size}",
        )
        _check(self.images_per_call >= 1, f"images_per_call must be >= 1 but got {self.images_per_call}")
        _check(
            self.precision in ("auto", "fp32", "bf16"),
            f"IG precision must be auto, fp32 or bf16 but got {self.precision!r}",
        )


@dataclass(frozen=True)
class OverlayConfig:
    p: float = 0.1  # probability that an image gets the IG overlay (Eq. 7)
    mode: str = "aligned"  # a name in kdsearch.augment.OVERLAY_MODES

    def __post_init__(self) -> None:
        from kdsearch.augment import OVERLAY_MODES

        _check_unit_interval("p", self.p)
        _check(
            self.mode in OVERLAY_MODES,
            f"overlay mode must be one of {sorted(OVERLAY_MODES)} but got {self.mode!r}",
        )


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adam"  # adam (the paper) | sgd (the teacher recipe)
    lr: float = 1e-3
    weight_decay: float = 0.0  # not applied to BatchNorm weights and biases
    momentum: float = 0.9  # sgd only (Nesterov)
    schedule: str = "constant"  # constant | warmup_linear (linear warm-up, then linear decay to 0)
    warmup_fraction: float = 0.15
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _check(self.optimizer in ("adam", "sgd"), f"optimizer must be adam or sgd but got {self.optimizer!r}")
        _check(self.lr > 0, f"lr must be > 0 but got {self.lr}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0 but got {self.weight_decay}")
        _check(
            self.schedule in ("constant", "warmup_linear"),
            f"schedule must be constant or warmup_linear but got {self.schedule!r}",
        )
        _check_unit_interval("warmup_fraction", self.warmup_fraction)
        _check(
            0.0 <= self.label_smoothing < 1.0,
            f"label_smoothing must be in [0, 1) but got {self.label_smoothing}",
        )


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    student: ModelConfig = field(default_factory=lambda: ModelConfig(drop_blocks=5))  # the paper's student
    teacher: ModelConfig = field(default_factory=ModelConfig)
    teacher_checkpoint: str | None = None  # needed when alpha > 0 or p > 0
    student_init: str = "random"  # random (the paper) | teacher (copy the kept blocks)
    kd: KDConfig = field(default_factory=KDConfig)
    ig: IGConfig = field(default_factory=IGConfig)
    overlay: OverlayConfig = field(default_factory=OverlayConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 100
    batch_size: int = 64
    eval_batch_size: int = 500
    seed: int = 0
    crop_padding: int = 4  # random-crop padding in pixels
    pad_mode: str = "constant"  # constant (zeros, torchvision's default) | reflect
    device: str = "auto"  # auto: CUDA when present, else CPU
    precision: str = "auto"  # auto: bf16 autocast where supported | fp32 | bf16 | fp16 (CUDA)
    channels_last: bool = True
    cache_dir: str = field(default_factory=lambda: str(default_cache_dir()))

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"epochs must be >= 1 but got {self.epochs}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1 but got {self.batch_size}")
        _check(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1 but got {self.eval_batch_size}")
        _check(
            self.student_init in ("random", "teacher"),
            f"student_init must be random or teacher but got {self.student_init!r}",
        )
        _check(
            self.pad_mode in ("constant", "reflect"),
            f"pad_mode must be constant or reflect but got {self.pad_mode!r}",
        )
        _check(self.crop_padding >= 0, f"crop_padding must be >= 0 but got {self.crop_padding}")
        _check(
            self.precision in ("auto", "fp32", "bf16", "fp16"),
            f"precision must be auto, fp32, bf16 or fp16 but got {self.precision!r}",
        )
        _check(
            self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
            f"device must be auto, cpu or cuda[:N] but got {self.device!r}",
        )
        if self.needs_teacher:
            _check(
                self.teacher_checkpoint is not None,
                "a teacher checkpoint is needed when alpha > 0 or p > 0 (--teacher-checkpoint)",
            )

    @property
    def needs_teacher(self) -> bool:
        return self.kd.alpha > 0 or self.overlay.p > 0 or self.student_init == "teacher"


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dataclass → flat {"kd.alpha": 0.01, ...}, the form MLflow params and tables use."""
    flat: dict[str, Any] = {}
    for key, value in to_dict(config).items():
        _flatten_into(flat, f"{prefix}{key}", value)
    return flat


def _flatten_into(flat: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict):
        for sub_key, sub_value in value.items():
            _flatten_into(flat, f"{key}.{sub_key}", sub_value)
    else:
        flat[key] = value


def from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Build a (nested) config dataclass from plain values, rejecting unknown keys by name."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        field_type = known[name].type
        nested = _NESTED.get(field_type) if isinstance(field_type, str) else None
        kwargs[name] = from_dict(nested, value) if nested and isinstance(value, dict) else value
    return cls(**kwargs)


def replace(config: Any, **changes: Any) -> Any:
    return dataclasses.replace(config, **changes)


_NESTED = {
    "DataConfig": DataConfig,
    "ModelConfig": ModelConfig,
    "KDConfig": KDConfig,
    "IGConfig": IGConfig,
    "OverlayConfig": OverlayConfig,
    "OptimConfig": OptimConfig,
}
