"""Typer option types shared by the CLI's command groups, and the configs they build."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import fields
from typing import Annotated, Any

import typer

from kdsearch.config import (
    AttributionConfig,
    DataConfig,
    IGConfig,
    KDConfig,
    LatencyConfig,
    ModelConfig,
    OptimConfig,
    OverlayConfig,
    TeacherRecipe,
    TrainConfig,
    default_cache_dir,
    default_data_dir,
)
from kdsearch.config import AttributionMethod as AttributionMethodName
from kdsearch.config import Dataset as DatasetName
from kdsearch.config import IGBaseline as IGBaselineName
from kdsearch.config import IGMethod as IGMethodName
from kdsearch.config import IGPrecision as IGPrecisionName

Dataset = Annotated[
    DatasetName,
    typer.Option(
        "--dataset",
        help="cifar10/cifar100: torchvision, downloaded when missing; folder: DIR/train/<class>/*.jpg and "
        "DIR/test/<class>/*.jpg; synthetic: tiny, generated.",
    ),
]
DataDir = Annotated[
    str | None,
    typer.Option(
        "--data-dir",
        envvar="KDSEARCH_DATA_DIR",
        help="Where the data lives: the torchvision download root, or the folder with train/ and test/.",
    ),
]
DataLabel = Annotated[
    str | None,
    typer.Option("--data-label", help='Dataset name shown in reports, e.g. "CIFAR-10 (JPEG q75 copy)".'),
]
ValSize = Annotated[int, typer.Option("--val-size", help="Training images held out (stratified) for model selection.")]
TrainSubset = Annotated[
    int | None, typer.Option("--train-subset", help="Train on a stratified subset of N images (quick runs).")
]
SplitSeed = Annotated[int, typer.Option("--split-seed", help="Seed of the validation split and the subset.")]
CacheDir = Annotated[
    str,
    typer.Option(
        "--cache-dir",
        envvar="KDSEARCH_CACHE_DIR",
        help="Where decoded data, IG maps and teacher logits are cached (content-addressed).",
    ),
]
TeacherCheckpoint = Annotated[
    str | None,
    typer.Option("--teacher-checkpoint", help="Teacher weights (.pt): a kdsearch checkpoint or a bare state dict."),
]
IGSteps = Annotated[int, typer.Option("--ig-steps", help="Integrated Gradients integration steps.")]
IGMethod = Annotated[IGMethodName, typer.Option("--ig-method", help="Captum's approximation of the path integral.")]
IGBaseline = Annotated[IGBaselineName, typer.Option("--ig-baseline", help="What IG integrates from.")]
IGPrecision = Annotated[
    IGPrecisionName,
    typer.Option("--ig-precision", help="Of the IG passes; auto: bf16 where the hardware runs it natively, else fp32."),
]

DEFAULT_CACHE_DIR = str(default_cache_dir())
DEFAULT_DATA_DIR = default_data_dir()


def default_of(config: type, name: str) -> Any:
    """The default of field ``name`` of the config dataclass ``config``, so that flags default to what the configs do."""
    found = {item.name: item for item in fields(config)}[name]
    return found.default if found.default is not dataclasses.MISSING else found.default_factory()


# The configs' defaults, which the flags show (torch-free: config holds only names and numbers).
DEFAULT_DATA = DataConfig()
DEFAULT_MODEL = ModelConfig()
PAPER_STUDENT = default_of(TrainConfig, "student")
DEFAULT_KD = KDConfig()
DEFAULT_OVERLAY = OverlayConfig()
DEFAULT_OPTIM = OptimConfig()
DEFAULT_IG = IGConfig()
DEFAULT_LATENCY = LatencyConfig()
DEFAULT_ATTRIBUTION = AttributionConfig()
DEFAULT_METHOD = AttributionMethodName(DEFAULT_OVERLAY.method)
RECIPE = TeacherRecipe()


def data_config(
    dataset: str,
    data_dir: str | None,
    label: str | None,
    val_size: int,
    train_subset: int | None,
    split_seed: int,
) -> DataConfig:
    return DataConfig(
        dataset=dataset,
        data_dir=data_dir,
        label=label,
        val_size=val_size,
        train_subset=train_subset,
        split_seed=split_seed,
    )


def ig_config(steps: int, method: str, baseline: str, precision: str) -> IGConfig:
    return IGConfig(n_steps=steps, method=method, baseline=baseline, precision=precision)


def with_options(options: type, parameter: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator: give a command every field of the dataclass ``options`` as a CLI option, and pass them
    to it as one ``options`` instance in its keyword-only parameter ``parameter``.

    Typer reads a command's signature, so options that several commands share are written once, as a
    dataclass with ``Annotated`` field types, instead of being repeated in each parameter list.
    """

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command)
        # Resolved annotations (the CLI modules postpone them), keeping their typer.Option metadata.
        hints = typing.get_type_hints(command, include_extras=True)
        hints |= typing.get_type_hints(options, include_extras=True)
        own = [item.replace(annotation=hints[name]) for name, item in signature.parameters.items() if name != parameter]
        shared = [
            inspect.Parameter(
                item.name, inspect.Parameter.KEYWORD_ONLY, default=item.default, annotation=hints[item.name]
            )
            for item in fields(options)
        ]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> None:
            bundle = options(**{item.name: kwargs.pop(item.name) for item in fields(options)})
            command(**kwargs, **{parameter: bundle})

        wrapper.__signature__ = signature.replace(parameters=own + shared)
        wrapper.__annotations__ = {item.name: item.annotation for item in own + shared}
        return wrapper

    return decorate
