#!/usr/bin/env bash
# kdsearch's CUDA paths on a GPU machine: AMP training (bf16, and fp16 with gradient scaling), IG on
# CUDA against the CPU, latency with CUDA synchronisation, the IG cache of a few thousand real images
# (img/s), and a short real-data KD+IG training. One summary line per check on stdout; exit 1 if one
# failed. Without a CUDA GPU it says so and exits 0.
#
# Made for the device tool, which runs one command on a GPU machine over a copy of the working tree.
# That machine has its own python3 with CUDA torch (not this .venv: too big to carry, and built here)
# and no package index, and ../shared does not travel. So, once, here:
#
#   bench/gpu_check.sh pack    # -> bench/out/gpu_check/ (~16 MB, git-ignored): wheels of captum and
#                              #    torch-pruning, the ../shared teacher, 5,000 train + 2,000 test JPEGs
#
# then: device run, command "bash bench/gpu_check.sh", carry ["bench/out/gpu_check"], timeout_s 480.
# Without the pack it still runs the synthetic checks if captum and torch-pruning import there.
# kdsearch is imported from this checkout (PYTHONPATH), not installed. Settings: PYTHON (default:
# .venv/bin/python where it runs, else python3), GPU_CHECK_IMAGES (ig_cache's synthetic images when
# nothing is packed, default 5000), GPU_CHECK_TIMEOUT (seconds per check, default 300). With $OUT set
# (the device tool's output folder), the full log is copied there as gpu_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PACK=bench/out/gpu_check
SHARED=${SHARED:-../shared}

pack() {
    local teacher=$SHARED/models/mobilenetv2_cifar10jpeg_teacher.pt data=$SHARED/data/cifar10-jpeg pip=.venv/bin/pip
    [ -x "$pip" ] || pip="python3 -m pip"
    rm -rf "$PACK" && mkdir -p "$PACK/wheels" "$PACK/data"
    # Pure-Python wheels, the versions this .venv has; the GPU image has their dependencies.
    $pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$PACK/wheels" \
        "captum==$($pip show captum | sed -n 's/^Version: //p')" \
        "torch-pruning==$($pip show torch-pruning | sed -n 's/^Version: //p')"
    if [ -f "$teacher" ] && [ -d "$data" ]; then
        cp "$teacher" "$PACK/teacher.pt"
        local split class count files
        for split in train test; do
            count=$([ "$split" = train ] && echo 500 || echo 200)  # per class
            for class in "$data/$split"/*/; do
                files=("$class"*.jpg)  # sorted
                mkdir -p "$PACK/data/$split/$(basename "$class")"
                cp "${files[@]:0:$count}" "$PACK/data/$split/$(basename "$class")"
            done
        done
    else
        echo "pack: no $teacher or $data: the real-data checks will be skipped"
    fi
    echo "pack: $(du -sh --apparent-size "$PACK" | cut -f1) in $PACK; device run: command \"bash bench/gpu_check.sh\", carry [\"$PACK\"]"
}

case "${1:-run}" in
pack) pack; exit 0 ;;
run) ;;
*) echo "usage: bench/gpu_check.sh [run|pack]" >&2; exit 2 ;;
esac

if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    if .venv/bin/python -c "" 2>/dev/null; then PYTHON=.venv/bin/python; fi
fi
# stdout alone: a CUDA build of torch on a machine without a driver may warn on stderr.
if ! gpu=$($PYTHON -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>/dev/null); then
    echo "gpu_check: $PYTHON cannot import torch"
    exit 1
fi
if [ -z "$gpu" ]; then
    echo "gpu_check: no CUDA GPU here ($($PYTHON -c 'import torch; print("torch", torch.__version__)')): nothing to check"
    exit 0
fi

WORK=$(mktemp -d /tmp/kdsearch-gpu-check.XXXXXX)
LOG=$WORK/gpu_check.log
export KDSEARCH_CACHE_DIR=$WORK/cache PYTHONPATH=$REPO PYTHONUNBUFFERED=1 GPU_CHECK_WORK=$WORK
export GPU_CHECK_PACK=$REPO/$PACK GPU_CHECK_IMAGES=${GPU_CHECK_IMAGES:-5000}
if compgen -G "$PACK/wheels/*.whl" >/dev/null; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$PACK"/wheels/*.whl
    export PYTHONPATH=$REPO:$WORK/site
fi
failed=0
total=0

# check NAME: runs the Python on stdin; its last line is the summary. On failure: the log's last lines.
check() {
    local name=$1 status=0
    total=$((total + 1))
    echo "=== $name" >>"$LOG"
    timeout "${GPU_CHECK_TIMEOUT:-300}" $PYTHON - >"$WORK/$name.log" 2>&1 || status=$?
    cat "$WORK/$name.log" >>"$LOG"
    if [ "$status" = 0 ]; then
        echo "gpu_check: $name: $(tail -n 1 "$WORK/$name.log")"
    else
        failed=$((failed + 1))
        echo "gpu_check: $name: FAILED (exit $status$([ "$status" = 124 ] && echo ", timed out")); last lines:"
        if [ -s "$WORK/$name.log" ]; then tail -n 15 "$WORK/$name.log" | sed 's/^/    /'; else echo "    (no output)"; fi
    fi
}

check device <<'PY'
import platform, torch
props = torch.cuda.get_device_properties(0)
print(f"{props.name}, {props.total_memory / 2**30:.0f} GiB, capability {props.major}.{props.minor}, "
      f"bf16 {'native' if torch.cuda.is_bf16_supported() else 'no'}; torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, Python {platform.python_version()}")
PY

check train_amp <<'PY'
# A tiny teacher, then KD+IG students in fp32, bf16 and fp16 autocast (fp16 with its GradScaler) on CUDA.
import math, os
from kdsearch.config import DataConfig, KDConfig, ModelConfig, OverlayConfig, TrainConfig, replace
from kdsearch.models.classifiers import save_checkpoint
from kdsearch.distill.teacher import TeacherRecipe, recipe_config
from kdsearch.distill.train import train

work = os.environ["GPU_CHECK_WORK"]
data = DataConfig(dataset="synthetic", synthetic_size=2000, val_size=400)
tiny = ModelConfig(arch="tiny_cnn")
teacher = train(
    replace(recipe_config(data, tiny, TeacherRecipe(epochs=2, batch_size=64, lr=0.05)), device="cuda", precision="fp32"),
    progress=False,
)
assert next(teacher.model.parameters()).is_cuda
save_checkpoint(teacher.model, tiny, f"{work}/tiny_teacher.pt")
results = {}
for precision in ("fp32", "bf16", "fp16"):
    config = TrainConfig(
        data=data, student=ModelConfig(arch="tiny_cnn", drop_blocks=1), teacher=tiny,
        teacher_checkpoint=f"{work}/tiny_teacher.pt", kd=KDConfig(alpha=0.5, temperature=2.0),
        overlay=OverlayConfig(p=0.5), epochs=2, batch_size=64, device="cuda", precision=precision,
    )
    result = train(config, progress=False)  # raises TrainingDiverged on a NaN/inf loss
    assert math.isfinite(result.val_acc) and result.val_acc > 20, (precision, result.val_acc)  # chance: 10 %
    results[precision] = result
print(f"teacher val_acc {teacher.val_acc:.1f} %; KD+IG students val_acc "
      + ", ".join(f"{p} {r.val_acc:.1f} %" for p, r in results.items())
      + " (synthetic, tiny_cnn, 2 epochs); img/s " + ", ".join(f"{p} {r.images_per_s:.0f}" for p, r in results.items()))
PY

check ig_cuda <<'PY'
# The tiny teacher's IG cache on CUDA (fp32 and auto = bf16) against the same maps computed on the CPU.
import os, torch
from kdsearch.distill.attribution import ig_maps
from kdsearch.config import DataConfig, IGConfig, ModelConfig
from kdsearch.data.datasets import load_splits
from kdsearch.models.classifiers import load_model

work = os.environ["GPU_CHECK_WORK"]
splits = load_splits(DataConfig(dataset="synthetic", synthetic_size=2000, val_size=400))
teacher = load_model(f"{work}/tiny_teacher.pt", ModelConfig(arch="tiny_cnn"))[0].eval()
def maps(device, precision):
    artifact = ig_maps(teacher, splits, IGConfig(precision=precision), f"{work}/ig-{device}-{precision}",
                       torch.device(device), progress=False)
    return artifact.tensors["maps"].float().flatten(1), artifact.meta
def agreement(a, b):  # mean and min per-image Pearson correlation
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    return r.mean().item(), r.min().item()
cpu, _ = maps("cpu", "fp32")
cuda32, meta32 = maps("cuda", "fp32")
cuda_auto, meta_auto = maps("cuda", "auto")
same = agreement(cuda32, cpu)
bf16 = agreement(cuda_auto, cpu)
assert same[1] > 0.999, same
assert bf16[0] > 0.97, bf16
error = {m["settings"]["precision"]: m["completeness_relative_error"]["median"] for m in (meta32, meta_auto)}
print(f"{len(cpu)} maps: CUDA fp32 vs CPU agreement mean {same[0]:.5f} min {same[1]:.5f}; CUDA "
      f"{meta_auto['settings']['precision']} vs CPU mean {bf16[0]:.4f} min {bf16[1]:.4f}; median completeness "
      f"error " + ", ".join(f"{p} {e:.4f}" for p, e in error.items()))
PY

check latency_cuda <<'PY'
# measure_latency synchronises CUDA: at a batch large enough that the GPU's work outlasts the kernel
# launches, its wall-clock median must match CUDA events' (without the synchronisation it would time
# the launches alone).
import statistics, torch
from kdsearch.config import ModelConfig
from kdsearch.config import LatencyConfig
from kdsearch.runtime.latency import measure_latency
from kdsearch.models.classifiers import build_model

device = torch.device("cuda")
student = build_model(ModelConfig(drop_blocks=5)).eval()
sizes = (1, 128, 4096)
measured = measure_latency(student, device, LatencyConfig(warmup=5, repeats=20, batch_sizes=sizes), "latency_ms")
model = student.to(device).to(memory_format=torch.channels_last)
images = torch.rand(sizes[-1], 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
timings = []
with torch.no_grad():
    for index in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(images)
        end.record()
        torch.cuda.synchronize()
        if index >= 5:
            timings.append(start.elapsed_time(end))
events = statistics.median(timings)
ratio = measured[f"latency_ms_b{sizes[-1]}"] / events
assert 0.8 < ratio < 1.5, (measured, events)
print("paper's student, fp32: " + ", ".join(f"b{s} {measured[f'latency_ms_b{s}']:.3f} ms" for s in sizes)
      + f"; b{sizes[-1]} / CUDA events ({events:.3f} ms) = {ratio:.2f}")
PY

check ig_cache <<'PY'
# The teacher's IG cache of the training images on CUDA, timed from cold at kdsearch's IG defaults, into
# the cache that real_kd_ig then reads; its first 32 maps against the CPU's fp32 maps. Real data and
# teacher when packed, else synthetic images and a random MobileNetV2 (the same work per image, so the
# same img/s, but maps of random weights to compare are meaningless).
import os, time, torch
from pathlib import Path
from kdsearch.distill.attribution import BASELINES, Attribution, ig_maps, maps_in_calls, resolve_ig_precision
from kdsearch.config import DataConfig, IGConfig, ModelConfig, default_cache_dir
from kdsearch.data.datasets import load_splits
from kdsearch.models.classifiers import build_model, fold_batchnorm, load_model

pack = Path(os.environ["GPU_CHECK_PACK"])
real = (pack / "data" / "train").is_dir() and (pack / "teacher.pt").is_file()
if real:
    data = DataConfig(dataset="folder", data_dir=str(pack / "data"), val_size=500, label="CIFAR-10 (JPEG q75 copy)")
    teacher, what = load_model(pack / "teacher.pt", ModelConfig())[0], "CIFAR-10 JPEG subset, ../shared teacher"
else:
    data = DataConfig(dataset="synthetic", synthetic_size=int(os.environ["GPU_CHECK_IMAGES"]), val_size=500)
    teacher, what = build_model(ModelConfig()), "synthetic images, random MobileNetV2: no pack here"
teacher.eval()
splits = load_splits(data)
config = IGConfig()
device = torch.device("cuda")
start = time.perf_counter()
maps = ig_maps(teacher, splits, config, default_cache_dir(), device, progress=False).tensors["maps"]
seconds = time.perf_counter() - start
count = len(splits.train_labels)
assert maps.shape[0] == count and torch.isfinite(maps.float()).all()
compared = "not compared with the CPU's"
if real:
    baseline = BASELINES[config.baseline](teacher, splits)
    fp32 = IGConfig(precision="fp32")
    images, labels = splits.train_images[:32], splits.train_labels[:32]
    cpu, _ = maps_in_calls(fold_batchnorm(teacher), images, labels, baseline, Attribution(ig=fp32))
    a, b = maps[:32].float().flatten(1), cpu.flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    agreement = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean().item()
    assert agreement > 0.97, agreement
    compared = f"agreement of 32 with the CPU's fp32 maps {agreement:.4f}"
precision = resolve_ig_precision(config, device).precision
print(f"{count} images in {seconds:.1f} s = {count / seconds:.0f} img/s ({what}; {config.n_steps} "
      f"{config.method} steps, {precision}, internal batch {config.internal_batch_size}, {config.images_per_call} "
      f"images per call, cache write included); {compared}")
PY

check real_kd_ig <<'PY'
# A short KD+IG training of the paper's student from the real teacher (its IG maps: ig_cache's).
import os, sys
from pathlib import Path
from kdsearch.config import DataConfig, KDConfig, ModelConfig, OverlayConfig, TrainConfig
from kdsearch.distill.train import train

pack = Path(os.environ["GPU_CHECK_PACK"])
if not ((pack / "data" / "train").is_dir() and (pack / "teacher.pt").is_file()):
    print("skipped: no real data or teacher here (run `bench/gpu_check.sh pack` here and carry bench/out/gpu_check)")
    sys.exit(0)
config = TrainConfig(
    data=DataConfig(dataset="folder", data_dir=str(pack / "data"), val_size=500, label="CIFAR-10 (JPEG q75 copy)"),
    student=ModelConfig(drop_blocks=5), teacher=ModelConfig(), teacher_checkpoint=str(pack / "teacher.pt"),
    kd=KDConfig(alpha=0.01, temperature=2.5), overlay=OverlayConfig(p=0.1), epochs=3, batch_size=64, device="cuda",
)
result = train(config, run_dir=f"{os.environ['GPU_CHECK_WORK']}/real-run", progress=False)
assert result.val_acc > 15, result.val_acc  # 3 epochs from random init on 4,500 images: well above 10 % chance
tests = sum(1 for _ in (pack / "data" / "test").rglob("*.jpg"))
print(f"paper's student, T 2.5, alpha 0.01, p 0.1, 3 epochs, batch 64, auto precision: val_acc {result.val_acc:.1f} %, "
      f"test_acc {result.test_acc:.1f} % ({tests} test images), {result.images_per_s:.0f} img/s, "
      f"train {result.train_time_s:.1f} s, setup {result.setup_time_s:.1f} s (IG maps read from ig_cache's cache)")
PY

echo "gpu_check: $((total - failed))/$total checks passed on $gpu (log: $LOG)"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then cp "$LOG" "$OUT/gpu_check.log"; fi
[ "$failed" = 0 ]
