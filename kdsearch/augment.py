"""Batched training augmentation on tensors: random crop + flip, and the IG overlay (Eq. 5-7).

Everything works on a whole batch at once on the training device; there is no per-sample Python.
Crop and flip take the IG maps as extra channels so an image and its map move together.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


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


def ig_overlay(
    images: torch.Tensor, maps: torch.Tensor, p: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend each image with its IG map with probability ``p`` (Eq. 5-7 of the paper).

    ``images`` are (B, 3, H, W) pixel values in [0, 1], before normalisation; ``maps`` (B, H, W) are
    non-negative. Per image: s = exp(U[ln 1, ln 2]), m = maps**s, min-max normalised, and
    x' = 0.5 x + 0.5 m on every channel. Returns (augmented images, boolean mask of blended images).
    """
    size = images.shape[0]
    draw_device = generator.device
    blended_mask = (torch.rand(size, generator=generator, device=draw_device) < p).to(images.device)
    exponents = torch.exp(torch.rand(size, generator=generator, device=draw_device) * math.log(2.0)).to(images.device)
    scaled = maps.float().clamp_min(0) ** exponents.view(-1, 1, 1)
    low = scaled.amin(dim=(1, 2), keepdim=True)
    high = scaled.amax(dim=(1, 2), keepdim=True)
    # A constant map (all-zero attribution) normalises to zeros instead of dividing by zero.
    normalised = (scaled - low) / (high - low).clamp_min(torch.finfo(scaled.dtype).tiny)
    blended = 0.5 * images + 0.5 * normalised.unsqueeze(1).to(images.dtype)
    return torch.where(blended_mask.view(-1, 1, 1, 1), blended, images), blended_mask


def _aligned_map_index(index: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    return index


def _shuffled_map_index(index: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """The index of a different, random training image (a control: is the map's alignment what helps?)."""
    shift = torch.randint(1, max(count, 2), index.shape, generator=generator, device=generator.device)
    return (index + shift.to(index.device)) % count


# Which training image's map overlays image `index`.
OVERLAY_MODES: dict[str, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {
    "aligned": _aligned_map_index,
    "shuffled": _shuffled_map_index,
}
