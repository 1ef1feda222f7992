"""Attribution maps of the teacher (Captum), precomputed once per training set and cached.

The methods (``METHODS``, keyed by ``AttributionMethod``): ``integrated_gradients`` (the paper's, the
default), ``saliency``, ``input_x_gradient``, ``smoothgrad`` (NoiseTunnel over Saliency), ``gradient_shap``,
``deeplift`` and ``grad_cam`` (LayerGradCam of a convolutional stage). The map of an image is the sum over
channels of |attribution| of the teacher's logit for the true label, taken with respect to pixel values in
[0, 1] (the model normalises inside ``forward``), on the clean, un-augmented training image; for
``grad_cam`` it is the class activation map (ReLU'd) upsampled bilinearly to the image. Maps are stored
float16, (N, H, W), in the training split's index order.

Baselines of IG, DeepLift and GradientShap (what "absence of signal" means):
- ``black``: pixel value 0 in every channel — the paper's "typically black" baseline. After the
  model's normalisation it is (0 - mean) / std, not 0.
- ``mean``: the per-channel mean pixel of the training split: a grey-brown image carrying no
  structure; attributions then measure deviation from the average image rather than from darkness,
  so dark objects are not ignored.
- ``zeros_normalized``: the pixel value that the model's normalisation maps to 0 (its configured mean;
  for a model without normalisation, black). Equal to ``mean`` when the normalisation constants are the
  training set's own statistics.

Every method runs on the same fast copy of the teacher: BatchNorm folded into its convolutions,
parameters frozen (input gradients only), channels_last, large calls, bf16 autocast where the hardware
runs it natively (``IGConfig.precision``).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdsearch.config import (
    AttributionConfig,
    AttributionMethod,
    IGBaseline,
    IGConfig,
    TrainConfig,
    choice,
    replace,
    to_dict,
)
from kdsearch.data.datasets import Splits
from kdsearch.errors import ConfigError
from kdsearch.infra.allocator import reuse_freed_memory
from kdsearch.infra.cpu_load import OtherProcesses
from kdsearch.infra.cpu_share import machine_share, share_threads
from kdsearch.infra.device import device_name, resolve_precision
from kdsearch.infra.tensor_cache import Artifact, TensorCache
from kdsearch.models.classifiers import CifarClassifier, fold_batchnorm, weights_hash
from kdsearch.models.depthwise import with_fp32_depthwise_backward

log = logging.getLogger(__name__)

CHUNK_IMAGES = 1024  # images per resumable chunk of a map cache
MIN_OUTPUT_DIFFERENCE = 1e-3  # logit units: below it, an image's relative completeness error is undefined
IG = AttributionMethod.INTEGRATED_GRADIENTS


def _black(model: CifarClassifier, splits: Splits) -> torch.Tensor:
    return torch.zeros(1, 3, 1, 1)


def _mean(model: CifarClassifier, splits: Splits) -> torch.Tensor:
    return (splits.train_images.float().mean(dim=(0, 2, 3)) / 255).view(1, 3, 1, 1)


def _zeros_normalized(model: CifarClassifier, splits: Splits) -> torch.Tensor:
    return model.input_mean.detach().cpu().clone()


BASELINES: dict[IGBaseline, Callable[[CifarClassifier, Splits], torch.Tensor]] = {
    IGBaseline.BLACK: _black,
    IGBaseline.MEAN: _mean,
    IGBaseline.ZEROS_NORMALIZED: _zeros_normalized,
}


@dataclass(frozen=True)
class Attribution:
    """What a model's maps are computed with: the method, IG's settings (whose baseline, precision and
    batch sizes the other methods use too) and the other methods' settings."""

    method: str = IG.value  # an AttributionMethod
    ig: IGConfig = field(default_factory=IGConfig)
    settings: AttributionConfig = field(default_factory=AttributionConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", choice("attribution method", self.method, AttributionMethod))

    @classmethod
    def of(cls, config: TrainConfig, method: str | None = None) -> Attribution:
        """``config``'s settings for ``method`` (default: the overlay's)."""
        return cls(method or config.overlay.method, config.ig, config.attribution)


def resolve_ig_precision(config: IGConfig, device: torch.device) -> IGConfig:
    """``precision: auto`` made concrete for ``device``, so cache keys and metadata say what was computed."""
    # Attributions never use fp16: IG's path integral of small gradients underflows without a loss scaler.
    dtype = resolve_precision(config.precision, device, fp16_fallback=False)
    return replace(config, precision="bf16" if dtype == torch.bfloat16 else "fp32")


# --- the methods -------------------------------------------------------------------------------
# Each gives (attributions (B, C, H, W), the per-image convergence delta or None) for pixel images in
# [0, 1]; ``explain`` turns them into maps (B, H, W) and relative completeness errors.


def _expanded(baseline: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return baseline.to(images.device).expand_as(images).contiguous(memory_format=torch.channels_last)


def _integrated_gradients(model, images, labels, baseline, attribution: Attribution):
    from captum.attr import IntegratedGradients

    config = attribution.ig
    return IntegratedGradients(model).attribute(
        images,
        baselines=_expanded(baseline, images),
        target=labels,
        n_steps=config.n_steps,
        method=config.method,
        internal_batch_size=config.internal_batch_size,
        return_convergence_delta=True,
    )


def _saliency(model, images, labels, baseline, attribution: Attribution):
    from captum.attr import Saliency

    return Saliency(model).attribute(images, target=labels), None


def _input_x_gradient(model, images, labels, baseline, attribution: Attribution):
    from captum.attr import InputXGradient

    return InputXGradient(model).attribute(images, target=labels), None


def _smoothgrad(model, images, labels, baseline, attribution: Attribution):
    from captum.attr import NoiseTunnel, Saliency

    settings = attribution.settings
    # abs=False: SmoothGrad averages the signed gradients; the map takes |mean| (Smilkov et al. 2017).
    gradients = NoiseTunnel(Saliency(model)).attribute(
        images, nt_type="smoothgrad", nt_samples=settings.samples, stdevs=settings.sigma, target=labels, abs=False
    )
    return gradients, None


def _gradient_shap(model, images, labels, baseline, attribution: Attribution):
    from captum.attr import GradientShap

    settings = attribution.settings
    attributions, delta = GradientShap(model).attribute(
        images,
        baselines=_expanded(baseline, images[:1]),  # a distribution of one: the configured baseline
        n_samples=settings.samples,
        stdevs=settings.sigma,
        target=labels,
        return_convergence_delta=True,
    )
    # Captum gives one delta per noisy sample, ordered by image; their mean is the delta of the averaged
    # attributions against the averaged output difference.
    return attributions, delta.view(len(images), settings.samples).mean(dim=1)


def _deeplift(model, images, labels, baseline, attribution: Attribution):
    from captum.attr import DeepLift

    return DeepLift(model).attribute(
        images, baselines=_expanded(baseline, images), target=labels, return_convergence_delta=True
    )


def _grad_cam(model, images, labels, baseline, attribution: Attribution):
    from captum.attr import LayerAttribution, LayerGradCam

    layer = dict(model.named_modules())[attribution.settings.layer]
    cam = LayerGradCam(model, layer).attribute(images, target=labels, relu_attributions=True)
    return LayerAttribution.interpolate(cam, tuple(images.shape[-2:]), interpolate_mode="bilinear"), None


class _ReLU6AsReLUs(nn.Module):
    """ReLU6(x) = ReLU(x) - ReLU(x - 6): the same function in two ReLUs, each used once.

    Why: Captum's DeepLift has a rescale rule for ReLU but treats ReLU6 (MobileNetV2's activation) as
    linear, which breaks completeness (a 60-170 % relative error on tiny_cnn, a median 180 % on the
    CIFAR-10 teacher); the rescale multipliers of the two ReLUs sum to ReLU6's own, so this is DeepLift's
    rescale rule for ReLU6. The first ReLU gets a copy of x: DeepLift replaces the gradient of each
    nonlinearity's input tensor, which would otherwise also swallow the gradient through x - 6.
    """

    def __init__(self) -> None:
        super().__init__()
        self.low, self.high = nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.low(x.clone()) - self.high(x - 6)


def _split_relu6(model: nn.Module) -> None:
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(module, name, _ReLU6AsReLUs())


@dataclass(frozen=True)
class Method:
    """How one method is computed, what its maps depend on, and how many passes an image costs."""

    attribute: Callable  # (model, images, labels, baseline, attribution) -> (attributions, delta or None)
    settings: tuple[str, ...]  # the settings (``_setting``) its maps depend on: its cache key holds them
    passes: Callable[[Attribution], int] = lambda attribution: 1  # forward-backward passes per image
    random: bool = False  # draws noise or baselines: seeded per call, so its call size is part of the key
    prepare: Callable[[nn.Module], None] | None = None  # changes a copy of the model before it is explained
    # Raises a one-line ConfigError where it cannot explain the model: (model, attribution, image size or None).
    check: Callable[[nn.Module, Attribution, int | None], None] | None = None


def _check_layer(model: nn.Module, attribution: Attribution, image_size: int | None) -> None:
    modules, layer = dict(model.named_modules()), attribution.settings.layer
    if layer is not None and layer not in modules:
        close = difflib.get_close_matches(layer, [name for name in modules if name], n=3)
        hint = f"; close: {close}" if close else ""
        last = f"; the last stage is {default_layer(model, image_size)!r}" if image_size is not None else ""
        raise ConfigError(f"grad_cam layer {layer!r} is not a module of the teacher{hint}{last}")
    if image_size is None:
        return
    if layer is None:
        default_layer(model, image_size)
        return
    outputs = []

    def record(module, inputs, output) -> None:
        if module is modules[layer]:
            outputs.append(tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__)

    _probe(model, image_size, record)
    if not outputs or not (isinstance(outputs[-1], tuple) and len(outputs[-1]) == 4):
        got = outputs[-1] if outputs else "nothing (it is not run)"
        raise ConfigError(f"grad_cam layer {layer!r} gives {got}, not a feature map (N, C, H, W)")


def _check_deeplift(model: nn.Module, attribution: Attribution, image_size: int | None) -> None:
    from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR  # the modules DeepLift has a rule for

    model = explainable(copy.deepcopy(model), attribution)
    activations = torch.nn.modules.activation
    for name, module in model.named_modules():
        if type(module).__module__ == activations.__name__ and type(module) not in SUPPORTED_NON_LINEAR:
            raise ConfigError(
                f"deeplift: Captum's DeepLift has no rule for {type(module).__name__} ({name}) and would treat it as "
                "linear, so its maps would not sum to the output difference; pick another method"
            )
    if image_size is None:
        return
    calls: dict[nn.Module, int] = {}
    _probe(model, image_size, lambda module, inputs, output: calls.__setitem__(module, calls.get(module, 0) + 1))
    names = {module: name for name, module in model.named_modules()}
    reused = [names[m] for m, count in calls.items() if count > 1 and type(m) in SUPPORTED_NON_LINEAR]
    if reused:
        raise ConfigError(
            f"deeplift: the teacher uses {reused[0]!r} more than once in its forward, which Captum's DeepLift "
            "cannot explain (it keeps one input per module); pick another method"
        )


METHODS: dict[AttributionMethod, Method] = {
    AttributionMethod.INTEGRATED_GRADIENTS: Method(_integrated_gradients, ("baseline", "precision")),
    AttributionMethod.SALIENCY: Method(_saliency, ("precision",)),
    AttributionMethod.INPUT_X_GRADIENT: Method(_input_x_gradient, ("precision",)),
    AttributionMethod.SMOOTHGRAD: Method(
        _smoothgrad,
        ("precision", "samples", "sigma", "call_images"),
        passes=lambda attribution: attribution.settings.samples,
        random=True,
    ),
    AttributionMethod.GRADIENT_SHAP: Method(
        _gradient_shap,
        ("baseline", "precision", "samples", "sigma", "call_images"),
        passes=lambda attribution: attribution.settings.samples,
        random=True,
    ),
    # Two passes per image: Captum runs the image and its baseline in one batch.
    AttributionMethod.DEEPLIFT: Method(
        _deeplift, ("baseline", "precision"), passes=lambda attribution: 2, prepare=_split_relu6, check=_check_deeplift
    ),
    AttributionMethod.GRAD_CAM: Method(_grad_cam, ("precision", "layer"), check=_check_layer),
}


def images_per_call(attribution: Attribution) -> int:
    """Images given to one Captum call: IG's ``images_per_call`` (Captum batches its interpolation steps by
    ``internal_batch_size``); the other methods fill ``internal_batch_size`` passes at once."""
    if attribution.method == IG:
        return attribution.ig.images_per_call
    return max(1, attribution.ig.internal_batch_size // METHODS[attribution.method].passes(attribution))


def _setting(attribution: Attribution, name: str):
    """A setting by name: IG's baseline and precision, the other methods' own, or the images per call."""
    if name == "call_images":
        return images_per_call(attribution)
    return getattr(attribution.ig if name in ("baseline", "precision") else attribution.settings, name)


def method_settings(attribution: Attribution) -> dict:
    """The settings ``attribution``'s maps depend on (for IG, today's cache key's)."""
    if attribution.method == IG:
        # Batching settings change speed, not values, so they are not part of the key.
        return {k: v for k, v in to_dict(attribution.ig).items() if k not in ("internal_batch_size", "images_per_call")}
    return {name: _setting(attribution, name) for name in METHODS[attribution.method].settings}


# --- explaining a model ------------------------------------------------------------------------


def _relative_error(attributions: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """|sum(attribution) - (F(x) - F(x'))| / |F(x) - F(x')| per image, from Captum's convergence delta;
    NaN where |F(x) - F(x')| < MIN_OUTPUT_DIFFERENCE: there the ratio measures rounding, not the method,
    and one such image would swamp a mean."""
    output_difference = attributions.sum(dim=(1, 2, 3)) - delta  # F(x) - F(x') for the target logit
    relative_error = delta.abs() / output_difference.abs()
    relative_error[output_difference.abs() < MIN_OUTPUT_DIFFERENCE] = float("nan")
    return relative_error


def explain(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, baseline: torch.Tensor, attribution: Attribution
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(maps (B, H, W) float32, relative completeness errors (B,) or None) for pixel images in [0, 1].

    ``model`` is ready for the method (``explainable``); a grad_cam layer is resolved (``with_layer``).
    The completeness error is that of IG, DeepLift and GradientShap (0: the attributions sum exactly to
    F(x) - F(baseline)); the other methods have none.
    """
    device = images.device
    attribution = replace(attribution, ig=resolve_ig_precision(attribution.ig, device))
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if attribution.ig.precision == "bf16"
        else nullcontext()
    )
    with autocast:
        attributions, delta = METHODS[attribution.method].attribute(model, images, labels, baseline, attribution)
    attributions = attributions.detach().float()  # LayerGradCam's upsampled map still tracks its graph
    maps = attributions.abs().sum(dim=1)
    return maps, None if delta is None else _relative_error(attributions, delta.float())


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Captum draws SmoothGrad's noise from torch's global generator and GradientShap's path points from
    numpy's: both seeded here, and restored after, so that a map does not depend on what ran before."""
    state = np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(state)


def maps_in_calls(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    baseline: torch.Tensor,
    attribution: Attribution,
    on_call: Callable[[int], object] | None = None,
    first_index: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``explain`` over uint8 ``images`` in calls of ``images_per_call``, on the model's device; (maps
    (N, H, W) float32, relative completeness errors (N,) or None) on the CPU. A random method's call is
    seeded by its first image's index in the split (``first_index`` is that of ``images[0]``)."""
    device = next(model.parameters()).device
    step, random = images_per_call(attribution), METHODS[attribution.method].random
    maps, errors, share = [], [], machine_share()
    reuse_freed_memory()
    for start in range(0, len(labels), step):
        batch = images[start : start + step].to(device).float().div_(255)
        with share.step(), _seeded(first_index + start, device) if random else nullcontext():
            batch_maps, batch_errors = explain(
                model,
                batch.contiguous(memory_format=torch.channels_last),
                labels[start : start + step].to(device),
                baseline,
                attribution,
            )
        maps.append(batch_maps.cpu())
        if batch_errors is not None:
            errors.append(batch_errors.cpu())
        if on_call is not None:
            on_call(len(batch))
    return torch.cat(maps), torch.cat(errors) if errors else None


def explainable(model: nn.Module, attribution: Attribution) -> nn.Module:
    """``model`` (changed in place: give a copy) made ready for the method: eval mode, parameters frozen
    (input gradients only), channels_last, strided depthwise convolutions with an fp32 backward pass under
    bf16 (models.depthwise), and what the method needs (DeepLift: ReLU6 as two ReLUs)."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    prepare = METHODS[attribution.method].prepare
    if prepare is not None:
        prepare(model)
    with_fp32_depthwise_backward(model)
    return model.to(memory_format=torch.channels_last)


def maps_on(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, splits: Splits, attribution: Attribution
) -> torch.Tensor:
    """Maps (N, H, W) float32 of any ``model`` (a student) for uint8 images and their true labels; a grad_cam
    layer left unset is the model's own last stage."""
    model = explainable(copy.deepcopy(model), attribution)
    attribution = with_layer(attribution, model, splits.image_size)
    maps, _ = maps_in_calls(model, images, labels, BASELINES[attribution.ig.baseline](model, splits), attribution)
    return maps


# --- grad_cam's layer, and what a model can be explained with ------------------------------------


def default_layer(model: nn.Module, image_size: int) -> str:
    """The model's last convolutional stage: the last module, in the order its forward finishes them, whose
    output is a feature map larger than 1x1 (a built-in model's ``features``, a ResNet's ``layer4``)."""
    names = {module: name for name, module in model.named_modules() if name}
    finished: list[str] = []

    def record(module, inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-2] * output.shape[-1] > 1:
            finished.append(names[module])

    _probe(model, image_size, record)
    if not finished:
        raise ConfigError(
            f"grad_cam: no module of the teacher gives a feature map larger than 1x1 on {image_size}-pixel images; "
            "name one with attribution.layer (--layer)"
        )
    return finished[-1]


def _probe(model: nn.Module, image_size: int, hook: Callable) -> None:
    """One forward of a blank batch with ``hook`` on every module (then removed)."""
    handles = [module.register_forward_hook(hook) for name, module in model.named_modules() if name]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, 3, image_size, image_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def with_layer(attribution: Attribution, model: nn.Module, image_size: int) -> Attribution:
    """grad_cam with its layer named (the default resolved for ``model``), so that the cache key says
    which; other methods as they are."""
    if attribution.method != AttributionMethod.GRAD_CAM or attribution.settings.layer is not None:
        return attribution
    return replace(attribution, settings=replace(attribution.settings, layer=default_layer(model, image_size)))


def check_method(model: nn.Module, attribution: Attribution, image_size: int | None) -> None:
    """Raise a one-line ConfigError where ``attribution`` cannot explain ``model`` (on any device, ``meta``
    included): a grad_cam layer that does not exist or gives no feature map, a model Captum's DeepLift would
    explain wrongly. Without ``image_size`` only what needs no forward pass is checked."""
    check = METHODS[attribution.method].check
    if check is not None:
        check(model, attribution, image_size)


# --- the cache ---------------------------------------------------------------------------------


def ig_cache_fields(teacher: CifarClassifier, splits: Splits, config: IGConfig) -> dict:
    return {
        "teacher": weights_hash(teacher),
        "data": splits.fingerprint,
        "ig": method_settings(Attribution(ig=config)),
    }


def cache_fields(teacher: nn.Module, splits: Splits, attribution: Attribution) -> tuple[str, dict]:
    """(cache kind, key fields) of ``attribution``'s maps of ``teacher``'s training split, keyed by the
    teacher's own weights. IG keeps the kind and fields it had before the other methods existed, so its
    caches made then are found."""
    if attribution.method == IG:
        return "ig", ig_cache_fields(teacher, splits, attribution.ig)
    fields = {"teacher": weights_hash(teacher), "data": splits.fingerprint, "method": attribution.method}
    return "attribution", {**fields, "settings": method_settings(attribution)}


def resolved(attribution: Attribution, teacher: nn.Module, splits: Splits, device: torch.device) -> Attribution:
    """``attribution`` with what ``auto`` and defaults become here: the precision, grad_cam's layer."""
    attribution = replace(attribution, ig=resolve_ig_precision(attribution.ig, device))
    return with_layer(attribution, teacher, splits.image_size)


def attribution_maps(
    teacher: CifarClassifier,
    splits: Splits,
    attribution: Attribution,
    cache_dir: str | Path,
    device: torch.device,
    progress: bool = True,
) -> Artifact:
    """The map cache of this method, teacher and training split: computed once (resumably), then loaded.

    ``artifact.tensors["maps"]`` is (N, H, W) float16 in training-split order; ``artifact.meta`` holds
    the method, its settings, its cost (maps per second where it was computed) and, for IG, DeepLift and
    GradientShap, the completeness statistics.
    """
    from tqdm import tqdm

    attribution = resolved(attribution, teacher, splits, device)
    kind, fields = cache_fields(teacher, splits, attribution)
    baseline = BASELINES[attribution.ig.baseline](teacher, splits)
    fast_teacher = explainable(fold_batchnorm(teacher), attribution).to(device)
    method = attribution.method
    label = "IG" if method == IG else method  # what logs and progress bars call the maps

    def build(scratch: Path):
        share_threads()
        count = len(splits.train_labels)
        chunk_starts = range(0, count, CHUNK_IMAGES)
        done = sum(min(CHUNK_IMAGES, count - s) for s in chunk_starts if (scratch / f"chunk_{s:08d}.pt").exists())
        if not progress:
            log.info(
                "computing %s maps: %d of %d training images to go (%s) on %s, into %s",
                label,
                count - done,
                count,
                ", ".join(f"{k} {v}" for k, v in method_settings(attribution).items()),
                device,
                scratch.parent,
            )
        seconds = 0.0
        with tqdm(total=count, initial=done, desc=f"{label} maps", unit="img", disable=not progress) as bar:
            for start in chunk_starts:
                chunk_path = scratch / f"chunk_{start:08d}.pt"
                if chunk_path.exists():
                    continue
                stop = min(start + CHUNK_IMAGES, count)
                began = time.perf_counter()
                with OtherProcesses() as others:
                    maps, errors = maps_in_calls(
                        fast_teacher,
                        splits.train_images[start:stop],
                        splits.train_labels[start:stop],
                        baseline,
                        attribution,
                        on_call=bar.update,
                        first_index=start,
                    )
                share_threads(others.cores)
                seconds += time.perf_counter() - began
                tmp = chunk_path.with_name(chunk_path.name + ".tmp")
                torch.save({"maps": maps.half(), **({"errors": errors} if errors is not None else {})}, tmp)
                tmp.replace(chunk_path)
        maps, chunk_errors = None, []
        for start in chunk_starts:
            chunk = torch.load(scratch / f"chunk_{start:08d}.pt", mmap=True, weights_only=True)
            if maps is None:
                # Assembled in a file-backed tensor, a chunk at a time: at 224 pixels 50,000 maps are 5 GB, which
                # concatenating the chunks would hold in memory (twice, with the chunks); the page cache holds
                # them instead, and the cache file is written from it.
                shape = (count, *chunk["maps"].shape[1:])
                maps = torch.from_file(
                    str(scratch / "maps.bin"), shared=True, size=math.prod(shape), dtype=chunk["maps"].dtype
                ).view(shape)
            maps[start : start + len(chunk["maps"])] = chunk["maps"]
            if "errors" in chunk:
                chunk_errors.append(chunk["errors"])
        tensors = {"maps": maps}
        meta = {
            "method": method,
            "settings": to_dict(attribution.ig) if method == IG else method_settings(attribution),
            "images": count,
            "cost": _cost(count - done, seconds, device),
        }
        if chunk_errors:
            errors = torch.cat(chunk_errors)
            tensors["relative_error"] = errors
            meta["completeness_relative_error"] = {
                "mean": errors.nanmean().item(),
                "median": errors.nanmedian().item(),
                "p95": errors.nanquantile(0.95).item(),
                "undefined_images": int(errors.isnan().sum()),  # |F(x) - F(baseline)| < MIN_OUTPUT_DIFFERENCE
            }
        return tensors, meta

    return TensorCache(cache_dir).get_or_build(kind, fields, build)


def _cost(images: int, seconds: float, device: torch.device) -> dict:
    """What the maps computed in this build cost, where (a resumed build counts its own images only)."""
    return {
        "maps_per_s": images / seconds if images and seconds > 0 else None,
        "images": images,
        "seconds": round(seconds, 3),
        "device": device_name(device),
    }


def map_ms(artifact: Artifact) -> float | None:
    """Milliseconds per map where the cache was computed; None for a cache from before costs were recorded."""
    rate = artifact.meta.get("cost", {}).get("maps_per_s")
    return 1000 / rate if rate else None


def find_maps(teacher: nn.Module, splits: Splits, attribution: Attribution, cache_dir: str | Path) -> Artifact | None:
    """The cache of ``attribution``'s maps where this machine has it; with ``precision: auto`` either
    precision's (the machine that computed it resolved ``auto`` for itself)."""
    precisions = ("bf16", "fp32") if attribution.ig.precision == "auto" else (attribution.ig.precision,)
    store = TensorCache(cache_dir)
    for precision in precisions:
        concrete = replace(attribution, ig=replace(attribution.ig, precision=precision))
        found = store.load(*cache_fields(teacher, splits, with_layer(concrete, teacher, splits.image_size)))
        if found is not None:
            return found
    return None


def maps_of(
    teacher: nn.Module,
    splits: Splits,
    attribution: Attribution,
    index: torch.Tensor,
    cache_dir: str | Path,
    device: torch.device,
) -> tuple[torch.Tensor, str]:
    """(maps (len(index), H, W) float32 of the training images ``index``, where they came from): from the
    cache where this machine has it, else computed now for these images alone (seconds, not the cache's
    minutes; a random method's noise is then drawn as for a call of one image)."""
    cache = find_maps(teacher, splits, attribution, cache_dir)
    if cache is not None:
        return cache.tensors["maps"][index].float(), f"from the cache {cache.path.name}"
    attribution = resolved(attribution, teacher, splits, device)
    model = explainable(fold_batchnorm(teacher), attribution).to(device)
    baseline = BASELINES[attribution.ig.baseline](teacher, splits)
    maps = [
        maps_in_calls(
            model, splits.train_images[i : i + 1], splits.train_labels[i : i + 1], baseline, attribution, first_index=i
        )[0]
        for i in index.tolist()
    ]
    return torch.cat(maps), "computed now (no cache of them here)"


def ig_maps(
    teacher: CifarClassifier,
    splits: Splits,
    config: IGConfig,
    cache_dir: str | Path,
    device: torch.device,
    progress: bool = True,
) -> Artifact:
    """The IG cache (``attribution_maps`` of integrated_gradients with ``config``)."""
    return attribution_maps(teacher, splits, Attribution(ig=config), cache_dir, device, progress)


# --- pictures ------------------------------------------------------------------------------------


def _min_max(map_: torch.Tensor) -> torch.Tensor:
    return (map_ - map_.min()) / (map_.max() - map_.min()).clamp_min(1e-12)


def heat(map_: torch.Tensor) -> torch.Tensor:
    """(H, W) non-negative map → (3, H, W) in [0, 1], black→red→yellow→white ("hot"), min-max scaled."""
    scaled = _min_max(map_)
    return torch.stack([(3 * scaled).clamp(0, 1), (3 * scaled - 1).clamp(0, 1), (3 * scaled - 2).clamp(0, 1)])


def attribution_panel(image: torch.Tensor, maps: dict[str, torch.Tensor], scale: int = 8):
    """A PIL image of one uint8 image (3, H, W) and its maps by method, in one row: the original, then each
    method's map and overlay (Eq. 7 with s = 1); with several methods a caption names each pair."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    pixels = image.float() / 255
    tiles = [pixels]
    for map_ in maps.values():
        tiles += [heat(map_.float()), 0.5 * pixels + 0.5 * _min_max(map_.float()).expand(3, -1, -1)]
    grid = make_grid(torch.stack(tiles), nrow=len(tiles), padding=1, pad_value=1.0)
    upscaled = torch.nn.functional.interpolate(grid.unsqueeze(0), scale_factor=scale, mode="nearest")[0]
    picture = Image.fromarray((upscaled.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    if len(maps) < 2:
        return picture
    font = ImageFont.load_default(size=3 * scale)
    caption = 5 * scale  # pixels above the tiles
    framed = Image.new("RGB", (picture.width, picture.height + caption), "white")
    framed.paste(picture, (0, caption))
    draw = ImageDraw.Draw(framed)
    tile = (image.shape[-1] + 1) * scale  # a tile with its padding, in output pixels
    draw.text((tile // 2, caption // 2), "image", fill="black", font=font, anchor="mm")
    for position, method in enumerate(maps):
        draw.text((tile * (2 + 2 * position), caption // 2), method, fill="black", font=font, anchor="mm")
    return framed
