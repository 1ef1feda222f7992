#!/usr/bin/env bash
# The real-data runs behind BENCHMARKS.md (issue 5), each a resumable kdsearch command; run a step
# again (or after an interruption) and it continues where it stopped.
#
#   bench/real_data.sh grid    # cpu-quick 12-point grid, then TPE with pruning on the same budget
#   bench/real_data.sh noise   # baseline seed spread at the ablation's budget (3 seeds)
#   bench/real_data.sh ablate  # the ablation at the chosen budget (SEEDS=N to grow it)
#   bench/real_data.sh probe   # paired noise of a cheaper candidate budget: teacher-initialised student
#   bench/real_data.sh reports # reports of the grid, TPE and ablation into studies/results/
#
# Two steps may run side by side on the 2 cores: give each one thread (THREADS=1, the default here)
# so their OpenMP threads do not fight. Output goes to runs/logs/<step>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
KDSEARCH=${KDSEARCH:-.venv/bin/kdsearch}
export OMP_NUM_THREADS=${THREADS:-1}
mkdir -p runs/logs runs/cifar10-grid runs/cifar10-ablation runs/cifar10-probe

case "${1:-}" in
grid)
    $KDSEARCH study grid --study studies/cpu-quick.yaml --workdir runs/cifar10-grid --study-name cpu-quick-grid --no-progress
    $KDSEARCH study tpe --study studies/cpu-quick.yaml --workdir runs/cifar10-grid --study-name cpu-quick-tpe --no-progress
    ;;
noise)
    # The ablation's own budget (10,000 training images, 8 epochs): these runs are its first baseline
    # seeds, so the ablation step keeps them.
    $KDSEARCH ablate --study studies/cifar10-ablation.yaml --arms baseline --seeds 3 \
        --workdir runs/cifar10-ablation --study-name cifar10-ablation --no-progress
    ;;
ablate)
    $KDSEARCH ablate --study studies/cifar10-ablation.yaml --extra-arms ig_shuffled --seeds "${SEEDS:-3}" \
        --workdir runs/cifar10-ablation --study-name cifar10-ablation --no-progress
    ;;
probe)
    # A candidate budget for the 0.5-point target: the student starts from the teacher's kept blocks
    # (the paper does not say how its student is initialised) and trains 3 epochs; baseline and kd
    # (alpha 0.01, the smallest perturbation) measure the paired spread that sizes the seeds.
    $KDSEARCH ablate --study studies/cifar10-ablation.yaml --arms baseline,kd --seeds "${SEEDS:-4}" \
        --set train.student_init=teacher --set train.epochs=3 --agreement-images 0 \
        --workdir runs/cifar10-probe --study-name probe-teacher-init-3ep --no-progress
    ;;
reports)
    $KDSEARCH report --study cpu-quick-grid --workdir runs/cifar10-grid --out studies/results/cpu-quick-grid --plotly-js cdn
    $KDSEARCH report --study cpu-quick-tpe --workdir runs/cifar10-grid --out studies/results/cpu-quick-tpe --plotly-js cdn
    $KDSEARCH report --ablation cifar10-ablation --workdir runs/cifar10-ablation --out studies/results/cifar10-ablation --plotly-js cdn
    ;;
*)
    echo "usage: bench/real_data.sh grid|noise|ablate|probe|reports" >&2
    exit 2
    ;;
esac
