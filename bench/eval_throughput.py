"""Evaluation throughput (test-set passes): kdsearch.models.inference.predict_logits vs the forward it replaced.

    .venv/bin/python bench/eval_throughput.py 2>&1 | tee bench/out/eval_throughput.txt

Same run, same machine, same images (the first ``--images`` test images of the CIFAR-10 (JPEG q75
copy)), the shared teacher and the paper's student (the teacher's first blocks, drop_blocks=5), 2 torch
threads, in fp32 (how the teacher's accuracy is measured) and in bf16 autocast (how a student's is, on
a CPU with native bf16):

- reference: what predict_logits did before: the model itself in eval mode (BatchNorm as its own
  layer), batches of 500, channels_last input, under no_grad.
- kdsearch: predict_logits today: batches of EVAL_BATCH_SIZE (64), inference_mode, and in fp32
  BatchNorm folded into the convolutions (a copy); under bf16 autocast it does not fold, because the
  folded weights round differently (the "folded" rows show by how much).
- each change alone, to show where the speed comes from.

Before each timing the script waits (up to ``--max-wait`` s) until other processes use < 0.3 cores and
reports the cores they used during it; the best of ``--repeats`` passes is kept. The logits of both
ways are compared (max abs difference, top-1 agreement). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from common import TEACHER, Timer, cache_dir, data_config, header, machine, wait_quiet

from kdsearch.config import EVAL_BATCH_SIZE, replace
from kdsearch.data.datasets import load_splits
from kdsearch.infra.device import autocast_context
from kdsearch.models.classifiers import build_model, fold_batchnorm, init_from_teacher, load_model
from kdsearch.models.inference import predict_logits


@torch.no_grad()
def reference_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int, dtype, fold: bool) -> torch.Tensor:
    """The forward before this change (``fold=False``, batch 500), or with one of its changes."""
    model = fold_batchnorm(model) if fold else model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].float().div_(255)
        with autocast_context(torch.device("cpu"), dtype):
            outputs.append(model(batch.contiguous(memory_format=torch.channels_last)).float())
    return torch.cat(outputs)


def ways(model: torch.nn.Module, images: torch.Tensor, dtype) -> dict:
    """The reference first, each change alone, then kdsearch's predict_logits."""
    return {
        "reference (unfolded, batch 500)": lambda: reference_logits(model, images, 500, dtype, False),
        "folded, batch 500": lambda: reference_logits(model, images, 500, dtype, True),
        f"unfolded, batch {EVAL_BATCH_SIZE}": lambda: reference_logits(model, images, EVAL_BATCH_SIZE, dtype, False),
        "kdsearch predict_logits": lambda: predict_logits(model, images, dtype=dtype),
    }


def timed(run, repeats: int, max_wait: float) -> dict:
    best = None
    for _ in range(repeats):
        wait_quiet(max_wait)
        with Timer() as timer:
            logits = run()
        if best is None or timer.seconds < best["seconds"]:
            best = {"seconds": timer.seconds, "others_cores": timer.others, "logits": logits}
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-wait", type=float, default=120.0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    info = machine()
    header("evaluation throughput: predict_logits vs the unfolded batch-500 forward", info)
    splits = load_splits(data_config(None, val_size=1000), cache_dir())
    images = splits.test_images[: args.images]
    teacher, teacher_config = load_model(TEACHER)
    student = build_model(replace(teacher_config, drop_blocks=5))
    init_from_teacher(student, teacher)
    print(f"{len(images)} test images; best of {args.repeats} passes; EVAL_BATCH_SIZE {EVAL_BATCH_SIZE}")
    results = []
    for name, model in (("teacher", teacher), ("paper's student", student)):
        for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            if dtype is not None and not info["mkldnn_bf16"]:
                print(f"{name} {precision}: not run (no native bf16 on this CPU)")
                continue
            measured = {way: timed(run, args.repeats, args.max_wait) for way, run in ways(model, images, dtype).items()}
            reference = measured["reference (unfolded, batch 500)"]
            for way, result in measured.items():
                agree = float((result["logits"].argmax(1) == reference["logits"].argmax(1)).float().mean())
                row = {
                    "model": name,
                    "precision": precision,
                    "way": way,
                    "images_per_s": len(images) / result["seconds"],
                    "speedup": reference["seconds"] / result["seconds"],
                    "max_abs_logit_diff": float((result["logits"] - reference["logits"]).abs().max()),
                    "top1_agreement": 100 * agree,
                    "others_cores": result["others_cores"],
                }
                results.append(row)
                print(
                    f"{name:16s} {precision}  {way:32s} {row['images_per_s']:7.0f} img/s  {row['speedup']:5.2f}x"
                    f"  max |Δlogit| {row['max_abs_logit_diff']:.1e}  top-1 agree {row['top1_agreement']:.2f} %"
                    f"  (others {row['others_cores']:.2f} cores)",
                    flush=True,
                )
    print(json.dumps({"machine": info, "images": len(images), "rows": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
