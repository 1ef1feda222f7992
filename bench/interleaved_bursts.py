"""Batch-1 latency of models timed together: single interleaved passes against bursts, against each model's own loop.

    .venv/bin/python bench/interleaved_bursts.py 2>&1 | tee bench/out/interleaved_bursts.txt

Reports (``kdsearch.report.front``) time every student together with the teacher, interleaved, so that the
machine's drift is shared by all of them (``kdsearch.runtime.timing.interleaved_latency``). Interleaving one
pass of each model at a time makes every pass follow another model's, with cold caches, which a deployed
model in its own loop does not see. This bench measures, in one run and in ONNX Runtime fp32 at one thread:
each model in a loop of its own (``onnx_latency_ms``, the reference, as studies time an architecture), then
``interleaved_latency`` with bursts of 1 (single passes), 3, 5 and 10 passes of which the last is timed; it
prints each method's median over the reference. Models: the teacher, the paper's student, torchvision's
MobileNetV3-small and timm's LCNet-0.75 (small-image stems), random weights (latency depends on the
architecture only). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from common import header, machine, other_cores, wait_quiet

from kdsearch.config import LatencyConfig, ModelConfig
from kdsearch.models.classifiers import build_model
from kdsearch.runtime.onnx_runtime import onnx_latency_ms, session
from kdsearch.runtime.timing import Exported, interleaved_latency

MODELS = {
    "teacher": ModelConfig(),
    "paper's student": ModelConfig(drop_blocks=5),
    "mobilenet_v3_small": ModelConfig(arch="torchvision:mobilenet_v3_small", cifar_stem=True),
    "lcnet_075": ModelConfig(arch="timm:lcnet_075", cifar_stem=True),
}
RUNTIME = "onnx-fp32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--bursts", default="1,3,5,10", help="passes in a row per model and round (1: single)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = machine()
    header("interleaved latency: single passes vs bursts vs each model's own loop (ONNX Runtime fp32, batch 1)", info)
    latency = LatencyConfig(warmup=10, repeats=args.repeats)
    calibration = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)  # fixes the image size; no int8 here
    models = {}
    for name, config in MODELS.items():
        folder = Path(tempfile.mkdtemp())
        models[name] = Exported(build_model(config).eval(), calibration, folder)
        models[name].path(RUNTIME)  # exported before any timing
    wait_quiet(120)
    results: dict[str, dict[str, float]] = {name: {} for name in models}
    for name, exported in models.items():
        results[name]["own loop"] = onnx_latency_ms(
            session(exported.path(RUNTIME), 1), 1, latency.warmup, latency.repeats
        )
    for burst in (int(b) for b in args.bursts.split(",")):
        medians, _ = interleaved_latency(list(models.values()), RUNTIME, 1, 1, latency, burst=burst)
        label = "interleaved single" if burst == 1 else f"interleaved burst {burst}"
        for name, median in zip(models, medians, strict=True):
            results[name][label] = median
    print(f"others used {other_cores():.2f} cores just after")
    methods = list(next(iter(results.values())))
    print(f"| model | {' | '.join(methods)} |")
    print(f"|---|{'---|' * len(methods)}")
    for name, row in results.items():
        cells = [f"{row[m]:.3f} ms ({row[m] / row['own loop']:.2f}x)" for m in methods]
        print(f"| {name} | {' | '.join(cells)} |")
    print(json.dumps({"machine": info, "ms": results}))


if __name__ == "__main__":
    main()
