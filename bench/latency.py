"""Inference latency of the paper's teacher and student at batch 1 and 128, with 1 and 2 threads.

    .venv/bin/python bench/latency.py 2>&1 | tee bench/out/latency.txt

The models are the MobileNetV2 CIFAR teacher (2,236,682 parameters) and the paper's student (last 5
feature blocks removed, 543,498), built by kdsearch and measured with ``kdsearch.runtime.latency.latency_ms``
(the function studies log with): fp32, eval mode, no gradients, channels_last input, untimed warm-up
passes, then the median of ``--repeats`` timed passes. Each model is measured as trained (BatchNorm
layers kept) and with BatchNorm folded into the convolutions (``kdsearch.models.classifiers.fold_batchnorm``,
what a deployment would run). Latency depends on the architecture, not on the weights, so random
weights are used. Ratios (student speed-up over the teacher) are within the same thread count and
batch size, measured in this run. Before each timing the script waits for a quiet machine and
reports the cores other processes used during it. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import header, machine, wait_quiet

from kdsearch.config import LatencyConfig
from kdsearch.infra.cpu_load import OtherProcesses
from kdsearch.models.classifiers import (
    ModelConfig,
    build_model,
    count_flops,
    count_parameters,
    fold_batchnorm,
    size_on_disk_bytes,
)
from kdsearch.runtime.latency import latency_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--batch-sizes", default="1,128")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--max-wait", type=float, default=300.0)
    args = parser.parse_args()
    threads = [int(n) for n in args.threads.split(",")]
    batch_sizes = [int(n) for n in args.batch_sizes.split(",")]
    config = LatencyConfig(warmup=args.warmup, repeats=args.repeats, batch_sizes=tuple(batch_sizes))

    info = machine()
    header("Teacher vs student inference latency (bench/latency.py)", info)
    print(f"fp32, eval, no_grad, channels_last; warm-up {args.warmup}, median of {args.repeats} repeats")
    torch.manual_seed(0)
    teacher = build_model(ModelConfig(arch="mobilenetv2_cifar"))
    student = build_model(ModelConfig(arch="mobilenetv2_cifar", drop_blocks=5))
    models = {
        "teacher": teacher,
        "student": student,
        "teacher (BN folded)": fold_batchnorm(teacher),
        "student (BN folded)": fold_batchnorm(student),
    }
    for name in ("teacher", "student"):
        model = models[name]
        print(
            f"{name}: {count_parameters(model):,} parameters, {count_flops(model) / 1e6:.1f} MFLOPs per image, "
            f"{size_on_disk_bytes(model) / 1e6:.2f} MB state dict"
        )
    print(f"{'model':<22} {'threads':>7} {'batch':>5} {'ms':>9} {'img/s':>9} {'others':>7}")
    rows = []
    device = torch.device("cpu")
    for count in threads:
        torch.set_num_threads(count)
        for batch in batch_sizes:
            for name, model in models.items():
                wait_quiet(args.max_wait)
                with OtherProcesses() as during:
                    ms = latency_ms(model, batch, device, config)
                others = during.cores
                rows.append({"model": name, "threads": count, "batch": batch, "ms": ms, "others": others})
                print(
                    f"{name:<22} {count:>7} {batch:>5} {ms:>9.2f} {1000 * batch / ms:>9.0f} {others:>7.2f}",
                    flush=True,
                )
    print("student speed-up over the teacher (same threads, batch, BatchNorm handling):")
    by_key = {(r["model"], r["threads"], r["batch"]): r["ms"] for r in rows}
    for count in threads:
        for batch in batch_sizes:
            plain = by_key[("teacher", count, batch)] / by_key[("student", count, batch)]
            folded = by_key[("teacher (BN folded)", count, batch)] / by_key[("student (BN folded)", count, batch)]
            print(f"  {count} thread(s), batch {batch}: {plain:.2f}x (folded: {folded:.2f}x)")
    summary = {
        "machine": info,
        "flops": {name: count_flops(models[name]) for name in ("teacher", "student")},
        "parameters": {name: count_parameters(models[name]) for name in ("teacher", "student")},
        "rows": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
