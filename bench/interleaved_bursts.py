"""Batch-1 latency of models timed together: single interleaved passes against bursts, against each model's own loop.

    .venv/bin/python bench/interleaved_bursts.py 2>&1 | tee bench/out/interleaved_bursts.txt

Reports (``kdsearch.report.front``) time every student together with the teacher, interleaved, so that the
machine's drift is shared by all of them (``kdsearch.runtime.timing.interleaved_latency``). Interleaving one
pass of each model at a time makes every pass follow another model's, with cold caches, which a deployed
model in its own loop does not see. This bench measures, in one run and in ONNX Runtime fp32 at one thread:
each model in a loop of its own (the reference), interleaved single passes, and interleaved bursts of 3, 5
and 10 passes of which the last is timed; it prints each method's median over the reference. Models: the
teacher, the paper's student, torchvision's MobileNetV3-small and timm's LCNet-0.75 (small-image stems),
random weights (latency depends on the architecture only). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import header, machine, other_cores, wait_quiet

from kdsearch.config import ModelConfig
from kdsearch.models.classifiers import build_model
from kdsearch.runtime.onnx_runtime import export_onnx, latency_feed, session
from kdsearch.runtime.timing import OUTPUT

MODELS = {
    "teacher": ModelConfig(),
    "paper's student": ModelConfig(drop_blocks=5),
    "mobilenet_v3_small": ModelConfig(arch="torchvision:mobilenet_v3_small", cifar_stem=True),
    "lcnet_075": ModelConfig(arch="timm:lcnet_075", cifar_stem=True),
}


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--bursts", default="1,3,5,10", help="passes in a row per model and round (1: single)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = machine()
    header("interleaved latency: single passes vs bursts vs each model's own loop (ONNX Runtime fp32, batch 1)", info)
    folder = Path(tempfile.mkdtemp())
    runs = {}
    for name, config in MODELS.items():
        path = export_onnx(build_model(config).eval(), folder / f"{name.replace(' ', '_')}.onnx", 32)
        runner = session(path, 1)
        feed = latency_feed(runner, 1)
        runs[name] = lambda runner=runner, feed=feed: runner.run([OUTPUT], feed)
    for run in runs.values():
        for _ in range(10):
            run()
    wait_quiet(120)
    results: dict[str, dict[str, float]] = {name: {} for name in runs}
    for name, run in runs.items():
        results[name]["own loop"] = 1000 * statistics.median(_timed(run) for _ in range(args.repeats))
    for burst in (int(b) for b in args.bursts.split(",")):
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                for _ in range(burst - 1):
                    run()
                times[name].append(_timed(run))
        label = "interleaved single" if burst == 1 else f"interleaved burst {burst}"
        for name in runs:
            results[name][label] = 1000 * statistics.median(times[name])
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
