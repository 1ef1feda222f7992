"""Latency beside a training worker: what a second study worker does to a timing, with and without
``kdsearch.infra.cpu_share`` (other kdsearch processes pause their steps while one times).

    OMP_NUM_THREADS=1 .venv/bin/python bench/latency_contention.py 2>&1 | tee bench/out/latency_contention.txt

The timed model is the paper's student (MobileNetV2 CIFAR without its last 5 feature blocks), fp32 torch
eager at batch 1 and 128 on one thread, as a study worker started by bench/real_data.sh times it. The
neighbour is a real kdsearch training run in another process (the student trained with KD from the
online teacher on synthetic 32x32 images, one thread): the second worker of a study. Each round times
the model three ways: alone (before the neighbour starts and after it stops), beside it without the
lock (``latency.latency_ms`` directly, as studies timed before cpu_share), and beside it through
``latency.measure_latency``, which takes the lock. Ratios are against the quiet timings of this run,
on this machine. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch
from common import TEACHER, header, machine, other_cores, wait_quiet

from kdsearch.config import LatencyConfig
from kdsearch.infra.cpu_load import OtherProcesses
from kdsearch.models.classifiers import ModelConfig, build_model
from kdsearch.runtime.latency import latency_ms, measure_latency

NEIGHBOUR = """
import sys
from kdsearch.config import DataConfig, KDConfig, ModelConfig, OverlayConfig, TrainConfig
from kdsearch.distill.train import prepare_inputs, train
teacher = ModelConfig(arch="mobilenetv2_cifar")
config = TrainConfig(
    data=DataConfig(dataset="synthetic", synthetic_size=2000, val_size=100),
    student=ModelConfig(arch="mobilenetv2_cifar", drop_blocks=5), teacher=teacher, teacher_checkpoint=sys.argv[1],
    kd=KDConfig(alpha=0.5, temperature=2.5), overlay=OverlayConfig(p=0.0), epochs=1000, batch_size=128, precision="fp32", cache_dir=sys.argv[2],
)
inputs = prepare_inputs(config, progress=False)
print("training", flush=True)
train(config, inputs=inputs, progress=False)
"""


def _quiet_round(model, config, device) -> dict[int, float]:
    with OtherProcesses():
        return {batch: latency_ms(model, batch, device, config) for batch in config.batch_sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--max-wait", type=float, default=300.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = LatencyConfig(warmup=args.warmup, repeats=args.repeats, batch_sizes=(1, 128), onnx_runtimes=())
    device = torch.device("cpu")
    info = machine()
    header("Latency beside a training worker, with and without cpu_share (bench/latency_contention.py)", info)
    print(f"student, fp32 torch eager, 1 thread; warm-up {args.warmup}, median of {args.repeats} repeats")
    torch.manual_seed(0)
    student = build_model(ModelConfig(arch="mobilenetv2_cifar", drop_blocks=5))
    timings: dict[str, list[dict]] = {"quiet": [], "beside, no lock": [], "beside, cpu_share": []}

    wait_quiet(args.max_wait)
    with OtherProcesses() as others:
        quiet = _quiet_round(student, config, device)
    timings["quiet"].append({**quiet, "others": others.cores})
    with tempfile.TemporaryDirectory(prefix="kdbench-contention-") as scratch:
        # The neighbour and this process share the lock through KDSEARCH_CACHE_DIR, as two workers do.
        os.environ["KDSEARCH_CACHE_DIR"] = scratch
        environment = {**os.environ, "OMP_NUM_THREADS": "1"}
        neighbour = subprocess.Popen(
            [sys.executable, "-c", NEIGHBOUR, TEACHER, scratch],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            if neighbour.stdout.readline().strip() != "training":
                raise SystemExit("the training neighbour did not start")
            print(f"neighbour training (others use {other_cores():.2f} cores)", flush=True)
            for _ in range(args.rounds):
                with OtherProcesses() as others:
                    plain = {batch: latency_ms(student, batch, device, config) for batch in config.batch_sizes}
                timings["beside, no lock"].append({**plain, "others": others.cores})
                metrics = measure_latency(student, device, config, "student")
                timings["beside, cpu_share"].append(
                    {**{batch: metrics[f"student_b{batch}"] for batch in config.batch_sizes},
                     "others": metrics.get("student_other_cores")}
                )  # fmt: skip
            if neighbour.poll() is not None:
                raise SystemExit("the training neighbour stopped during the timings")
        finally:
            neighbour.kill()
            neighbour.wait()
    wait_quiet(args.max_wait)
    with OtherProcesses() as others:
        quiet = _quiet_round(student, config, device)
    timings["quiet"].append({**quiet, "others": others.cores})

    print(f"{'timing':<20} {'batch':>5} {'median ms':>10} {'x quiet':>8} {'others (cores)':>15}")
    summary = {}
    reference = {batch: statistics.median(row[batch] for row in timings["quiet"]) for batch in config.batch_sizes}
    for name, rows in timings.items():
        for batch in config.batch_sizes:
            ms = statistics.median(row[batch] for row in rows)
            others = statistics.median(row["others"] for row in rows if row["others"] is not None)
            summary[f"{name} b{batch}"] = {"ms": ms, "ratio": ms / reference[batch], "others": others, "n": len(rows)}
            print(f"{name:<20} {batch:>5} {ms:>10.2f} {ms / reference[batch]:>7.2f}x {others:>15.2f}", flush=True)
    print(json.dumps({"machine": info, "rounds": args.rounds, "timings": timings, "summary": summary}))


if __name__ == "__main__":
    main()
