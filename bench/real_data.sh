#!/usr/bin/env bash
# The real-data runs behind BENCHMARKS.md (issue 5), each a resumable kdsearch command; run a step
# again (or after an interruption) and it continues where it stopped.
#
#   bench/real_data.sh grid    # cpu-quick 12-point grid, then TPE with pruning on the same budget
#   bench/real_data.sh noise   # baseline seed spread at the ablation's budget (3 seeds)
#   bench/real_data.sh ablate  # the ablation at the chosen budget (SEEDS=N to grow it)
#   bench/real_data.sh ablate-teacher-init  # the same arms, student started from the teacher's blocks, 3 epochs
#   bench/real_data.sh at-gamma   # gamma of the AT arms chosen on validation accuracy (kd_at, 3 values)
#   bench/real_data.sh ablate-at  # the teacher-init ablation grown with the four AT arms (GAMMA=the chosen one, ARMS=…)
#   bench/real_data.sh ablate-at-bf16  # the AT arms, kd_ig and baseline at 3 seeds, afresh, in a study of its own
#   bench/real_data.sh pareto     # the accuracy x latency study (24 trials) of issue 12
#   bench/real_data.sh ablate-attribution  # issue 28: kd_ig, kd_saliency, kd_smoothgrad, kd_grad_cam beside baseline and kd
#   bench/real_data.sh ablate-attribution-control  # then the shuffled control of the best method (CONTROL=saliency_shuffled)
#   bench/real_data.sh pareto-mf  # issue 29: multi-fidelity Pareto study at cifar10-pareto's compute
#   bench/real_data.sh pareto-full15  # the same space and compute, every candidate 15 epochs (no rungs)
#   bench/real_data.sh pruning-recovery  # issue 29: one ~3x architecture recovered six ways (KD, CE, Taylor, steps, sparsity)
#   bench/real_data.sh pruning-recovery-3x  # the best recovery (one-shot l2, KD alpha 0.5) on two architectures over 3x
#   bench/real_data.sh paper-student-kd  # the paper's student at pruning-recovery's KD (alpha 0.5), 15 epochs: its fair reference
#   bench/real_data.sh families   # issue 27: the paper's student beside six other families, from scratch, one budget
#   bench/real_data.sh reports # reports of the grid, TPE and ablation into studies/results/
#
# Two steps may run side by side on the 2 cores: give each one thread (THREADS=1, the default here)
# so their OpenMP threads do not fight. Output goes to runs/logs/<step>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
KDSEARCH=${KDSEARCH:-.venv/bin/kdsearch}
export OMP_NUM_THREADS=${THREADS:-1}
# Background work yields to what a person runs meanwhile. `nice` alone does not do it when the step was
# started in its own session (setsid): Linux then schedules each session's group as one, whatever its
# processes' nice values, and the background step took two thirds of a core from a foreground
# `kdsearch ablate` here; the session group's own nice value does.
if [ -n "${NICE_GROUP:-}" ]; then echo "$NICE_GROUP" > /proc/self/autogroup 2>/dev/null || true; fi
mkdir -p runs/logs runs/cifar10-grid runs/cifar10-ablation

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
ablate-teacher-init)
    # A cheaper, less noisy candidate budget (see the study file); seed-major, so it can stop anywhere.
    $KDSEARCH ablate --study studies/cifar10-ablation-teacher-init.yaml --extra-arms ig_shuffled --seeds "${SEEDS:-3}" \
        --workdir runs/cifar10-ablation --study-name cifar10-ablation-teacher-init --no-progress
    ;;
at-gamma)
    # kd_at at the ablation's budget with gamma in {0.01, 0.1, 1, 10} (the reference's 0.8 is about
    # 0.005-0.0125 on this loss's scale, kdsearch/distill/attention.py), then 100 in a study of its own (a grid's
    # space is fixed) because the best validation accuracy sat at the top end: the gamma of the highest
    # *validation* accuracy is used.
    $KDSEARCH study grid --study studies/cifar10-ablation-teacher-init.yaml --t 2.5 --alpha 0.01 --p 0 \
        --gamma 0.01,0.1,1,10 --workdir runs/cifar10-ablation --study-name cifar10-at-gamma --no-progress
    $KDSEARCH study grid --study studies/cifar10-ablation-teacher-init.yaml --t 2.5 --alpha 0.01 --p 0 \
        --gamma 100 --workdir runs/cifar10-ablation --study-name cifar10-at-gamma-100 --no-progress
    ;;
ablate-at)
    # ARMS=baseline,kd,at,kd_at runs the arms without the IG overlay first: they need no IG cache (its
    # 10,000 maps took 27.5 min on 2 quiet threads of the Intel machine; on one shared AVX2 core, 1,024
    # took 14 min). Run it twice side by side (two workers) to use both cores; a later run with the
    # default arms adds the rest to the same study. Measured per run, two at a time: 10-11 min in bf16 on
    # the Intel machine, 22-31 min in fp32 on an AVX2-only AMD EPYC (BENCHMARKS.md). Opening the study
    # queues every missing point again, deferred ones included: to run some arms first, take the others
    # out once both workers have started, e.g.
    #   .venv/bin/kdsearch study defer --workdir runs/cifar10-ablation --study-name cifar10-ablation-teacher-init \
    #       --where arm=kd,kd_at,kd_ig --reason "ig_at and kd_ig_at first"
    $KDSEARCH ablate --study studies/cifar10-ablation-teacher-init.yaml \
        --arms "${ARMS:-baseline,kd,ig,kd_ig,ig_shuffled,at,ig_at,kd_at,kd_ig_at}" \
        --gamma "${GAMMA:?give GAMMA, the value at-gamma chose}" --seeds "${SEEDS:-3}" \
        --workdir runs/cifar10-ablation --study-name cifar10-ablation-teacher-init --no-progress
    ;;
ablate-at-bf16)
    # The ablate-at study lived on an AMD machine's disk (fp32, 22-31 min a run) and was lost with it
    # before its AT arms had 3 seeds each; its report stays as it ran. This runs the arms the AT
    # comparisons need afresh, on one machine and one precision, under a study name of its own. gamma 10
    # is at-gamma's choice (highest validation accuracy of kd_at), not chosen again here. Needs the IG
    # cache (ig_at, kd_ig_at, kd_ig): compute it first with `kdsearch ig compute` (THREADS=2, 27.5 min).
    $KDSEARCH ablate --study studies/cifar10-ablation-teacher-init.yaml \
        --arms "${ARMS:-baseline,at,kd_at,ig_at,kd_ig_at,kd_ig}" --gamma "${GAMMA:-10}" --seeds "${SEEDS:-3}" \
        --workdir runs/cifar10-ablation --study-name cifar10-ablation-teacher-init-bf16-at --no-progress
    ;;
ablate-attribution)
    # The method arms at the teacher-init budget, 3 seeds; before the first run it computes the saliency,
    # SmoothGrad and GradCAM caches of the 10,000 training images (IG's is the teacher-init ablation's).
    # Run it twice side by side (two workers) to use both cores; it resumes after an interruption.
    $KDSEARCH ablate --study studies/cifar10-ablation-attribution.yaml --seeds "${SEEDS:-3}" \
        --workdir runs/cifar10-ablation --study-name cifar10-ablation-attribution --no-progress
    ;;
ablate-attribution-control)
    # The shuffled control of whichever method did best in ablate-attribution, grown into the same study.
    $KDSEARCH ablate --study studies/cifar10-ablation-attribution.yaml --seeds "${SEEDS:-3}" \
        --extra-arms "${CONTROL:?give CONTROL, e.g. saliency_shuffled for the best method}" \
        --workdir runs/cifar10-ablation --study-name cifar10-ablation-attribution --no-progress
    ;;
pareto)
    $KDSEARCH study pareto --study studies/cifar10-pareto.yaml --workdir runs/cifar10-pareto --no-progress
    ;;
pareto-mf)
    # issue 29: the same compute in rungs 1 -> 3 -> 15 on the fast side of the front; one worker, two threads
    # (THREADS=2), or two workers of one thread each; it resumes after an interruption.
    $KDSEARCH study pareto --study studies/cifar10-pareto-mf.yaml --workdir runs/cifar10-pareto-mf --no-progress
    ;;
pareto-full15)
    # issue 29's side by side: the same space, cap and compute (72 epochs), every candidate trained the full
    # 15 epochs (no rungs); then compare: .venv/bin/python bench/multifidelity.py --storage
    # sqlite:///runs/cifar10-pareto-mf/studies.db --full-name <this study> --mf-name <pareto-mf's>
    $KDSEARCH study pareto --study studies/cifar10-pareto-mf.yaml --workdir runs/cifar10-pareto-mf \
        --set pareto.rungs=null --set pareto.budget_epochs=72 --no-progress
    ;;
pruning-recovery)
    # issue 29: six enqueued points, 15 epochs each; the paper's student at the same epochs is cifar10-pareto-mf's.
    $KDSEARCH study pareto --study studies/cifar10-pruning-recovery.yaml --workdir runs/cifar10-pareto-mf --no-progress
    ;;
pruning-recovery-3x)
    # pruning-recovery's best recovery on the faster architectures of cifar10-pareto-mf's front region:
    # drop 1 and drop 2, every group pruned 50 % (3.3x and ~3.6x the teacher's speed in its report).
    $KDSEARCH study pareto --study studies/cifar10-pruning-recovery.yaml --workdir runs/cifar10-pareto-mf \
        --set pareto.student_drop=[1,2] --set pareto.prune_ratios=[0.5] --set pareto.alpha=null \
        --set train.kd.alpha=0.5 --set pareto.importances=null --set pareto.recovery=null \
        --set pareto.prune_steps=null --set pareto.sparsities=null --set pareto.trials=2 \
        --set "pareto.enqueue=[{student_drop: 1, width: 1.0, prune_ratio: 0.5}, {student_drop: 2, width: 1.0, prune_ratio: 0.5}]" \
        --no-progress
    ;;
paper-student-kd)
    # The reference of the alpha-0.5 arms at equal training: cifar10-pareto-mf's first point (the enqueued paper's
    # student), 15 epochs without rungs, with KD alpha 0.5; one trial in a study of its own.
    $KDSEARCH study pareto --study studies/cifar10-pareto-mf.yaml --workdir runs/cifar10-pareto-mf \
        --set pareto.rungs=null --set pareto.budget_epochs=null --set pareto.trials=1 --set train.kd.alpha=0.5 --no-progress
    ;;
families)
    # issue 27: seven students trained once each (enqueued); run it twice side by side (two workers of one
    # thread) to use both cores; it resumes after an interruption.
    $KDSEARCH study pareto --study studies/cifar10-families.yaml --workdir runs/cifar10-families --no-progress
    ;;
reports)
    $KDSEARCH report --study cpu-quick-grid --workdir runs/cifar10-grid --out studies/results/cpu-quick-grid --plotly-js cdn
    $KDSEARCH report --study cpu-quick-tpe --workdir runs/cifar10-grid --out studies/results/cpu-quick-tpe --plotly-js cdn
    $KDSEARCH report --ablation cifar10-ablation --workdir runs/cifar10-ablation --out studies/results/cifar10-ablation --plotly-js cdn
    # The teacher-init study as grown with the AT arms (ablate-at); studies/results/cifar10-ablation-teacher-init
    # is the earlier bf16 run of its first arms, kept as it ran.
    $KDSEARCH report --ablation cifar10-ablation-teacher-init --workdir runs/cifar10-ablation \
        --out studies/results/cifar10-ablation-teacher-init-at --plotly-js cdn
    $KDSEARCH report --ablation cifar10-ablation-teacher-init-bf16-at --workdir runs/cifar10-ablation \
        --out studies/results/cifar10-ablation-teacher-init-bf16-at --plotly-js cdn
    $KDSEARCH report --study cifar10-pareto-pareto-d4e0f54e --workdir runs/cifar10-pareto \
        --out studies/results/cifar10-pareto --plotly-js cdn
    $KDSEARCH report --ablation cifar10-ablation-attribution --workdir runs/cifar10-ablation \
        --out studies/results/cifar10-ablation-attribution --plotly-js cdn
    ;;
*)
    echo "usage: bench/real_data.sh grid|noise|ablate|ablate-teacher-init|at-gamma|ablate-at|ablate-at-bf16|ablate-attribution|ablate-attribution-control|pareto|pareto-mf|pareto-full15|reports" >&2
    exit 2
    ;;
esac
