"""Concurrent kdsearch processes on one machine: torch threads = all cores (before) vs sized to a share (after).

    .venv/bin/python bench/cpu_sharing.py 2>&1 | tee bench/out/cpu_sharing.txt

Each process trains the paper's student (543,498 parameters) for ``--epochs`` epochs on a stratified
``--train-subset`` of the CIFAR-10 (JPEG q75 copy) training split (val_size 5000), batch 64, online
teacher, alpha 0.01, T 2.5, no overlay (no IG cache needed), precision auto, through
``kdsearch.distill.train.train``. Its images/s is ``TrainResult.images_per_s`` (training steps only).

Scenarios, one after another, every process of one scenario started together:

- alone: one process, threads sized by kdsearch (all cores when alone): the reference.
- N before: N processes each running as many torch threads as the machine has cores (what every
  kdsearch process did before the per-machine registry; KDSEARCH_THREADS=<cores>).
- N after: N processes sizing their threads with ``cpu_share.share_threads`` (cores // live kdsearch
  processes, lowered to what others left free), each scenario with a runtime directory of its own.

Per scenario: each process's images/s and threads, their sum (throughput of the machine), and the
sum as a fraction of "alone" (1.0: sharing cost nothing). Before the first scenario the script waits
(up to ``--max-wait`` s) for other processes to use < 0.3 cores. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from common import TEACHER, cache_dir, data_config, header, machine, wait_quiet


def _worker(args: argparse.Namespace) -> None:
    import torch

    from kdsearch.config import KDConfig, OptimConfig, OverlayConfig, TrainConfig
    from kdsearch.distill.train import train

    config = TrainConfig(
        data=data_config(args.train_subset),
        teacher_checkpoint=args.teacher,
        kd=KDConfig(alpha=0.01, temperature=2.5, teacher_logits="online"),
        overlay=OverlayConfig(p=0.0),
        optim=OptimConfig(optimizer="adam", lr=1e-3),
        epochs=args.epochs,
        batch_size=64,
        device="cpu",
        cache_dir=str(cache_dir()),
    )
    result = train(config, progress=False)
    print(json.dumps({"images_per_s": result.images_per_s, "threads": torch.get_num_threads()}), flush=True)


def _scenario(name: str, processes: int, pinned: int | None, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as runtime:
        environment = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "KDSEARCH_THREADS")}
        environment["KDSEARCH_RUNTIME_DIR"] = runtime
        if pinned is not None:
            environment["KDSEARCH_THREADS"] = str(pinned)
        command = [sys.executable, __file__, "--worker", "--train-subset", str(args.train_subset)]
        command += ["--epochs", str(args.epochs), "--teacher", args.teacher]
        workers = [
            subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, text=True) for _ in range(processes)
        ]
        results = []
        for worker in workers:
            output, _ = worker.communicate(timeout=3600)
            if worker.returncode != 0:
                raise SystemExit(f"{name}: a worker failed (exit {worker.returncode})")
            results.append(json.loads(output.strip().splitlines()[-1]))
    total = sum(r["images_per_s"] for r in results)
    return {"scenario": name, "processes": processes, "per_process": results, "total_images_per_s": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--train-subset", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--processes", default="2", help="comma-separated process counts to compare")
    parser.add_argument("--teacher", default=TEACHER)
    parser.add_argument("--max-wait", type=float, default=120)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    info = machine()
    header("concurrent kdsearch processes: threads = cores vs a share of them", info)
    cores = len(os.sched_getaffinity(0))
    print(f"cores {cores}; {args.epochs} epochs on {args.train_subset} images per process")
    print(f"others at start: {wait_quiet(args.max_wait):.2f} cores")
    rows = [_scenario("alone", 1, None, args)]
    for count in (int(n) for n in args.processes.split(",")):
        rows.append(_scenario(f"{count} before (threads = {cores} each)", count, cores, args))
        rows.append(_scenario(f"{count} after (threads sized)", count, None, args))
    alone = rows[0]["total_images_per_s"]
    print("| scenario | threads per process | img/s per process | total img/s | total / alone |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        threads = ", ".join(str(r["threads"]) for r in row["per_process"])
        rates = ", ".join(f"{r['images_per_s']:.1f}" for r in row["per_process"])
        row["total_vs_alone"] = row["total_images_per_s"] / alone
        print(
            f"| {row['scenario']} | {threads} | {rates} | {row['total_images_per_s']:.1f} | {row['total_vs_alone']:.2f} |"
        )
    print(json.dumps({"machine": info, "rows": rows}))


if __name__ == "__main__":
    main()
