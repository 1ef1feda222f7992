"""Batched training augmentation on tensors: random crop + flip (pad-and-shift for small images, a
random resized crop for large ones), and the IG overlay (Eq. 5-7).

Everything works on a whole batch at once on the training device; there is no per-sample Python.
Crop and flip take the IG maps as extra channels so an image and its map move together.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdsearch.config import OverlayMode


def random_crop_flip(
    batch: torch.Tensor, padding: int, generator: torch.Generator, pad_mode: str = "constant"
) -> torch.Tensor:
    """Random ``padding``-pixel-shift crop and horizontal flip of (B, C, H, W), one draw per sample.

    All C channels of a sample get the same crop and flip, so stacking an image (3 channels) with its
    IG map (1 channel) augments both identically.
    """
    size, height, width = batch.shape[0], batch.shape[2], batch.shape[3]
    device = batch.device
    offsets = torch.randint(0, 2 * padding + 1, (2, size), generator=generator, device=generator.device).to(device)
    flips = torch.rand(size, generator=generator, device=generator.device).to(device) < 0.5
    if padding > 0:
        padded = F.pad(batch, (padding,) * 4, mode=pad_mode)
        rows = (offsets[0].view(-1, 1) + torch.arange(height, device=device)).view(size, 1, height, 1)
        columns = offsets[1].view(-1, 1) + torch.arange(width, device=device)
    else:
        padded = batch
        rows = torch.arange(height, device=device).view(1, 1, height, 1).expand(size, 1, height, 1)
        columns = torch.arange(width, device=device).expand(size, width)
    # A flip is a reversed column index, so crop and flip are one gather.
    columns = torch.where(flips.view(-1, 1), columns.flip(1), columns).view(size, 1, 1, width)
    samples = torch.arange(size, device=device).view(size, 1, 1, 1)
    channels = torch.arange(batch.shape[1], device=device).view(1, -1, 1, 1)
    return padded[samples, channels, rows, columns]


# Above this side, images are cropped at random scales (ImageNet's recipe) instead of shifted by a few pixels.
SMALL_IMAGE = 64
RESIZED_CROP_SCALE = (0.08, 1.0)  # the crop's share of the image's area, as torchvision's RandomResizedCrop
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)  # its aspect ratio


def random_resized_crop_flip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random crop of random area and aspect ratio, resized back to (H, W), and a horizontal flip, of
    (B, C, H, W): one draw per sample, every channel alike, the whole batch in one ``grid_sample``.

    Unlike torchvision's RandomResizedCrop, which redraws until a crop fits inside the image, a crop
    wider or taller than the image is clamped to its side: one draw, no per-sample loop.
    """
    size, device = batch.shape[0], batch.device

    def uniform(low: float, high: float) -> torch.Tensor:
        draw = torch.rand(size, generator=generator, device=generator.device).to(device)
        return low + (high - low) * draw

    area = uniform(*RESIZED_CROP_SCALE)
    ratio = torch.exp(uniform(math.log(RESIZED_CROP_RATIO[0]), math.log(RESIZED_CROP_RATIO[1])))
    width, height = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
    # Crop centres in grid_sample's [-1, 1] coordinates, so that the crop stays inside the image.
    centre_x, centre_y = (2 * uniform(0, 1) - 1) * (1 - width), (2 * uniform(0, 1) - 1) * (1 - height)
    flips = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
    theta = torch.zeros(size, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = width * flips, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid.to(batch.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Each (H, W) map of (..., H, W) scaled to [0, 1]; a constant map becomes zeros (no division by zero)."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - low) / (high - low).clamp_min(torch.finfo(maps.dtype).tiny)


def blend(images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Eq. 7: x' = 0.5 x + 0.5 m on every channel, for images (..., 3, H, W) and [0, 1] maps (..., H, W)."""
    return 0.5 * images + 0.5 * maps.unsqueeze(-3).to(images.dtype)


def overlay_draws(
    size: int, p: float, generator: torch.Generator, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The overlay's random draws for a batch of ``size``: (boolean mask of the images blended, with
    probability ``p``; exponents s = exp(U[ln 1, ln 2])), in this order from ``generator``."""
    draw_device = generator.device
    blended_mask = (torch.rand(size, generator=generator, device=draw_device) < p).to(device)
    exponents = torch.exp(torch.rand(size, generator=generator, device=draw_device) * math.log(2.0)).to(device)
    return blended_mask, exponents


def apply_overlay(
    images: torch.Tensor, maps: torch.Tensor, blended_mask: torch.Tensor, exponents: torch.Tensor
) -> torch.Tensor:
    """Blend the images of ``blended_mask`` with their maps raised to ``exponents`` (Eq. 5-7); the others
    are returned unchanged whatever their maps hold."""
    scaled = maps.float().clamp_min(0) ** exponents.view(-1, 1, 1)
    blended = blend(images, min_max(scaled))
    return torch.where(blended_mask.view(-1, 1, 1, 1), blended, images)


def ig_overlay(
    images: torch.Tensor, maps: torch.Tensor, p: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend each image with its IG map with probability ``p`` (Eq. 5-7 of the paper).

    ``images`` are (B, 3, H, W) pixel values in [0, 1], before normalisation; ``maps`` (B, H, W) are
    non-negative. Per image: s = exp(U[ln 1, ln 2]), m = maps**s, min-max normalised, and
    x' = 0.5 x + 0.5 m on every channel. Returns (augmented images, boolean mask of blended images).
    """
    blended_mask, exponents = overlay_draws(images.shape[0], p, generator, images.device)
    return apply_overlay(images, maps, blended_mask, exponents), blended_mask


def _aligned_map_index(index: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    return index


def _shuffled_map_index(index: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """The index of a different, random training image (a control: is the map's alignment what helps?)."""
    shift = torch.randint(1, max(count, 2), index.shape, generator=generator, device=generator.device)
    return (index + shift.to(index.device)) % count


# Which training image's map overlays image `index`.
OVERLAY_MODES: dict[OverlayMode, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {
    OverlayMode.ALIGNED: _aligned_map_index,
    OverlayMode.SHUFFLED: _shuffled_map_index,
}


@dataclass(frozen=True)
class BatchRecipe:
    """How a training batch is made from the uint8 training images: crop + flip, then the IG overlay."""

    crop_padding: int
    pad_mode: str
    overlay_p: float  # 0: no overlay, the maps are not touched
    overlay_mode: str  # an OverlayMode
    channels_last: bool
    resized_crop: bool = False  # large images: random resized crop + flip instead of pad-and-shift + flip


def batch_overlay_draws(
    index: torch.Tensor, count: int, recipe: BatchRecipe, overlay_generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Everything the overlay of the batch ``index`` draws, in order: (whose map overlays each image,
    which images are blended, the exponents). Replaying these draws without the images tells which
    maps a run will ever use (``train.drawn_images``)."""
    map_index = OVERLAY_MODES[recipe.overlay_mode](index, count, overlay_generator)
    blended_mask, exponents = overlay_draws(len(index), recipe.overlay_p, overlay_generator, index.device)
    return map_index, blended_mask, exponents


def training_batch(
    images: torch.Tensor,
    index: torch.Tensor,
    maps: torch.Tensor | None,
    recipe: BatchRecipe,
    generator: torch.Generator,
    overlay_generator: torch.Generator,
) -> torch.Tensor:
    """The augmented float batch of the training images ``images[index]`` (uint8, (N, 3, H, W)).

    Crop and flip draw from ``generator``, the overlay from ``overlay_generator``: every arm of one
    seed then gets the same crops and flips, whatever its overlay draws.
    """
    batch = images[index].float().div_(255)
    if maps is not None and recipe.overlay_p > 0:
        map_index, blended_mask, exponents = batch_overlay_draws(index, len(images), recipe, overlay_generator)
        stacked = _crop_flip(torch.cat([batch, maps[map_index].float().unsqueeze(1)], 1), recipe, generator)
        batch = apply_overlay(stacked[:, :3], stacked[:, 3], blended_mask, exponents)
    else:
        batch = _crop_flip(batch, recipe, generator)
    return batch.contiguous(memory_format=torch.channels_last) if recipe.channels_last else batch


def _crop_flip(batch: torch.Tensor, recipe: BatchRecipe, generator: torch.Generator) -> torch.Tensor:
    if recipe.resized_crop:
        return random_resized_crop_flip(batch, generator)
    return random_crop_flip(batch, recipe.crop_padding, generator, recipe.pad_mode)
