"""Large allocations reusing freed memory (kdsearch.infra.allocator) against glibc's defaults.

    .venv/bin/python bench/freed_memory.py 2>&1 | tee bench/out/freed_memory.txt

Two kinds of child process, alternating (``--rounds`` each): one as kdsearch runs (``reuse_freed_memory``
raises glibc's mmap and trim thresholds), one with KDSEARCH_REUSE_MEMORY=0 (glibc's defaults). Each child
times, fastest of ``--repeats``:
- the attribution pass: the CIFAR MobileNetV2 teacher made ready as every attribution method uses it
  (``explainable``: BatchNorm folded, parameters frozen, channels_last, fp32 depthwise backward), one
  forward + input-gradient pass over ``--ig-batch`` images (IG's internal_batch_size), precision auto;
- the training step: the paper's student (drop_blocks 5) as ``train`` builds it (fp32 depthwise
  backward, channels_last), cross-entropy forward + backward + Adam on a batch of 64, precision auto.
Ratios are the default's time over kdsearch's, measured in the same run. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import header, machine


def _fastest(step, repeats: int) -> float:
    step()
    step()  # oneDNN primitives and the allocator's first growth
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def child(ig_batch: int, repeats: int) -> dict:
    import torch

    from kdsearch.config import IGConfig, ModelConfig
    from kdsearch.distill.attribution import Attribution, explainable
    from kdsearch.infra.allocator import reuse_freed_memory
    from kdsearch.infra.device import autocast_context, resolve_precision
    from kdsearch.models.classifiers import build_model, fold_batchnorm
    from kdsearch.models.depthwise import with_fp32_depthwise_backward

    applied = reuse_freed_memory()
    torch.manual_seed(0)
    dtype = resolve_precision("auto", torch.device("cpu"))
    teacher = explainable(fold_batchnorm(build_model(ModelConfig())), Attribution("integrated_gradients", IGConfig()))
    images = torch.rand(ig_batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (ig_batch,))

    def attribution_pass():
        leaf = images.clone().requires_grad_(True)
        with autocast_context(torch.device("cpu"), dtype):
            logits = teacher(leaf)
        torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), leaf)

    student = build_model(ModelConfig(drop_blocks=5))
    with_fp32_depthwise_backward(student)
    student = student.train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    batch, batch_labels = images[:64].contiguous(memory_format=torch.channels_last), labels[:64]

    def training_step():
        with autocast_context(torch.device("cpu"), dtype):
            loss = torch.nn.functional.cross_entropy(student(batch), batch_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return {
        "applied": applied,
        "attribution_pass_ms": _fastest(attribution_pass, repeats),
        "training_step_ms": _fastest(training_step, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ig-batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.ig_batch, args.repeats)))
        return
    info = machine()
    header("Large allocations reusing freed memory (bench/freed_memory.py)", info)
    print(f"command: {' '.join(sys.argv)}")
    variants = {"kdsearch (thresholds raised)": "1", "glibc defaults (KDSEARCH_REUSE_MEMORY=0)": "0"}
    results: dict[str, list[dict]] = {name: [] for name in variants}
    command = [sys.executable, __file__, "--child", "--ig-batch", str(args.ig_batch), "--repeats", str(args.repeats)]
    for _ in range(args.rounds):
        for name, flag in variants.items():
            output = subprocess.run(
                command, env=os.environ | {"KDSEARCH_REUSE_MEMORY": flag}, capture_output=True, text=True, check=True
            )
            results[name].append(json.loads(output.stdout.strip().splitlines()[-1]))
    keys = ("attribution_pass_ms", "training_step_ms")
    best = {name: {key: min(run[key] for run in runs) for key in keys} for name, runs in results.items()}
    mine, default = best["kdsearch (thresholds raised)"], best["glibc defaults (KDSEARCH_REUSE_MEMORY=0)"]
    applied = {name: runs[0]["applied"] for name, runs in results.items()}
    print(f"thresholds raised in the children: {applied}")
    print(f"{'':44} {'attribution pass':>17} {'training step':>14}")
    for name, row in best.items():
        print(f"{name:44} {row[keys[0]]:>14.1f} ms {row[keys[1]]:>11.1f} ms")
    ratios = {key: default[key] / mine[key] for key in keys}
    print(f"{'defaults / kdsearch':44} {ratios[keys[0]]:>16.2f}x {ratios[keys[1]]:>13.2f}x")
    print(json.dumps({"bench": "freed_memory", "machine": info, "best_ms": best, "ratios": ratios}))


if __name__ == "__main__":
    main()
