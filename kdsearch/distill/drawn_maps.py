"""The maps of only the images an overlay will draw (``overlay.maps: drawn``), computed as runs need them.

With p = 0.1 over 3 epochs, 73 % of the training images are never overlaid (0.9^3), yet the full cache
computes every map before the first step. A run knows beforehand which maps it will blend: the overlay
draws from a stream of its own (``train.drawn_images`` replays it). So this store keeps the maps of the
images some run drew, adds the missing ones when a run needs them, and never recomputes one.

The store lives beside the full cache, under the same key fields (``<cache>/<kind>-drawn/<key>/``): one
file per addition (the images' indices and their float16 maps), written atomically, under a file lock
so that concurrent workers compute each map once. Where the full cache exists, it is used instead.
Maps are computed in calls of the missing images in index order; a map's last bits can depend on which
images shared its call (oneDNN picks kernels by batch size), so a stored map is never replaced.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from tqdm import tqdm

from kdsearch.data.datasets import Splits
from kdsearch.distill.attribution import (
    BASELINES,
    IG,
    Attribution,
    cache_fields,
    explainable,
    find_maps,
    map_ms,
    maps_in_calls,
    resolved,
)
from kdsearch.infra.tensor_cache import TensorCache
from kdsearch.models.classifiers import fold_batchnorm

log = logging.getLogger(__name__)


@dataclass
class DrawnMaps:
    maps: torch.Tensor  # (N, H, W) float16 in training-split order; zero where ``have`` is False
    have: torch.Tensor | None  # (N,) bool: the images with a map; None: the full cache, every image
    key: str  # the store's (or the full cache's) directory name
    ms_per_map: float | None  # where the maps were computed (None: not recorded)


def _read(directory: Path, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    maps, have = torch.zeros(shape, dtype=torch.float16), torch.zeros(shape[0], dtype=torch.bool)
    for part in sorted(directory.glob("part-*.pt")):
        stored = torch.load(part, weights_only=True)
        fresh = ~have[stored["index"]]  # the first stored map of an image stays (see the module's note)
        maps[stored["index"][fresh]] = stored["maps"][fresh]
        have[stored["index"]] = True
    return maps, have


def drawn_maps(
    teacher: torch.nn.Module,
    splits: Splits,
    attribution: Attribution,
    needed: torch.Tensor,
    cache_dir: str | Path,
    device: torch.device,
    progress: bool = False,
) -> DrawnMaps:
    """The maps of the training images ``needed`` (indices), from the full cache where it exists, else
    from the drawn store, computing the missing ones now."""
    full = find_maps(teacher, splits, attribution, cache_dir)
    if full is not None:
        return DrawnMaps(full.tensors["maps"], None, full.path.name, map_ms(full))
    attribution = resolved(attribution, teacher, splits, device)
    kind, fields = cache_fields(teacher, splits, attribution)
    directory = TensorCache(cache_dir).directory(f"{kind}-drawn", fields)
    directory.mkdir(parents=True, exist_ok=True)
    shape = (len(splits.train_labels), splits.image_size, splits.image_size)
    with FileLock(str(directory) + ".lock"):
        maps, have = _read(directory, shape)
        missing = torch.unique(needed)[~have[torch.unique(needed)]]
        ms_per_map = None
        if len(missing):
            label = "IG" if attribution.method == IG else attribution.method
            log.info("computing %s maps of the %d drawn images without one, into %s", label, len(missing), directory)
            model = explainable(fold_batchnorm(teacher), attribution).to(device)
            baseline = BASELINES[attribution.ig.baseline](teacher, splits)
            began = time.perf_counter()
            # A random method's calls are seeded from the first missing image's index: the same missing
            # images get the same noise.
            with tqdm(total=len(missing), desc=f"{label} maps", unit="img", disable=not progress) as bar:
                computed, _ = maps_in_calls(
                    model,
                    splits.train_images[missing],
                    splits.train_labels[missing],
                    baseline,
                    attribution,
                    on_call=bar.update,
                    first_index=int(missing[0]),
                )
            ms_per_map = 1000 * (time.perf_counter() - began) / len(missing)
            part = directory / f"part-{uuid.uuid4().hex}.pt"
            scratch = part.with_name(part.name + ".tmp")
            torch.save({"index": missing, "maps": computed.half()}, scratch)
            scratch.replace(part)
            maps[missing], have[missing] = computed.half(), True
    return DrawnMaps(maps, have, directory.name, ms_per_map)
