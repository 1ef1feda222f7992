"""Integrated Gradients maps of the teacher (Captum), precomputed once per training set and cached.

The map of an image is sum over channels of |IG| of the teacher's logit for the true label, with IG
taken with respect to pixel values in [0, 1] (the model normalises inside ``forward``), on the clean,
un-augmented training image. Maps are stored float16, (N, H, W), in the training split's index order.

Baselines (what "absence of signal" means for the path integral):
- ``black``: pixel value 0 in every channel — the paper's "typically black" baseline. After the
  model's normalisation it is (0 - mean) / std, not 0.
- ``mean``: the per-channel mean pixel of the training split: a grey-brown image carrying no
  structure; attributions then measure deviation from the average image rather than from darkness,
  so dark objects are not ignored.
- ``zeros_normalized``: the pixel value that the model's normalisation maps to 0 (its configured mean;
  for a model without normalisation, black). Equal to ``mean`` when the normalisation constants are the
  training set's own statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from kdsearch.config import IGBaseline, IGConfig, replace, to_dict
from kdsearch.data.datasets import Splits
from kdsearch.infra.cpu_share import machine_share
from kdsearch.infra.device import resolve_precision
from kdsearch.infra.tensor_cache import Artifact, TensorCache
from kdsearch.models.classifiers import CifarClassifier, fold_batchnorm, weights_hash

log = logging.getLogger(__name__)

CHUNK_IMAGES = 1024  # images per resumable chunk of the IG cache
MIN_OUTPUT_DIFFERENCE = 1e-3  # logit units: below it, an image's relative completeness error is undefined


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


def resolve_ig_precision(config: IGConfig, device: torch.device) -> IGConfig:
    """``precision: auto`` made concrete for ``device``, so cache keys and metadata say what was computed."""
    # IG never uses fp16: its path integral of small gradients underflows without a loss scaler.
    dtype = resolve_precision(config.precision, device, fp16_fallback=False)
    return replace(config, precision="bf16" if dtype == torch.bfloat16 else "fp32")


def integrated_gradients(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, baseline: torch.Tensor, config: IGConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps (B, H, W) float32, relative completeness error (B,)) for pixel images in [0, 1].

    The relative completeness error is |sum(IG) - (F(x) - F(x'))| / |F(x) - F(x')|, from Captum's
    convergence delta; 0 is an exact path integral. It is NaN for an image whose target logit hardly
    differs between x and the baseline (|F(x) - F(x')| < MIN_OUTPUT_DIFFERENCE): there the ratio
    measures rounding, not the integration, and one such image would swamp a mean.
    """
    from captum.attr import IntegratedGradients

    device = images.device
    config = resolve_ig_precision(config, device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if config.precision == "bf16" else nullcontext()
    )
    with autocast:
        attributions, delta = IntegratedGradients(model).attribute(
            images,
            baselines=baseline.to(device).expand_as(images).contiguous(memory_format=torch.channels_last),
            target=labels,
            n_steps=config.n_steps,
            method=config.method,
            internal_batch_size=config.internal_batch_size,
            return_convergence_delta=True,
        )
    attributions = attributions.float()
    delta = delta.float()
    output_difference = attributions.sum(dim=(1, 2, 3)) - delta  # F(x) - F(x') for the target logit
    relative_error = delta.abs() / output_difference.abs()
    relative_error[output_difference.abs() < MIN_OUTPUT_DIFFERENCE] = float("nan")
    return attributions.abs().sum(dim=1), relative_error


def ig_in_calls(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    baseline: torch.Tensor,
    config: IGConfig,
    on_call: Callable[[int], object] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``integrated_gradients`` over uint8 ``images`` in calls of ``config.images_per_call``, on the
    model's device; (maps (N, H, W) float32, relative completeness errors (N,)) on the CPU."""
    device = next(model.parameters()).device
    maps, errors, share = [], [], machine_share()
    for start in range(0, len(labels), config.images_per_call):
        batch = images[start : start + config.images_per_call].to(device).float().div_(255)
        with share.step():
            batch_maps, batch_errors = integrated_gradients(
                model,
                batch.contiguous(memory_format=torch.channels_last),
                labels[start : start + config.images_per_call].to(device),
                baseline,
                config,
            )
        maps.append(batch_maps.cpu())
        errors.append(batch_errors.cpu())
        if on_call is not None:
            on_call(len(batch))
    return torch.cat(maps), torch.cat(errors)


def ig_cache_fields(teacher: CifarClassifier, splits: Splits, config: IGConfig) -> dict:
    # Batching settings change speed, not values, so they are not part of the key.
    settings = {k: v for k, v in to_dict(config).items() if k not in ("internal_batch_size", "images_per_call")}
    return {"teacher": weights_hash(teacher), "data": splits.fingerprint, "ig": settings}


def ig_maps(
    teacher: CifarClassifier,
    splits: Splits,
    config: IGConfig,
    cache_dir: str | Path,
    device: torch.device,
    progress: bool = True,
) -> Artifact:
    """The IG cache for this teacher and training split: computed once (resumably), then loaded.

    ``artifact.tensors["maps"]`` is (N, H, W) float16 in training-split order; ``artifact.meta``
    holds the settings and the completeness statistics.
    """
    from tqdm import tqdm

    config = resolve_ig_precision(config, device)
    fields = ig_cache_fields(teacher, splits, config)  # keyed by the teacher's own weights
    baseline = BASELINES[config.baseline](teacher, splits)
    # Folded BatchNorm, no parameter gradients (IG needs input gradients only), channels_last.
    fast_teacher = fold_batchnorm(teacher).to(device).to(memory_format=torch.channels_last)

    def build(scratch: Path):
        count = len(splits.train_labels)
        chunk_starts = range(0, count, CHUNK_IMAGES)
        done = sum(min(CHUNK_IMAGES, count - s) for s in chunk_starts if (scratch / f"chunk_{s:08d}.pt").exists())
        if not progress:
            log.info(
                "computing IG maps: %d of %d training images to go (%d steps, %s, %s) on %s, into %s",
                count - done,
                count,
                config.n_steps,
                config.method,
                config.precision,
                device,
                scratch.parent,
            )
        with tqdm(total=count, initial=done, desc="IG maps", unit="img", disable=not progress) as bar:
            for start in chunk_starts:
                chunk_path = scratch / f"chunk_{start:08d}.pt"
                if chunk_path.exists():
                    continue
                stop = min(start + CHUNK_IMAGES, count)
                maps, errors = ig_in_calls(
                    fast_teacher,
                    splits.train_images[start:stop],
                    splits.train_labels[start:stop],
                    baseline,
                    config,
                    on_call=bar.update,
                )
                tmp = chunk_path.with_name(chunk_path.name + ".tmp")
                torch.save({"maps": maps.half(), "errors": errors}, tmp)
                tmp.replace(chunk_path)
        chunks = [torch.load(scratch / f"chunk_{s:08d}.pt", weights_only=True) for s in chunk_starts]
        maps = torch.cat([chunk["maps"] for chunk in chunks])
        errors = torch.cat([chunk["errors"] for chunk in chunks])
        meta = {
            "settings": to_dict(config),
            "images": count,
            "completeness_relative_error": {
                "mean": errors.nanmean().item(),
                "median": errors.nanmedian().item(),
                "p95": errors.nanquantile(0.95).item(),
                "undefined_images": int(errors.isnan().sum()),  # |F(x) - F(baseline)| < MIN_OUTPUT_DIFFERENCE
            },
        }
        return {"maps": maps, "relative_error": errors}, meta

    return TensorCache(cache_dir).get_or_build("ig", fields, build)


def _min_max(map_: torch.Tensor) -> torch.Tensor:
    return (map_ - map_.min()) / (map_.max() - map_.min()).clamp_min(1e-12)


def heat(map_: torch.Tensor) -> torch.Tensor:
    """(H, W) non-negative map → (3, H, W) in [0, 1], black→red→yellow→white ("hot"), min-max scaled."""
    scaled = _min_max(map_)
    return torch.stack([(3 * scaled).clamp(0, 1), (3 * scaled - 1).clamp(0, 1), (3 * scaled - 2).clamp(0, 1)])


def ig_panel(image: torch.Tensor, map_: torch.Tensor, scale: int = 8) -> torch.Tensor:
    """uint8 (3, H*scale, 3*W*scale + gaps): original | IG map | overlay (Eq. 7 with s = 1)."""
    from torchvision.utils import make_grid

    pixels = image.float() / 255
    tiles = [pixels, heat(map_.float()), 0.5 * pixels + 0.5 * _min_max(map_.float()).expand(3, -1, -1)]
    grid = make_grid(torch.stack(tiles), nrow=3, padding=1, pad_value=1.0)
    upscaled = torch.nn.functional.interpolate(grid.unsqueeze(0), scale_factor=scale, mode="nearest")[0]
    return (upscaled.clamp(0, 1) * 255).round().to(torch.uint8)
