"""IG precompute throughput on the MobileNetV2 teacher: kdsearch settings vs a naive Captum reference.

    .venv/bin/python bench/ig_throughput.py --images 48 2>&1 | tee bench/out/ig_throughput.txt

Everything is measured in the same run on the same machine, on the first ``--images`` images of the
CIFAR-10 (JPEG q75 copy) training split (val_size 5000), in index order:

- reference: ``captum.attr.IntegratedGradients(teacher).attribute`` with n_steps=50 gausslegendre,
  8 images per call, internal_batch_size=None, fp32, default (NCHW) memory format, teacher parameters
  left with requires_grad=True (as a naive user would), black baseline.
- kdsearch: ``kdsearch.distill.attribution.ig_maps`` end to end (it prepares its own teacher copy: BatchNorm
  folded, parameters frozen, channels_last; calls Captum's IG (``explain``) ``images_per_call`` images at
  a time; writes and reads back the cache) on a split holding only these images, into a fresh
  temporary cache directory, with IGConfig's images_per_call, at each
  METHOD:STEPS[:PRECISION[:INTERNAL_BATCH_SIZE]] of ``--settings`` (gl gausslegendre, rt
  riemann_trapezoid, rm riemann_middle; the batch size defaults to IGConfig's). A setting ending in
  ``+stockdw`` runs with PyTorch's own backward pass of strided depthwise convolutions instead of
  kdsearch's fp32 one (``kdsearch.models.depthwise``), to show what that change buys in the same run.
- high accuracy: 256 Gauss-Legendre steps, fp32 (kdsearch path), on the first ``--hq-images`` images.

Per setting: images/s, speed-up vs the reference, relative completeness error
|sum(IG) - (F(x) - F(x'))| / |F(x) - F(x')| (mean, median), and map agreement: the Pearson
correlation of each image's 32x32 map (sum over channels of |IG|; kdsearch maps are float16 as
``ig_maps`` stores them) with its high-accuracy map (mean, min). Target: >= 10x the reference's
images/s with mean agreement >= 0.99 (issue 30; it was 8x).

Timing: each setting gets one untimed warm-up call on ``--warmup-images`` images. Before each timing
the script waits (up to ``--max-wait`` s) until other processes use < 0.3 cores, and it reports the
cores they used during the timing (``others``); a timing during which they used more is retaken
(``--retries``). Every row except the high-accuracy one is timed ``--repeats`` times (default 2) and
its fastest timing kept, which gives the reference its best showing too. The last line is JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from unittest import mock

import torch
from common import QUIET_CORES, TEACHER, Timer, cache_dir, data_config, header, load1, machine, wait_quiet

from kdsearch.config import IGConfig, ModelConfig
from kdsearch.data.datasets import Splits, load_splits
from kdsearch.distill import attribution
from kdsearch.distill.attribution import MIN_OUTPUT_DIFFERENCE, ig_maps
from kdsearch.models.classifiers import load_model

METHODS = {"gl": "gausslegendre", "rt": "riemann_trapezoid", "rl": "riemann_left", "rm": "riemann_middle"}
DEFAULT_SETTINGS = (
    "gl:16:fp32,gl:8:fp32,gl:24:fp32,gl:32:fp32,rt:16:fp32,rt:20:fp32,rt:24:fp32,rt:32:fp32,rm:20:fp32,"
    "gl:16:bf16,rt:20:bf16,rt:24:bf16,"
    "rt:20:fp32:128,rt:24:fp32:128,rm:20:fp32:128,rt:20:bf16:128,rt:24:bf16:128"
)
REFERENCE_STEPS, REFERENCE_IMAGES_PER_CALL = 50, 8
HQ_STEPS = 256
TARGET_SPEEDUP, TARGET_AGREEMENT = 10.0, 0.99


@dataclass
class Row:
    name: str
    images: int
    seconds: float
    load_before: float
    load_after: float
    others: float  # cores used by other processes during the timing
    error_mean: float
    error_median: float
    agreement_mean: float = math.nan
    agreement_min: float = math.nan
    speedup: float = math.nan

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    def meets_target(self) -> bool:
        return self.speedup >= TARGET_SPEEDUP and self.agreement_mean >= TARGET_AGREEMENT


STOCK_DEPTHWISE = "+stockdw"


def parse_setting(spec: str, base: IGConfig) -> tuple[IGConfig, bool]:
    """METHOD:STEPS[:PRECISION[:INTERNAL_BATCH_SIZE]][+stockdw] → (IGConfig, stock depthwise backward);
    omitted parts come from ``base``."""
    spec = spec.strip()
    stock_depthwise = spec.endswith(STOCK_DEPTHWISE)
    parts = spec.removesuffix(STOCK_DEPTHWISE).split(":")
    if not 2 <= len(parts) <= 4:
        raise SystemExit(f"a setting is METHOD:STEPS[:PRECISION[:INTERNAL_BATCH_SIZE]][+stockdw] but got {spec!r}")
    config = IGConfig(
        n_steps=int(parts[1]),
        method=METHODS.get(parts[0], parts[0]),
        precision=parts[2] if len(parts) > 2 else "fp32",
        internal_batch_size=int(parts[3]) if len(parts) > 3 else base.internal_batch_size,
        images_per_call=base.images_per_call,
    )
    return config, stock_depthwise


def setting_name(config: IGConfig, base: IGConfig, stock_depthwise: bool = False) -> str:
    short = {value: key for key, value in METHODS.items()}.get(config.method, config.method)
    batch = f":{config.internal_batch_size}" if config.internal_batch_size != base.internal_batch_size else ""
    return f"kdsearch {short}:{config.n_steps}:{config.precision}{batch}{' stock-dw' if stock_depthwise else ''}"


def pixels(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255)


def reference_ig(teacher, images, labels, n_steps: int, per_call: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captum as a naive user calls it; returns (maps (N, H, W), relative completeness error (N,))."""
    from captum.attr import IntegratedGradients

    explainer = IntegratedGradients(teacher)
    maps, errors = [], []
    for start in range(0, len(images), per_call):
        batch = pixels(images[start : start + per_call])
        attributions, delta = explainer.attribute(
            batch,
            baselines=torch.zeros_like(batch),
            target=labels[start : start + per_call],
            n_steps=n_steps,
            method="gausslegendre",
            return_convergence_delta=True,
        )
        output_difference = attributions.sum(dim=(1, 2, 3)) - delta
        error = delta.abs() / output_difference.abs()
        error[output_difference.abs() < MIN_OUTPUT_DIFFERENCE] = float("nan")  # as kdsearch does
        errors.append(error)
        maps.append(attributions.abs().sum(dim=1))
    return torch.cat(maps).detach(), torch.cat(errors).detach()


def kdsearch_ig(
    teacher, splits: Splits, images, labels, config: IGConfig, stock_depthwise: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kdsearch.distill.attribution.ig_maps`` end to end (teacher preparation, chunks, cache write and read
    back) on a split holding only ``images``, into a fresh cache directory so nothing is reused; with
    ``stock_depthwise``, without kdsearch's fp32 backward pass of strided depthwise convolutions."""
    subset = dataclasses.replace(
        splits,
        train_images=images,
        train_labels=labels,
        train_index=torch.arange(len(labels)),
        fingerprint=f"{splits.fingerprint}-bench-first-{len(labels)}",
    )
    unchanged = mock.patch.object(attribution, "with_fp32_depthwise_backward", lambda model: 0)
    with tempfile.TemporaryDirectory(prefix="kdbench-ig-") as scratch, unchanged if stock_depthwise else nullcontext():
        artifact = ig_maps(teacher, subset, config, scratch, torch.device("cpu"), progress=False)
        maps = artifact.tensors["maps"].float().clone()  # float16, as ig_maps stores them
        errors = artifact.tensors["relative_error"].float().clone()
    return maps, errors


def pearson(maps: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image Pearson correlation of two (N, H, W) stacks of maps."""
    a = maps.flatten(1).double()
    b = reference.flatten(1).double()
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)


def measure(name, run, images, labels, args, cache: dict, repeats: int, retries: int) -> Row:
    run(images[: args.warmup_images], labels[: args.warmup_images])  # oneDNN primitives, weight reorders
    best, timings = None, []
    for _ in range(repeats):
        for attempt in range(1 + retries):
            wait_quiet(args.max_wait)
            with Timer() as timer:
                maps, errors = run(images, labels)
            timings.append(f"{timer.seconds:.1f}")
            if best is None or timer.seconds < best[0].seconds:
                best = (timer, maps, errors)
            if timer.others < QUIET_CORES:
                break
            if attempt < retries:
                print(
                    f"  {name}: others used {timer.others:.2f} cores during the timing ({timer.seconds:.1f} s); retaking"
                )
    timer, maps, errors = best
    cache[name] = maps
    row = Row(
        name=name,
        images=len(images),
        seconds=timer.seconds,
        load_before=timer.load_before,
        load_after=timer.load_after,
        others=timer.others,
        error_mean=errors.nanmean().item(),
        error_median=errors.nanmedian().item(),
    )
    print(
        f"  measured {name}: {row.images_per_s:.2f} img/s (fastest of {', '.join(timings)} s; other processes "
        f"used {row.others:.2f} cores during it)",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="training images to attribute (index order)")
    parser.add_argument("--hq-images", type=int, default=None, help="images that get a 256-step map (default all)")
    parser.add_argument(
        "--settings", default=DEFAULT_SETTINGS, help="comma list of METHOD:STEPS[:PRECISION[:INTERNAL_BATCH_SIZE]]"
    )
    parser.add_argument("--internal-batch-size", type=int, default=IGConfig().internal_batch_size)
    parser.add_argument("--images-per-call", type=int, default=IGConfig().images_per_call)
    parser.add_argument("--warmup-images", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timings per setting; the fastest is kept")
    parser.add_argument(
        "--retries", type=int, default=2, help="retakes of a timing during which others used >= 0.3 cores"
    )
    parser.add_argument(
        "--max-wait", type=float, default=60.0, help="seconds to wait for other processes to go quiet before a timing"
    )
    parser.add_argument("--skip-reference", action="store_true", help="no Captum reference (no speed-ups)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--teacher", default=TEACHER)
    args = parser.parse_args()

    info = machine()
    header("IG precompute throughput (bench/ig_throughput.py)", info)
    print(f"command: {' '.join(sys.argv)}")
    config_kwargs = {"data_dir": args.data_dir} if args.data_dir else {}
    splits = load_splits(data_config(None, **config_kwargs), cache_dir())
    images, labels = splits.train_images[: args.images], splits.train_labels[: args.images]
    hq_count = min(args.hq_images or len(images), len(images))
    print(f"data: {splits.label}, first {len(images)} training images; high-accuracy maps on the first {hq_count}")
    base = IGConfig(internal_batch_size=args.internal_batch_size, images_per_call=args.images_per_call)
    settings = [parse_setting(spec, base) for spec in args.settings.split(",") if spec.strip()]
    print(f"kdsearch batching: internal_batch_size {base.internal_batch_size}, images_per_call {base.images_per_call}")

    naive_teacher, _ = load_model(args.teacher, ModelConfig())
    naive_teacher.eval()  # parameters keep requires_grad=True; NCHW
    teacher, _ = load_model(args.teacher, ModelConfig())  # ig_maps prepares its own fast copy

    maps: dict[str, torch.Tensor] = {}
    rows: list[Row] = []
    reference_name = f"reference captum gl:{REFERENCE_STEPS}:fp32"
    jobs = []
    if not args.skip_reference:
        jobs.append(
            (
                reference_name,
                lambda x, y: reference_ig(naive_teacher, x, y, REFERENCE_STEPS, REFERENCE_IMAGES_PER_CALL),
                len(images),
            )
        )
    for config, stock_depthwise in settings:
        run = functools.partial(kdsearch_ig, teacher, splits, config=config, stock_depthwise=stock_depthwise)
        jobs.append((setting_name(config, base, stock_depthwise), run, len(images)))
    hq_config = IGConfig(
        n_steps=HQ_STEPS, internal_batch_size=base.internal_batch_size, images_per_call=base.images_per_call
    )
    hq_name = f"high-accuracy gl:{HQ_STEPS}:fp32"
    jobs.append((hq_name, lambda x, y: kdsearch_ig(teacher, splits, x, y, hq_config), hq_count))

    for name, run, count in jobs:
        # The high-accuracy map is only a yardstick: it is timed once and not retaken.
        repeats, retries = (1, 0) if name == hq_name else (args.repeats, args.retries)
        rows.append(measure(name, run, images[:count], labels[:count], args, maps, repeats, retries))

    hq = maps[hq_name]
    reference = next((row for row in rows if row.name == reference_name), None)
    for row in rows:
        agreement = pearson(maps[row.name][:hq_count], hq)
        row.agreement_mean, row.agreement_min = agreement.mean().item(), agreement.min().item()
        if reference is not None:
            row.speedup = row.images_per_s / reference.images_per_s

    print()
    print(
        f"{'setting':<32} {'img/s':>7} {'speed-up':>8} {'relerr mean':>11} {'relerr med':>10} "
        f"{'agree mean':>10} {'agree min':>9} {'others':>6} target"
    )
    for row in rows:
        target = "" if row.name in (reference_name, hq_name) else ("met" if row.meets_target() else "no")
        print(
            f"{row.name:<32} {row.images_per_s:>7.2f} {row.speedup:>7.2f}x {row.error_mean:>11.2e} "
            f"{row.error_median:>10.2e} {row.agreement_mean:>10.4f} {row.agreement_min:>9.4f} "
            f"{row.others:>6.2f} {target}"
        )
    print(f"(agreement of the high-accuracy row with itself is 1 by construction; it ran on {hq_count} images)")
    print("(others: cores used by other processes during the timing; above ~0.3 the row is slowed by contention)")

    default_name = setting_name(replace_batching(IGConfig(), base), base)
    default_row = next((row for row in rows if row.name == default_name), None)
    candidates = [row for row in rows if row.name.startswith("kdsearch") and row.meets_target()]
    chosen = max(candidates, key=lambda row: row.images_per_s) if candidates else None
    if default_row is not None:
        verdict = "meets" if default_row.meets_target() else "does NOT meet"
        print(
            f"current default {default_name}: {default_row.speedup:.2f}x, agreement mean {default_row.agreement_mean:.4f} "
            f"-> {verdict} the target (>= {TARGET_SPEEDUP:g}x and mean agreement >= {TARGET_AGREEMENT})"
        )
    if chosen is not None:
        print(
            f"fastest setting meeting the target: {chosen.name} ({chosen.speedup:.2f}x, agreement mean "
            f"{chosen.agreement_mean:.4f}, min {chosen.agreement_min:.4f})"
        )
    else:
        print("no measured kdsearch setting meets the target")
    noisy = [row.name for row in rows if row.others >= QUIET_CORES]
    if noisy:
        print(f"WARNING: timed while other processes used >= {QUIET_CORES} cores: {', '.join(noisy)}")
    print(f"load average (1 min) at end: {load1():.2f}")
    print(
        json.dumps(
            {
                "bench": "ig_throughput",
                "machine": info,
                "data": splits.label,
                "images": len(images),
                "hq_images": hq_count,
                "batching": {"internal_batch_size": base.internal_batch_size, "images_per_call": base.images_per_call},
                "rows": [asdict(row) | {"images_per_s": row.images_per_s} for row in rows],
                "default": default_name,
                "fastest_meeting_target": chosen.name if chosen else None,
            }
        )
    )


def replace_batching(config: IGConfig, base: IGConfig) -> IGConfig:
    return replace(config, internal_batch_size=base.internal_batch_size, images_per_call=base.images_per_call)


if __name__ == "__main__":
    main()
