"""Latency of the teacher, the paper's student and pruned students where they deploy: torch eager,
ONNX Runtime fp32 and int8, batch 1 and 128, 1 and 2 threads.

    .venv/bin/python bench/deploy_latency.py 2>&1 | tee bench/out/deploy_latency.txt
    .venv/bin/python bench/deploy_latency.py --students runs/cifar10-pareto/front/*/model.pt  # trained students too

The architectures are built by kdsearch (random weights: latency depends on the architecture, not on
the weights; int8 is calibrated on random images for the same reason): the teacher (MobileNetV2 CIFAR,
2,236,682 parameters), the paper's student (its last 5 blocks removed) and the teacher pruned with
Torch-Pruning at ratios 0.5 and 0.7 (``--pruned-ratios``; l2 magnitude, channels rounded to multiples
of 8), plus any student checkpoints given (named by their folder). Each is exported once and timed with
``kdsearch.runtime.timing._measure``, the function the Pareto study uses, without its cache: warm-up passes,
then the median of ``--repeats`` timed passes on one fixed batch. Speed-ups are against the teacher in
the same runtime, batch and threads, measured in this run. Before each timing the script waits (up to ``--max-wait`` s) for a quiet machine and reports
the cores other processes used during it. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from common import QUIET_CORES, header, machine, wait_quiet

from kdsearch.config import LatencyConfig, ModelConfig, Runtime
from kdsearch.infra.cpu_load import OtherProcesses
from kdsearch.models.classifiers import build_model, count_flops, count_parameters, load_model
from kdsearch.models.pruning import prune_classifier
from kdsearch.runtime.timing import Exported, _measure


def models(students: list[str], pruned_ratios: list[float]) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    teacher = build_model(ModelConfig()).eval()
    found = {"teacher": teacher, "paper student (drop 5)": build_model(ModelConfig(drop_blocks=5)).eval()}
    for ratio in pruned_ratios:
        found[f"teacher pruned {ratio:.0%}"] = prune_classifier(teacher, ratio=ratio).eval()
    for path in students:
        found[Path(path).parent.name if Path(path).name == "model.pt" else Path(path).stem] = load_model(path)[0].eval()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batch-sizes", default="1,128")
    parser.add_argument("--runtimes", default=",".join(runtime.value for runtime in Runtime))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--max-wait", type=float, default=120.0)
    parser.add_argument("--pruned-ratios", default="0.5,0.7", help="untrained pruned teachers to time ('' for none)")
    parser.add_argument("--students", nargs="*", default=[], help="student checkpoints (kdsearch .pt) to time too")
    args = parser.parse_args()
    latency = LatencyConfig(warmup=args.warmup, repeats=args.repeats)
    calibration = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    info = machine()
    header("deployment latency (bench/deploy_latency.py)", info)
    rows = []
    built = models(args.students, [float(r) for r in args.pruned_ratios.split(",") if r])
    scratch = tempfile.TemporaryDirectory()
    exported = {
        name: Exported(model, calibration, Path(scratch.name) / str(i)) for i, (name, model) in enumerate(built.items())
    }
    for name, model in built.items():
        print(f"{name}: {count_parameters(model):,} params, {count_flops(model) / 1e6:.1f} MFLOPs", flush=True)
    for runtime in args.runtimes.split(","):
        for threads in (int(n) for n in args.threads.split(",")):
            for batch in (int(n) for n in args.batch_sizes.split(",")):
                for name in built:
                    if runtime != Runtime.TORCH:
                        exported[name].path(runtime)  # export before the wait: not part of the timing
                    wait_quiet(args.max_wait)
                    with OtherProcesses() as others:
                        ms = _measure(exported[name], Runtime(runtime), batch, threads, latency)
                    rows.append({"model": name, "runtime": runtime, "threads": threads, "batch": batch, "ms": ms,
                                 "others": others.cores})  # fmt: skip
                    print(f"  {runtime:<9} {threads}t b{batch:<4} {name:<28} {ms:9.3f} ms  (others {others.cores or 0:.2f})",
                          flush=True)  # fmt: skip
    print()
    print(f"{'runtime':<9} {'thr':>3} {'batch':>5} {'model':<28} {'ms':>9} {'speed-up':>8} {'others':>6}")
    for row in rows:
        teacher = next(
            r["ms"] for r in rows
            if r["model"] == "teacher" and (r["runtime"], r["threads"], r["batch"]) == (row["runtime"], row["threads"], row["batch"])
        )  # fmt: skip
        row["speedup_vs_teacher"] = teacher / row["ms"]
        flag = " *" if (row["others"] or 0) >= QUIET_CORES else ""
        print(
            f"{row['runtime']:<9} {row['threads']:>3} {row['batch']:>5} {row['model']:<28} {row['ms']:>9.3f} "
            f"{row['speedup_vs_teacher']:>7.2f}x {row['others'] or 0:>6.2f}{flag}"
        )
    print(f"(* timed while other processes used >= {QUIET_CORES} cores)")
    print(json.dumps({"bench": "deploy_latency", "machine": info, "rows": rows}))
    scratch.cleanup()


if __name__ == "__main__":
    main()
