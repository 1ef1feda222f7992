"""Structured channel pruning of a ``CifarClassifier`` with Torch-Pruning, and a plan to rebuild the result.

Torch-Pruning's dependency graph groups every channel that must go together (a residual add ties the
outputs of all convolutions feeding it; a depthwise convolution ties its input and output to the
convolution before it), so removing a group's channels keeps the network valid. Pruning is local: each
group loses a fraction of its channels, the least important ones within the group — the same fraction
everywhere, or one per stage (the network's convolutions grouped by the resolution of their output).

A pruned network is not a ``ModelConfig`` architecture, so ``channel_plan`` records its shape as one
tuple of ints (JSON-friendly) and ``apply_plan`` rebuilds it from a fresh model of the same config: a
checkpoint that stores the config and the plan loads without the teacher.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from kdsearch.config import Importance
from kdsearch.errors import ConfigError
from kdsearch.models.classifiers import CifarClassifier, count_flops, reshaped_copy

IMPORTANCES: dict[Importance, Callable[[], tp.importance.Importance]] = {
    Importance.L1: lambda: tp.importance.GroupMagnitudeImportance(p=1),
    Importance.L2: lambda: tp.importance.GroupMagnitudeImportance(p=2),
    Importance.RANDOM: tp.importance.RandomImportance,  # a baseline for the magnitude importances
    Importance.TAYLOR: tp.importance.GroupTaylorImportance,  # needs the loss's gradients: _taylor_gradients
}
TAYLOR_IMAGES = 256  # training images whose cross-entropy gradients rank channels for "taylor"

# Bisection steps on the ratio for a FLOPs target: a resolution of 2**-12, finer than one channel of
# the widest group of mobilenetv2_cifar (1280 channels at width 1, 1792 at width 1.4).
_BISECTION_STEPS = 12


def prune_classifier(
    model: CifarClassifier,
    *,
    ratio: float | None = None,
    flops_target: float | None = None,
    stage_ratios: tuple[float, ...] | None = None,
    importance: str = "l2",
    round_to: int | None = 8,
    seed: int = 0,
    image_size: int = 32,
    calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
    reference: nn.Module | None = None,
) -> CifarClassifier:
    """A pruned copy of ``model`` in the same mode and on the same device; ``model`` is unchanged.

    Give exactly one of ``ratio`` (the fraction of each group's channels to remove), ``flops_target``
    (the fraction of the model's FLOPs, as ``models.count_flops`` counts them, to keep) or
    ``stage_ratios`` (one ratio per stage, ``model_stages`` of them, 0 leaving a stage whole; a group
    belongs to the stage of the convolution that roots it). A FLOPs target
    is met by bisection on the ratio: the result is the one-shot pruning at the smallest ratio (to
    2**-12) whose FLOPs are within the target, so it is as large as the target allows and the same as
    some ``ratio=`` call (Torch-Pruning's iterative steps instead depend on the step size).

    ``round_to`` rounds each group's kept channels down to a multiple, as Torch-Pruning does, but never
    below ``round_to`` itself (a group narrower than that is left whole), so a group can lose more than
    ``ratio`` (rounding down) or less (the floor). Why: the teacher pruned at ratio 0.7 with ``None`` ran
    2.2x (batch 1) and 1.6x (batch 128) slower in ONNX Runtime (1 thread) than with ``round_to=8``, for
    6 % more FLOPs. ``None`` keeps floor(channels * (1 - ratio)), at least 1. The convolutions' input (the
    image's 3 channels) and the linear head's outputs (the classes) are never pruned; the surviving
    channels keep their weights. "l1"/"l2" are deterministic; "random" draws from ``seed``; "taylor" ranks
    by the gradients of cross-entropy on ``calibration`` (pixel images in [0, 1] and their labels).

    ``reference``: the unpruned network ``model`` is a step of (iterative pruning): ratios are then
    fractions of the reference's channels, so each step removes what the last one left over and the last
    step ends at the one-shot pruning's channel counts (its latency, measured before training, holds).
    """
    if sum(target is not None for target in (ratio, flops_target, stage_ratios)) != 1:
        raise ConfigError(
            f"give exactly one of ratio, flops_target and stage_ratios but got {ratio=}, {flops_target=}, {stage_ratios=}"
        )
    if importance == Importance.TAYLOR and calibration is None:
        raise ConfigError("importance taylor needs calibration images and labels (its gradients rank the channels)")
    if importance not in IMPORTANCES:
        raise ConfigError(f"unknown pruning importance {importance!r}; known: {', '.join(IMPORTANCES)}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ConfigError(f"round_to must be a positive integer or None but got {round_to!r}")
    if ratio is not None:
        _check_fraction("ratio", ratio)
    elif flops_target is not None:
        _check_fraction("flops_target", flops_target)
    if reference is not None and flops_target is not None:
        raise ConfigError("iterative pruning takes a ratio or stage_ratios, not flops_target")
    return _prune(
        model, ratio, flops_target, importance, round_to, seed, image_size, stage_ratios, calibration, reference
    )


def _prune(
    model: nn.Module,
    ratio: float | None,
    flops_target: float | None,
    importance: str,
    round_to: int | None,
    seed: int,
    image_size: int,
    stage_ratios: tuple[float, ...] | None = None,
    calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
    reference: nn.Module | None = None,
) -> nn.Module:
    pruned = copy.deepcopy(model).cpu().eval()  # eval: tracing runs a forward that must not move BN statistics
    for parameter in pruned.parameters():
        parameter.requires_grad_(True)  # Torch-Pruning traces the graph through autograd
    try:
        with torch.enable_grad():
            example = torch.zeros(1, 3, image_size, image_size)
            graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=example)
        # Only convolutions root a group, so the linear head's outputs (the classes) are never pruned.
        groups = list(graph.get_all_groups(root_module_types=[nn.Conv2d]))
        if flops_target is not None:
            ratio = _ratio_for_flops(pruned, graph, groups, flops_target, round_to, image_size)
        ratios = [ratio] * len(groups) if stage_ratios is None else _stage_of(pruned, groups, stage_ratios, image_size)
        widths = _reference_widths(pruned, groups, reference)
        if importance == Importance.TAYLOR:
            _taylor_gradients(pruned, *calibration)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            scorer = IMPORTANCES[importance]()
            # Rank every group on the unpruned network first, then prune: one-shot, as Torch-Pruning's pruners do.
            removals = []
            for group, group_ratio, width in zip(groups, ratios, widths, strict=True):
                channels, split = len(group[0][1]), _channel_split(group)
                if group_ratio <= 0 or channels % split:
                    continue
                kept = _kept_channels(width, group_ratio, round_to)
                kept = min(channels, max(split, kept - kept % split))
                if channels > kept:
                    removals.append((group, _least_important(scorer(group), channels - kept, split)))
        for group, indices in removals:
            group.prune(idxs=sorted(indices))
    except ConfigError:
        raise
    except Exception as error:  # inside Torch-Pruning: the model has a structure it does not handle
        raise _cannot_prune(model, error) from None
    _check_forward(model, pruned, example)
    return pruned.to(next(model.parameters()).device).train(model.training)


def _cannot_prune(model: nn.Module, error: Exception, where: str = "") -> ConfigError:
    name = type(getattr(model, "net", model)).__name__
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return ConfigError(f"Torch-Pruning cannot prune {name}{where}: {type(error).__name__}: {reason}")


def _check_forward(model: nn.Module, pruned: nn.Module, example: torch.Tensor) -> None:
    """One forward of the pruned model, whose failure names the layer it happened in. Why: Torch-Pruning
    prunes what it does not understand without a word (attention heads, whose reshapes then no longer fit:
    ViT, Swin, LeViT), and a study would otherwise fail at its first training step, after writing."""
    running: list[str] = []  # the modules whose forward has begun and not returned, outermost first
    names = {module: name for name, module in pruned.named_modules()}

    def begun(module: nn.Module, _) -> None:
        running.append(names[module])

    def returned(module: nn.Module, _, __) -> None:  # returning None keeps the module's output
        running.pop()

    hooks = [module.register_forward_pre_hook(begun) for module in names]
    hooks += [module.register_forward_hook(returned) for module in names]
    try:
        with torch.no_grad():
            pruned(example)
    except Exception as error:  # any failure of the pruned forward is the pruning's
        where = running[-1] if running and running[-1] else "its forward"
        raise _cannot_prune(model, error, f" (the pruned model fails in {where})") from None
    finally:
        for hook in hooks:
            hook.remove()


def _channel_split(group) -> int:
    """How many equal parts the group's channels fall into: the channel groups of the grouped (not
    depthwise) convolutions it feeds or is fed by (ResNeXt, RegNet), 1 where there are none."""
    split = 1
    for dependency, _ in group:
        module = dependency.target.module
        if isinstance(module, nn.Conv2d) and 1 < module.groups < module.in_channels:
            split = math.lcm(split, module.groups)
    return split


def _least_important(scores: torch.Tensor, removed: int, split: int) -> list[int]:
    """The ``removed`` channels of lowest score; in ``split`` equal parts, the same positions of every part
    (ranked by their summed score). Why: Torch-Pruning's convolution handler keeps a grouped convolution's
    input channels by the kept positions of its first group, so pruning that differs between groups indexes
    past the weights (what failed on every ResNeXt and RegNet before), as its own pruners also align."""
    if split == 1:
        return torch.argsort(scores, stable=True)[:removed].tolist()
    size = len(scores) // split
    positions = torch.argsort(scores.view(split, size).sum(0), stable=True)[: removed // split].tolist()
    return [part * size + position for part in range(split) for position in positions]


def _reference_widths(model: nn.Module, groups: list, reference: nn.Module | None) -> list[int]:
    """Each group's channels in ``reference`` (found by its root convolution's name), or in ``model``."""
    if reference is None:
        return [len(group[0][1]) for group in groups]
    names = {module: name for name, module in model.named_modules()}
    unpruned = dict(reference.named_modules())
    return [unpruned[names[group[0][0].target.module]].out_channels for group in groups]


def prune_epochs(steps: int, epochs: int, sparsity: bool) -> tuple[int, ...]:
    """The epochs (from 0) at whose start each of ``steps`` iterative pruning steps runs, spread evenly
    over the schedule: the first at epoch 0, or after the first 1/(steps+1) of it with sparsity training,
    which then has that long to drive the channels to go towards zero before the first is cut."""
    if sparsity:
        return tuple((step + 1) * epochs // (steps + 1) for step in range(steps))
    return tuple(step * epochs // steps for step in range(steps))


def step_target(
    ratio: float | None, stage_ratios: tuple[float, ...] | None, step: int, steps: int
) -> tuple[float | None, tuple[float, ...] | None]:
    """(ratio, stage_ratios) after ``step`` (from 0) of ``steps``: the final target's (step+1)/steps."""
    fraction = (step + 1) / steps
    if stage_ratios is not None:
        return None, tuple(r * fraction for r in stage_ratios)
    return ratio * fraction, None


class GroupLasso:
    """Sparsity training: Torch-Pruning's group-lasso penalty (``GroupNormPruner.regularize``: each
    group's gradient grows by ``strength`` x its weights, scaled up to 16x for the groups of lowest norm)
    on every convolution-rooted group of ``model``, applied after each backward pass. The groups are
    traced once, so a pruning step needs a new one."""

    def __init__(self, model: nn.Module, strength: float, image_size: int):
        training = model.training
        model.eval()  # tracing runs a forward that must not move BN statistics
        try:
            with torch.enable_grad():
                example = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)
                self._pruner = tp.pruner.GroupNormPruner(
                    model,
                    example,
                    importance=tp.importance.GroupMagnitudeImportance(p=2),
                    reg=strength,
                    root_module_types=[nn.Conv2d],
                )
        finally:
            model.train(training)

    def __call__(self, model: nn.Module) -> None:
        self._pruner.regularize(model)


def _output_sizes(model: nn.Module, image_size: int) -> dict[nn.Module, int]:
    """Each convolution's output resolution (height) on one image of ``image_size``."""
    sizes, hooks = {}, []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(lambda m, _, out: sizes.__setitem__(m, out.shape[-2])))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def model_stages(model: nn.Module, image_size: int = 32) -> int:
    """How many stages ``stage_ratios`` addresses: the distinct output resolutions of its convolutions."""
    return len(set(_output_sizes(model, image_size).values()))


def _stage_of(model: nn.Module, groups: list, stage_ratios: tuple[float, ...], image_size: int) -> list[float]:
    """Each group's ratio: that of the stage (rank of its root convolution's output resolution, highest
    first) it belongs to."""
    sizes = _output_sizes(model, image_size)
    resolutions = sorted(set(sizes.values()), reverse=True)
    if len(stage_ratios) != len(resolutions):
        raise ConfigError(
            f"stage_ratios gives {len(stage_ratios)} ratios but the model has {len(resolutions)} stages "
            f"(convolution outputs at {', '.join(f'{r}x{r}' for r in resolutions)})"
        )
    return [stage_ratios[resolutions.index(sizes[group[0][0].target.module])] for group in groups]


def _taylor_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Leaves the gradients of the mean cross-entropy on ``images`` in ``model``'s parameters, for
    Torch-Pruning's Taylor importance (|weight x gradient|). BatchNorm uses its running statistics."""
    model.zero_grad()
    with torch.enable_grad():
        for start in range(0, len(labels), 64):
            batch, batch_labels = images[start : start + 64], labels[start : start + 64]
            loss = F.cross_entropy(model(batch), batch_labels, reduction="sum") / len(labels)
            loss.backward()


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ConfigError(f"{name} must be in (0, 1) but got {value!r}")


def _kept_channels(channels: int, ratio: float, round_to: int | None) -> int:
    # The epsilon keeps float error from dropping a channel (100 * (1 - 0.29) is 70.99999...).
    kept = max(1, math.floor(channels * (1 - ratio) + 1e-9))
    if round_to is None:
        return kept
    return min(channels, max(round_to, kept - kept % round_to))


def _ratio_for_flops(
    model: CifarClassifier,
    graph: tp.DependencyGraph,
    groups: list,
    flops_target: float,
    round_to: int | None,
    image_size: int,
) -> float:
    """The smallest ratio (to 2**-12) whose pruned model keeps at most ``flops_target`` of the FLOPs.

    Kept counts depend only on the ratio and each group's width, not on which channels go, so each step
    prices a channel plan (the unpruned copy reshaped, then ``count_flops``: ~0.1 s for the teacher on
    2 CPU cores; the meta device was no faster) and the groups are pruned once, afterwards. FLOPs
    fall monotonically as the ratio grows. A model that is not a chain of convolutions (a sourced one:
    ResNets' shortcuts, concatenations) is priced by pruning a copy at each step instead.
    """
    if not isinstance(model, CifarClassifier):

        def pruned_flops(ratio: float) -> int:
            return count_flops(_prune(model, min(ratio, 1.0), None, "l2", round_to, 0, image_size), image_size)

        return _bisect(pruned_flops, count_flops(model, image_size), flops_target, round_to)
    names = {module: name for name, module in model.features.named_modules()}
    widths = {}  # conv name -> channels of the group its outputs belong to
    for group in groups:
        for dependency, _ in group:
            if isinstance(dependency.target.module, nn.Conv2d) and graph.is_out_channel_pruning_fn(dependency.handler):
                widths[names[dependency.target.module]] = len(group[0][1])
    convs = [name for name, module in model.features.named_modules() if isinstance(module, nn.Conv2d)]

    def flops_at(ratio: float) -> int:
        plan = [_kept_channels(widths[name], ratio, round_to) for name in convs]
        return count_flops(reshaped_copy(model, plan), image_size)  # the plan is valid: no forward check

    return _bisect(flops_at, count_flops(model, image_size), flops_target, round_to)


def _bisect(flops_at, full: int, flops_target: float, round_to: int | None) -> float:
    """The smallest ratio (to 2**-12) at which ``flops_at(ratio)`` is within ``flops_target`` of ``full``."""
    floor = flops_at(1.0)  # every group at its narrowest
    if floor > flops_target * full:
        raise ConfigError(
            f"flops_target={flops_target} is out of reach: pruning keeps at least {floor / full:.4f} of the FLOPs ({round_to=})"
        )
    low, high = 0.0, 1.0
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        if flops_at(middle) <= flops_target * full:
            high = middle
        else:
            low = middle
    return high
