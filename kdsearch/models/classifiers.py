"""Teacher and student networks, checkpoints, and their cost (parameters, FLOPs, bytes on disk).

A built-in model (and a model truncated to the first blocks of a trunk) is a ``CifarClassifier``:
``features`` (a Sequential of blocks), global average pooling, and ``classifier = Sequential(Dropout,
Linear)``. That is the state-dict layout of the widely used PyTorch_CIFAR10 MobileNetV2 checkpoints
(``features.<i>.…``, ``classifier.1.{weight,bias}``), so they load without conversion. A model from a
source (torchvision, timm, the user's factory: models.sources) is a ``SourcedClassifier``, the network
as ``net``. Input normalisation is a non-persistent buffer of either: part of the model's config,
applied inside ``forward``, and absent from the state dict.
"""

from __future__ import annotations

import copy
import hashlib
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdsearch.config import Architecture, ModelConfig, Normalization, from_dict, is_built_in, to_dict
from kdsearch.errors import CheckpointError, ConfigError

NORMALIZATIONS: dict[Normalization, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    Normalization.CIFAR10: ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    Normalization.CIFAR100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    Normalization.IMAGENET: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    Normalization.NONE: None,  # the model takes raw [0, 1] pixels
}

# (expansion t, channels c, repeats n, first stride s). The CIFAR variant keeps stride 1 in the
# 24-channel stage (and in the stem) so 32x32 inputs are not downsampled too early.
MOBILENETV2_CIFAR_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


class _Normalized(nn.Module):
    """Input normalisation as non-persistent buffers: the model takes pixel values in [0, 1]."""

    def __init__(self, normalization: str):
        super().__init__()
        stats = NORMALIZATIONS[normalization]
        mean, std = stats if stats is not None else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.register_buffer("input_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.input_mean) / self.input_std


class CifarClassifier(_Normalized):
    def __init__(
        self,
        features: nn.Sequential,
        num_classes: int,
        dropout: float,
        normalization: str,
        channels: int | None = None,  # the features' output channels; None: the last convolution's
    ):
        super().__init__(normalization)
        self.features = features
        head = nn.Linear(channels or _out_channels(features), num_classes)
        self.classifier = nn.Sequential(nn.Dropout(dropout), head)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits for images with pixel values in [0, 1]."""
        features = self.features(self.normalize(pixels))
        return self.classifier(features.mean(dim=(2, 3)))


class SourcedClassifier(_Normalized):
    """A network from a model source (torchvision, timm, the user's factory), as ``net``."""

    def __init__(self, net: nn.Module, normalization: str):
        super().__init__(normalization)
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        from kdsearch.models.sources import logits_of

        return logits_of(self.net(self.normalize(pixels)))


def trunk(model: nn.Module) -> nn.Sequential | None:
    """The model's ordered trunk of feature blocks (``features``), where it has one."""
    found = getattr(model, "features", None)
    if found is None and isinstance(model, SourcedClassifier):
        found = getattr(model.net, "features", None)
    return found if isinstance(found, nn.Sequential) else None


def _out_channels(features: nn.Sequential) -> int:
    convs = [module for module in features.modules() if isinstance(module, nn.Conv2d)]
    if not convs:
        raise ConfigError("a model needs at least one convolutional feature block")
    return convs[-1].out_channels


def _mobilenetv2_cifar_features(width_mult: float) -> nn.Sequential:
    from torchvision.models import MobileNetV2

    network = MobileNetV2(inverted_residual_setting=MOBILENETV2_CIFAR_SETTING, width_mult=width_mult)
    network.features[0][0].stride = (1, 1)
    return network.features


def _tiny_cnn_features(width_mult: float) -> nn.Sequential:
    """Four conv blocks: a model that trains in seconds, for tests and smoke studies."""
    widths = [max(4, round(channels * width_mult)) for channels in (8, 16, 24, 32)]
    blocks, in_channels = [], 3
    for index, channels in enumerate(widths):
        stride = 1 if index == 0 else 2
        blocks.append(
            nn.Sequential(
                nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU6(),
            )
        )
        in_channels = channels
    return nn.Sequential(*blocks)


ARCHITECTURES: dict[Architecture, Callable[[float], nn.Sequential]] = {
    Architecture.MOBILENETV2_CIFAR: _mobilenetv2_cifar_features,
    Architecture.TINY_CNN: _tiny_cnn_features,
}


def build_model(config: ModelConfig) -> nn.Module:
    if not is_built_in(config.arch):
        return _sourced(config)
    features = ARCHITECTURES[config.arch](config.width_mult)
    if config.drop_blocks >= len(features):
        raise ConfigError(
            f"drop_blocks={config.drop_blocks} would remove all {len(features)} feature blocks of {config.arch}"
        )
    kept = nn.Sequential(*list(features)[: len(features) - config.drop_blocks])
    model = CifarClassifier(kept, config.num_classes, config.dropout, config.normalization)
    return apply_plan(model, config.channels) if config.channels is not None else model


def _sourced(config: ModelConfig) -> nn.Module:
    """A model from a source; with ``drop_blocks``, the first blocks of its trunk under a new head."""
    from kdsearch.models.sources import adapt_stem, build_network

    if config.channels is not None:
        raise ConfigError(f"a channel plan is for the built-in architectures; {config.arch} keeps pruned_layers")
    if config.width_mult != 1.0:
        raise ConfigError(f"width_mult is for the built-in architectures; choose a smaller {config.arch} instead")
    network = build_network(config.arch, config.num_classes, dict(config.builder_args or ()))
    if config.cifar_stem:
        adapt_stem(network, config.arch)
    if config.drop_blocks == 0:
        model = SourcedClassifier(network, config.normalization)
        return apply_layers(model, config.pruned_layers) if config.pruned_layers else model
    if config.pruned_layers:
        raise ConfigError("pruned_layers are for a whole sourced model, not one truncated by drop_blocks")
    features = trunk(SourcedClassifier(network, config.normalization))
    if features is None:
        raise ConfigError(
            f"drop_blocks needs a model with an ordered trunk (a Sequential `features`); {config.arch} has none: "
            "choose a smaller model of its family as the student instead"
        )
    if config.drop_blocks >= len(features):
        raise ConfigError(f"drop_blocks={config.drop_blocks} would remove all {len(features)} blocks of {config.arch}")
    kept = nn.Sequential(*list(features)[: len(features) - config.drop_blocks])
    with torch.no_grad():  # the kept blocks' output channels, whatever their last layer is
        channels = kept.eval()(torch.zeros(1, 3, 32, 32)).shape[1]
    kept.train()
    return CifarClassifier(kept, config.num_classes, config.dropout, config.normalization, channels)


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Copy the teacher's weights into the student: all of them where it is the teacher's architecture,
    else into its kept trunk blocks (same widths only)."""
    student_state, teacher_state = student.state_dict(), teacher.state_dict()
    if isinstance(student, SourcedClassifier) and {k: v.shape for k, v in student_state.items()} == {
        k: v.shape for k, v in teacher_state.items()
    }:
        student.load_state_dict(teacher_state)
        return
    student_trunk, teacher_trunk = trunk(student), trunk(teacher)
    if student_trunk is None or teacher_trunk is None:
        raise ConfigError("student_init=teacher needs a student made of the teacher's first trunk blocks (drop_blocks)")
    teacher_state = teacher_trunk.state_dict()
    student_state = student_trunk.state_dict()
    mismatched = [k for k, v in student_state.items() if k not in teacher_state or teacher_state[k].shape != v.shape]
    if mismatched:
        raise ConfigError(f"student_init=teacher needs the teacher's widths; {mismatched[0]} does not match")
    student_trunk.load_state_dict({key: teacher_state[key] for key in student_state})


def fold_batchnorm(model: CifarClassifier) -> CifarClassifier:
    """An inference-only copy with every Conv2d → BatchNorm2d pair folded into one convolution.

    Equal to the model in eval mode up to float rounding. Why: eval-mode BatchNorm is a full extra
    memory pass forward and backward; folding it made the MobileNetV2 teacher's forward + input-gradient
    passes (IG, online KD targets) about 2.5x faster on this 2-core CPU (bench/ig_throughput.py).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, norm = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                module._modules[first] = fuse_conv_bn_eval(conv, norm)
                module._modules[second] = nn.Identity()
    for parameter in folded.parameters():
        parameter.requires_grad_(False)
    return folded


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def count_flops(model: nn.Module, image_size: int = 32) -> int:
    """FLOPs of one forward pass on one image (torch.utils.flop_counter: a multiply-add counts as 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


def size_on_disk_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def weights_hash(model: nn.Module) -> str:
    """Hash of the weights themselves, so the same teacher from two files keys the same caches."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def save_checkpoint(model: CifarClassifier, config: ModelConfig, path: str | Path, extra: dict | None = None) -> None:
    """A kdsearch checkpoint: the state dict plus the model config it was built from."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"state_dict": model.state_dict(), "model_config": to_dict(config), **(extra or {})}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict, model config or None) from a kdsearch checkpoint or a bare state dict."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors all mean "not a readable checkpoint"
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch file ({type(error).__name__})") from error
    if isinstance(payload, dict) and "state_dict" in payload:
        return payload["state_dict"], payload.get("model_config")
    if isinstance(payload, dict) and all(isinstance(value, torch.Tensor) for value in payload.values()):
        return payload, None
    raise CheckpointError(f"checkpoint {path} holds neither a state dict nor a kdsearch checkpoint")


def load_model(path: str | Path, config: ModelConfig | None = None) -> tuple[nn.Module, ModelConfig]:
    """Build the model and load its weights; ``config`` defaults to the one stored in the checkpoint."""
    state, stored_config = read_checkpoint(path)
    if config is None:
        config = from_dict(ModelConfig, stored_config) if stored_config else ModelConfig()
    model = build_model(config)
    state = adapt_state(model, state)
    check_fits(model, state, path, config)
    model.load_state_dict(state)
    return model, config


def adapt_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` as ``model`` names it: a bare torchvision/timm state dict gets the ``net.`` prefix."""
    if isinstance(model, SourcedClassifier) and not any(key.startswith("net.") for key in state):
        return {f"net.{key}": tensor for key, tensor in state.items()}
    return state


def _fit_hint(model: nn.Module, state: dict[str, torch.Tensor], config: ModelConfig) -> str:
    """What would fit the checkpoint: "; it looks like --drop-blocks N" when it is the model's first blocks,
    else "; it looks like --arch A" for a built-in architecture whose layers it has; "" when neither."""
    drop = _fitting_drop(model, state, config.drop_blocks)
    if drop is not None and drop != config.drop_blocks:
        return f"; its feature blocks end at {len(model.features) + config.drop_blocks - drop - 1}: it looks like --drop-blocks {drop}"
    for arch in Architecture:
        if arch == config.arch:
            continue
        with torch.device("meta"):
            other = build_model(ModelConfig(arch=arch, num_classes=config.num_classes))
        drop = _fitting_drop(other, state, 0)
        if drop is not None:
            return f"; it looks like --arch {arch.value}" + (f" --drop-blocks {drop}" if drop else "")
    return ""


def _fitting_drop(model: nn.Module, state: dict[str, torch.Tensor], dropped: int) -> int | None:
    """The drop_blocks at which ``state`` is this (``dropped``-block-shorter) model's first feature blocks,
    names and shapes alike; None when it is not."""
    if not isinstance(model, CifarClassifier):
        return None
    stored = {int(key.split(".")[1]) for key in state if key.startswith("features.") and key.split(".")[1].isdigit()}
    if not stored:
        return None
    kept, expected = max(stored) + 1, model.state_dict()
    drop = dropped + len(model.features) - kept
    blocks = [key for key in state if key.startswith("features.")]
    if drop < 0 or any(key not in expected or expected[key].shape != state[key].shape for key in blocks):
        return None
    return drop


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, config: ModelConfig) -> None:
    """Raise one line naming the first mismatch between a state dict and the model."""
    expected = model.state_dict()
    where = f"checkpoint {path} does not fit {config.arch} (drop_blocks={config.drop_blocks}, width={config.width_mult}, classes={config.num_classes})"
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) e.g. {unexpected[0]}")
        raise CheckpointError(f"{where}: {'; '.join(parts)}{_fit_hint(model, state, config)}")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{where}: {key} has shape {tuple(state[key].shape)} in the checkpoint, {tuple(tensor.shape)} in the model"
            )


# --- pruned architectures ------------------------------------------------------------------


def _layer_shape(module: nn.Module) -> tuple[int, ...] | None:
    """What pruning changes of a layer: a convolution's (in, out, groups), a norm's features, a Linear's (in, out)."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels, module.groups
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (module.num_features,)
    if isinstance(module, nn.GroupNorm | nn.LayerNorm):
        return (module.weight.shape[0],) if module.weight is not None else None
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return None


def changed_layers(pruned: nn.Module, original: nn.Module) -> tuple[str, ...]:
    """The layers pruning changed, as ``ModelConfig.pruned_layers`` keeps them: "NAME=n,n,n" for the kinds
    ``_layer_shape`` knows, "NAME.PARAMETER=shape:AxB" for a parameter of any other module."""
    before = dict(original.named_modules())
    found = []
    for name, module in pruned.named_modules():
        old = before.get(name)
        shape, old_shape = _layer_shape(module), _layer_shape(old) if old is not None else None
        if shape is not None and shape != old_shape:
            found.append(f"{name}={','.join(map(str, shape))}")
        elif shape is None and old is not None:
            # Any other module's own parameters (ConvNeXt's layer_scale): their new shapes, by name.
            old_parameters = dict(old.named_parameters(recurse=False))
            for parameter_name, parameter in module.named_parameters(recurse=False):
                if parameter.shape != old_parameters[parameter_name].shape:
                    dims = "x".join(map(str, parameter.shape))
                    found.append(f"{name}.{parameter_name}=shape:{dims}")
    return tuple(found)


def apply_layers(model: nn.Module, layers: Sequence[str]) -> nn.Module:
    """``model`` (freshly built, unpruned) with the shapes of ``changed_layers``, in place; the resized
    parameters are zeros until a state dict is loaded. Layers keep their class (a timm norm-activation
    stays one): only their sizes and parameters change, as Torch-Pruning changes them."""
    for entry in layers:
        name, _, numbers = entry.partition("=")
        if numbers.startswith("shape:"):
            _reshape_parameter(model, name, numbers.removeprefix("shape:"), entry)
            continue
        try:
            module = model.get_submodule(name)
            shape = tuple(int(number) for number in numbers.split(","))
        except (AttributeError, ValueError):
            raise ConfigError(f"pruned layer {entry!r} does not name a layer of this model") from None
        _resize(module, shape, entry)
    return model


def _reshape_parameter(model: nn.Module, name: str, dims: str, entry: str) -> None:
    owner, _, parameter_name = name.rpartition(".")
    try:
        module = model.get_submodule(owner)
        old = getattr(module, parameter_name)
        shape = tuple(int(dim) for dim in dims.split("x"))
    except (AttributeError, ValueError):
        raise ConfigError(f"pruned layer {entry!r} does not name a parameter of this model") from None
    if not isinstance(old, nn.Parameter) or len(shape) != old.dim():
        raise ConfigError(f"pruned layer {entry!r} does not fit {type(module).__name__}.{parameter_name}")
    setattr(module, parameter_name, nn.Parameter(torch.zeros(shape, device=old.device)))


def _resize(module: nn.Module, shape: tuple[int, ...], entry: str) -> None:
    def parameter(*size: int) -> nn.Parameter:
        return nn.Parameter(torch.zeros(*size, device=module.weight.device))

    if isinstance(module, nn.Conv2d) and len(shape) == 3:
        module.in_channels, module.out_channels, module.groups = shape
        module.weight = parameter(shape[1], shape[0] // shape[2], *module.kernel_size)
        if module.bias is not None:
            module.bias = parameter(shape[1])
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) and len(shape) == 1:
        module.num_features = shape[0]
        if module.affine:
            module.weight, module.bias = parameter(shape[0]), parameter(shape[0])
        if module.track_running_stats:
            module.running_mean = torch.zeros(shape[0], device=module.running_mean.device)
            module.running_var = torch.ones(shape[0], device=module.running_var.device)
    elif isinstance(module, nn.GroupNorm | nn.LayerNorm) and len(shape) == 1 and module.weight is not None:
        if isinstance(module, nn.GroupNorm):
            module.num_channels = shape[0]
        else:
            module.normalized_shape = (shape[0],)
        module.weight, module.bias = parameter(shape[0]), parameter(shape[0]) if module.bias is not None else None
    elif isinstance(module, nn.Linear) and len(shape) == 2:
        module.in_features, module.out_features = shape
        module.weight = parameter(shape[1], shape[0])
        if module.bias is not None:
            module.bias = parameter(shape[1])
    else:
        raise ConfigError(f"pruned layer {entry!r} does not fit {type(module).__name__}")


def channel_plan(model: CifarClassifier) -> tuple[int, ...]:
    """Output channels of every ``nn.Conv2d`` in ``model.features``, in module order."""
    return tuple(module.out_channels for module in model.features.modules() if isinstance(module, nn.Conv2d))


def apply_plan(model: CifarClassifier, plan: Sequence[int], image_size: int = 32) -> CifarClassifier:
    """A copy of a freshly built, unpruned ``model`` reshaped to ``plan`` (from ``channel_plan``).

    Assumes the features are a chain of convolutions: each conv takes the previous conv's outputs (the
    image's 3 channels for the first), a depthwise conv stays depthwise, each BatchNorm2d follows the
    conv before it, and residual adds join equal counts (as pruning keeps them). That holds for every
    architecture in ``models.ARCHITECTURES``. The reshaped layers are freshly initialised: load the
    pruned model's state dict next.
    """
    plan = tuple(plan)  # a list after a JSON round trip
    convs = [name for name, module in model.features.named_modules() if isinstance(module, nn.Conv2d)]
    if len(plan) != len(convs):
        raise ConfigError(f"channel plan has {len(plan)} entries but the model has {len(convs)} convolutions")
    if any(isinstance(count, bool) or not isinstance(count, int) or count < 1 for count in plan):
        raise ConfigError(f"channel plan entries must be positive integers but got {list(plan)}")
    reshaped = reshaped_copy(model, plan)
    _check_forward(reshaped, image_size)
    return reshaped


def reshaped_copy(model: CifarClassifier, plan: Sequence[int]) -> CifarClassifier:
    """A copy of ``model`` with every conv, BatchNorm and the head rebuilt for ``plan``'s counts."""
    reshaped = copy.deepcopy(model)
    device = next(model.parameters()).device
    counts, channels = iter(plan), 3
    for name, module in list(reshaped.features.named_modules()):
        if isinstance(module, nn.Conv2d):
            depthwise = module.groups > 1 and module.groups == module.in_channels
            out_channels = next(counts)
            if depthwise and out_channels != channels:
                raise ConfigError(
                    f"channel plan gives depthwise conv features.{name} {out_channels} outputs for {channels} inputs"
                )
            new = nn.Conv2d(
                channels,
                out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                groups=channels if depthwise else module.groups,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
                device=device,
            )
            channels = out_channels
        elif isinstance(module, nn.BatchNorm2d):
            new = nn.BatchNorm2d(
                channels, module.eps, module.momentum, module.affine, module.track_running_stats, device=device
            )
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(reshaped.features.get_submodule(parent), child, new)
    head = reshaped.classifier[1]
    reshaped.classifier[1] = nn.Linear(channels, head.out_features, bias=head.bias is not None, device=device)
    return reshaped


def _check_forward(model: CifarClassifier, image_size: int) -> None:
    """Raise ConfigError where a plan breaks a residual add (the one mismatch the chain walk cannot see)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    except RuntimeError as error:
        raise ConfigError(f"channel plan does not fit the model: {str(error).splitlines()[0]}") from error
    finally:
        model.train(was_training)
