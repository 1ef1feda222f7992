"""Where a model that is not built in comes from (``arch: SOURCE:NAME``): torchvision's classification
builders, timm, or the user's own factory. Each is called with ``num_classes`` and no pretrained weights
(nothing here can download them: weights come from a local checkpoint), and must return a module that
maps (B, 3, H, W) images to (B, num_classes) logits.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import os
import sys
from collections.abc import Callable

import torch
from torch import nn

from kdsearch.config import ModelSource
from kdsearch.errors import ConfigError


@functools.cache
def torchvision_names() -> tuple[str, ...]:
    """Every classification builder of torchvision.models (detection, segmentation, video… excluded)."""
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def _unknown(source: str, name: str, known: tuple[str, ...] | list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; closest: {', '.join(f'{source}:{n}' for n in close)}" if close else ""
    return ConfigError(f"unknown model {source}:{name} ({len(known)} {source} classification models known){hint}")


LIBRARY_ERRORS = (TypeError, ValueError, AssertionError)  # how torchvision and timm builders refuse arguments


def _torchvision(name: str, num_classes: int, builder_args: dict) -> nn.Module:
    import torchvision

    if name not in torchvision_names():
        raise _unknown("torchvision", name, torchvision_names())
    kwargs = {"weights": None, "num_classes": num_classes}
    if name in ("googlenet", "inception_v3"):
        kwargs |= {"aux_logits": False, "init_weights": True}  # one output; the auxiliary heads need ImageNet sizes
    builder = functools.partial(torchvision.models.get_model, name)
    return _call(f"torchvision:{name}", builder, kwargs | builder_args, LIBRARY_ERRORS)


def _call(arch: str, builder: Callable[..., nn.Module], kwargs: dict, errors: tuple[type[Exception], ...]) -> nn.Module:
    """``builder(**kwargs)``, with ``errors`` (an argument it does not take, a value it refuses…) as one line."""
    try:
        return builder(**kwargs)
    except errors as error:
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k not in ("weights", "model_name", "pretrained"))
        raise ConfigError(f"{arch}({shown}) failed: {type(error).__name__}: {error}") from None


def _timm(name: str, num_classes: int, builder_args: dict) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ConfigError(f"timm:{name} needs timm, which is not installed (pip install 'kdsearch[timm]')") from None
    known = timm.list_models()
    if name not in known:
        raise _unknown("timm", name, known)
    return _call(
        f"timm:{name}",
        timm.create_model,
        {"model_name": name, "pretrained": False, "num_classes": num_classes} | builder_args,
        LIBRARY_ERRORS,
    )


def _python(spec: str, num_classes: int, builder_args: dict) -> nn.Module:
    module_name, _, factory_name = spec.rpartition(":")
    if os.getcwd() not in sys.path:  # as `python -c` would: the user's module beside where they run kdsearch
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # a user's module may fail to import with any error
        raise ConfigError(f"python:{spec}: cannot import {module_name} ({type(error).__name__}: {error})") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ConfigError(f"python:{spec}: {module_name} has no callable {factory_name}")
    # the user's code: any failure is theirs to see, in one line
    model = _call(f"python:{spec}", factory, {"num_classes": num_classes} | builder_args, (Exception,))
    if not isinstance(model, nn.Module):
        raise ConfigError(f"python:{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


SOURCES: dict[ModelSource, Callable[[str, int, dict], nn.Module]] = {
    ModelSource.TORCHVISION: _torchvision,
    ModelSource.TIMM: _timm,
    ModelSource.PYTHON: _python,
}


def build_network(arch: str, num_classes: int, builder_args: dict | None = None) -> nn.Module:
    """The network ``arch`` (SOURCE:NAME) names, freshly initialised, with ``num_classes`` outputs and the
    builder's other keyword arguments ``builder_args``."""
    source, _, name = arch.partition(":")
    return SOURCES[ModelSource(source)](name, num_classes, builder_args or {})


def logits_of(output) -> torch.Tensor:
    """The logits of a forward's output: torchvision's GoogLeNet/Inception return named tuples in training."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ConfigError(f"the model returned {type(output).__name__}, not a tensor of logits")


def adapt_stem(network: nn.Module, arch: str) -> None:
    """For small images, as the CIFAR variants of these networks do: the first convolution at stride 1,
    and a max-pool that directly follows it removed (ResNet, ShuffleNetV2, DenseNet, GoogLeNet...)."""
    layers = [
        (name, module) for name, module in network.named_modules() if isinstance(module, nn.Conv2d | nn.MaxPool2d)
    ]
    if not layers or not isinstance(layers[0][1], nn.Conv2d):
        raise ConfigError(f"cifar_stem: {arch} does not start with a convolution")
    layers[0][1].stride = (1, 1)
    if len(layers) > 1 and isinstance(layers[1][1], nn.MaxPool2d):
        parent, _, child = layers[1][0].rpartition(".")
        setattr(network.get_submodule(parent) if parent else network, child, nn.Identity())
