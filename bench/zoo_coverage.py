"""How much of the model zoo kdsearch takes: every classification builder of torchvision and a sample of
timm models through build → one KD step → prune → ONNX export with parity, at 32 pixels (with the
small-image stem) and at 224.

Each (model, size) is one row of a CSV that later runs resume from (rows already there are skipped), so
the survey can run in the background and be cut. Models over --max-params parameters are skipped and
listed as such (building and timing them on a 2-core CPU takes minutes each). Steps:

- build: ``ModelConfig(arch=SOURCE:NAME)`` built, and one forward of two images gives (2, 10) logits;
- kd: one KD step (``kd_loss`` against fixed random teacher logits, Adam) on 8 random images, loss finite;
- prune: Torch-Pruning at ratio 0.3 (``prune_classifier``), the pruned layers recorded, and the model
  rebuilt from them gives the pruned model's logits;
- export: ONNX export of the (unpruned) model and top-1 agreement 100 % on 8 images, max |Δlogit| < 1e-3
  (relative to the largest logit where that exceeds 1).

A model made for one input size (timm's ``fixed_input_size``: ViTs, Swins…; torchvision's ViTs and
MaxViT) is built for the survey's size through ``builder_args`` (``img_size``, ``image_size``,
``input_size``) and without the small-image stem, as a user would.

Each model runs in a child process capped at --memory-gb of address space and --timeout-s: a model that
exhausts memory (SwinV2 at 32 pixels took 21 GB and the kernel's OOM killer ended the whole survey) or
hangs is recorded as failing the step it was in, and the survey goes on.

    python bench/zoo_coverage.py --sizes 32,224 --timm-sample 50 --out bench/out/zoo_coverage.csv
    python bench/zoo_coverage.py --summary bench/out/zoo_coverage.csv      # the table BENCHMARKS.md shows
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kdsearch.config import ModelConfig, replace
from kdsearch.distill.losses import kd_loss
from kdsearch.distill.preflight import check_logits
from kdsearch.models.classifiers import build_model, changed_layers, count_parameters
from kdsearch.models.inference import predict_logits
from kdsearch.models.pruning import prune_classifier
from kdsearch.models.sources import torchvision_names
from kdsearch.runtime.onnx_runtime import export_onnx, parity, session

STEPS = ("build", "kd", "prune", "export")
FIELDS = ["source", "model", "size", "params", *STEPS, "seconds", "failure"]


def timm_sample(count: int) -> list[str]:
    """``count`` timm models spread evenly over its sorted list (one of every few), without its test models."""
    import timm

    names = [name for name in timm.list_models() if not name.startswith("test_")]
    stride = max(1, len(names) // count)
    return names[::stride][:count]


def one_kd_step(model: torch.nn.Module, size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, size, size, generator=generator)
    labels = torch.arange(8) % 10
    teacher = torch.randn(8, 10, generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    loss = kd_loss(model(images), teacher, labels, alpha=0.5, temperature=2.5)
    if not math.isfinite(loss.item()):
        raise RuntimeError(f"KD loss is {loss.item()}")
    loss.backward()
    optimizer.step()


def _prune_and_rebuild(model: torch.nn.Module, config: ModelConfig, size: int) -> None:
    pruned = prune_classifier(model, ratio=0.3, image_size=size).eval()
    layers = changed_layers(pruned, build_model(config))
    rebuilt = build_model(replace(config, pruned_layers=layers))
    rebuilt.load_state_dict(pruned.state_dict())
    images = torch.rand(2, 3, size, size)
    with torch.no_grad():
        if not torch.allclose(rebuilt.eval()(images), pruned(images), atol=1e-5):
            raise RuntimeError("the model rebuilt from its pruned layers differs from the pruned one")


def _export_with_parity(model: torch.nn.Module, size: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = export_onnx(model, Path(scratch) / "model.onnx", size)
        images = (torch.rand(8, 3, size, size) * 255).to(torch.uint8)
        report = parity(model, session(path), images, batch_size=8)
        scale = predict_logits(model, images).abs().max().item()
    # fp32 rounding is relative: an untrained network's eval-mode BatchNorm (statistics at their initial
    # values) can reach logits of 1e14 (torchvision's Inception v3 at 224), where 1e-3 absolute is below
    # one ulp; so the bound is 1e-3 of the largest logit where that exceeds 1
    if report["top1_agreement"] < 100.0 or report["max_abs_logit_diff"] >= 1e-3 * max(1.0, scale):
        raise RuntimeError(
            f"ONNX parity {report['top1_agreement']:.1f} % top-1, max |Δlogit| {report['max_abs_logit_diff']:.2e} "
            f"(largest |logit| {scale:.2e})"
        )


# torchvision builders made for one input size, and the arguments that set it
TORCHVISION_INPUT_SIZE = {
    "vit_": lambda size: {"image_size": size},
    "maxvit_t": lambda size: {"input_size": (size, size)},
}


def size_args(source: str, name: str, size: int) -> dict:
    """The builder_args that build a model made for one input size (timm's ``fixed_input_size``: ViTs,
    Swins, LeViT…; torchvision's ViTs and MaxViT) for ``size``, as a user would; {} for the others."""
    if source == "timm":
        import timm

        return {"img_size": size} if getattr(timm.get_pretrained_cfg(name), "fixed_input_size", False) else {}
    arguments = next((args for prefix, args in TORCHVISION_INPUT_SIZE.items() if name.startswith(prefix)), None)
    return arguments(size) if arguments else {}


def survey(
    source: str, name: str, size: int, max_params: float, on_step: Callable[[dict], None] = lambda row: None
) -> dict:
    """One model at one size through the steps: build and KD gate the rest; pruning and export are
    independent of each other (a model Torch-Pruning cannot prune may still export). ``on_step`` gets the
    row as each step starts, with that step marked "running"."""
    row = {"source": source, "model": name, "size": size, **dict.fromkeys(STEPS, ""), "failure": ""}
    start = time.perf_counter()
    # a model made for one input size is built for this one; its first convolution is a patch embedding,
    # not a stem to make stride 1
    fixed = size_args(source, name, size)
    config = ModelConfig(
        arch=f"{source}:{name}",
        cifar_stem=size <= 64 and not fixed,
        builder_args=fixed or None,
        normalization="imagenet",
    )
    failures = []

    def attempt(step: str, work) -> bool:
        row[step] = "running"
        on_step(dict(row, seconds=f"{time.perf_counter() - start:.1f}"))
        try:
            work()
        except Exception as error:  # the survey records why a model fails, whatever the library raised
            row[step] = "fail"
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            failures.append(f"{step}: {type(error).__name__}: {reason}"[:300])
            row["failure"] = "; ".join(failures)
            return False
        row[step] = "ok"
        return True

    def count() -> None:
        try:  # the meta device: a giant's size without its memory
            with torch.device("meta"):
                row["params"] = count_parameters(build_model(config))
        except NotImplementedError:  # builders that compute on tensors (RegNet's widths) need a real device
            row["params"] = count_parameters(build_model(config))

    model = None

    def build() -> None:
        nonlocal model
        torch.manual_seed(0)
        model = build_model(config)
        check_logits(model, config, size)

    if attempt("build", count) and row["params"] > max_params:
        row["build"], row["failure"] = "skipped", f"over {max_params:.0f} parameters"
    elif row["build"] == "ok" and attempt("build", build) and attempt("kd", lambda: one_kd_step(model, size)):
        model.eval()
        attempt("prune", lambda: _prune_and_rebuild(model, config, size))
        attempt("export", lambda: _export_with_parity(model, size))
    row["seconds"] = f"{time.perf_counter() - start:.1f}"
    return row


def _survey_child(sender, source: str, name: str, size: int, max_params: float, memory_gb: float, threads: int) -> None:
    torch.set_num_threads(threads)
    cap = int(memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))  # past it allocations fail (MemoryError) in the step
    sender.send(survey(source, name, size, max_params, on_step=sender.send) | {"done": True})


def survey_isolated(
    source: str, name: str, size: int, max_params: float, memory_gb: float, timeout_s: float, threads: int
) -> dict:
    """``survey`` in a forked child (the parent has run no tensor work, so forking is safe) under an
    address-space cap; a child that is killed or outlives ``timeout_s`` fails the step it was in."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_survey_child, args=(sender, source, name, size, max_params, memory_gb, threads))
    start = time.perf_counter()
    child.start()
    sender.close()
    row: dict = {}
    while not row.get("done"):
        left = timeout_s - (time.perf_counter() - start)
        try:
            if left <= 0 or not receiver.poll(left):
                break
            row = receiver.recv()
        except EOFError:  # the child died without a word
            break
    child.kill()
    child.join()
    if row.get("done"):
        return {key: value for key, value in row.items() if key != "done"}
    timed_out = time.perf_counter() - start >= timeout_s
    row = row or {"source": source, "model": name, "size": size, **dict.fromkeys(STEPS, ""), "failure": ""}
    step = next((step for step in STEPS if row[step] == "running"), "build")
    row[step] = "fail"
    why = f"timed out after {timeout_s:.0f} s" if timed_out else f"the process died (exit code {child.exitcode})"
    row["failure"] = "; ".join(filter(None, [row.get("failure"), f"{step}: {why}"]))
    row["seconds"] = f"{time.perf_counter() - start:.1f}"
    return row


def summary(path: Path) -> str:
    rows = list(csv.DictReader(path.open()))
    lines = [
        "| source | size | models | not tried (over the size limit) | build | KD step | prune | ONNX export |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for source in sorted({row["source"] for row in rows}):
        for size in sorted({int(row["size"]) for row in rows if row["source"] == source}):
            group = [row for row in rows if row["source"] == source and int(row["size"]) == size]
            tried = [row for row in group if row["build"] != "skipped"]
            counts = [sum(row[step] == "ok" for row in tried) for step in STEPS]
            cells = " | ".join(f"{count}/{len(tried)} ({100 * count / max(len(tried), 1):.0f} %)" for count in counts)
            skipped = len(group) - len(tried)
            lines.append(f"| {source} | {size} | {len(group)} | {skipped} | {cells} |")
    failures = sorted(
        (row for row in rows if row["failure"] and row["build"] != "skipped"),
        key=lambda row: (row["source"] != "torchvision", int(row["size"]), row["model"]),
    )
    lines += ["", "Failures:", ""]
    lines += [f"- {row['source']}:{row['model']} at {row['size']}: {row['failure']}" for row in failures]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="32,224")
    parser.add_argument("--timm-sample", type=int, default=50, help="0: torchvision only")
    parser.add_argument("--max-params", type=float, default=100e6)
    parser.add_argument("--out", type=Path, default=Path("bench/out/zoo_coverage.csv"))
    parser.add_argument("--threads", type=int, default=2, help="1 beside a background study")
    parser.add_argument("--memory-gb", type=float, default=10.0, help="address-space cap of each model's process")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="time limit of each model's process")
    parser.add_argument("--summary", type=Path, help="print the table of an existing CSV and exit")
    args = parser.parse_args()
    if args.summary is not None:
        print(summary(args.summary))
        return
    done = set()
    if args.out.exists():
        done = {(row["source"], row["model"], row["size"]) for row in csv.DictReader(args.out.open())}
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", newline="") as handle:
            csv.DictWriter(handle, FIELDS).writeheader()
    models = [("torchvision", name) for name in torchvision_names()]
    models += [("timm", name) for name in timm_sample(args.timm_sample)] if args.timm_sample > 0 else []
    for size in (int(size) for size in args.sizes.split(",")):
        for source, name in models:
            if (source, name, str(size)) in done:
                continue
            row = survey_isolated(source, name, size, args.max_params, args.memory_gb, args.timeout_s, args.threads)
            with args.out.open("a", newline="") as handle:
                csv.DictWriter(handle, FIELDS).writerow(row)
            print(f"{source}:{name} @{size}: " + " ".join(f"{step}={row[step] or '-'}" for step in STEPS)
                  + f" ({row['seconds']} s) {row['failure']}", flush=True)  # fmt: skip
    print(summary(args.out))


if __name__ == "__main__":
    main()
