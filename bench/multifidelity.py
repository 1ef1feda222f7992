"""Multi-fidelity Pareto search against today's full-budget search, at equal total compute.

Both searches run here as kdsearch Pareto studies over the same space, on the same data, with the same
sampler seed: the full-budget one trains every candidate for the last rung's epochs; the multi-fidelity
one trains in rungs (``--rungs``) and promotes the best 1/``--reduction`` of each rung. Compute is the
epochs actually trained over all trials (stopped ones included; both train on the same images); the
multi-fidelity study's ``pareto.budget_epochs`` is the full study's epochs, so it trains at most as
much (its trial count is only an upper bound), and both studies' epochs are printed. Each
search's quality is the hypervolume of its validation front (accuracy ↑, latency ↓) against one reference
point for both: accuracy 0 and 1.1 × the slowest latency either study measured. Printed: both budgets,
both hypervolumes and their ratio; the last line is JSON.

    python bench/multifidelity.py --study studies/smoke.yaml --full-trials 6 --rungs 1,3,9
    python bench/multifidelity.py --study studies/cifar10-pareto.yaml --storage sqlite:///runs/mf/studies.db \\
        --full-name cifar10-pareto-... --mf-name cifar10-pareto-mf   # read two studies that already ran

On synthetic data (studies/smoke.yaml) it takes minutes; on real data use bench/real_data.sh's step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import optuna
from optuna.trial import TrialState

from kdsearch.search.launch import Workspace
from kdsearch.search.rungs import rung_accuracies
from kdsearch.search.studyfile import load_study


def hypervolume(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by ``points`` (accuracy ↑, latency ↓) and bounded by ``reference`` (accuracy, latency)."""
    ordered = sorted((p for p in points if p[0] > reference[0] and p[1] < reference[1]), key=lambda p: p[1])
    area, best = 0.0, reference[0]
    for index, (accuracy, latency) in enumerate(ordered):
        best = max(best, accuracy)
        following = ordered[index + 1][1] if index + 1 < len(ordered) else reference[1]
        area += (best - reference[0]) * (following - latency)
    return area


def epochs_trained(study: optuna.Study) -> int:
    """Epochs trained over the study's finished trials (the last rung each reached, or the full budget)."""
    spec = study.user_attrs["kdsearch"]["spec"]
    total = 0
    for trial in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if "same_as_trial" in trial.user_attrs or "latency_ms" not in trial.user_attrs:
            continue  # a repeated point trains nothing
        rungs = list(rung_accuracies(trial.user_attrs))
        if trial.state == TrialState.PRUNED and not rungs:
            continue  # slower than max_latency_ms: timed, never trained
        total += max(rungs) if rungs else int(spec["train"]["epochs"])
    return total


def front_points(study: optuna.Study) -> list[tuple[float, float]]:
    return [(trial.values[0], trial.values[1]) for trial in study.best_trials]


def run(study_file: Path, workdir: Path, name: str, overrides: dict, trials: int) -> optuna.Study:
    spec = load_study(study_file, {**overrides, "pareto.trials": trials})
    workspace = Workspace(workdir)
    workspace.run("pareto", spec, study_name=name, progress=False)
    return optuna.load_study(study_name=name, storage=workspace.storage_url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=Path("studies/smoke.yaml"))
    parser.add_argument("--full-trials", type=int, default=6)
    parser.add_argument("--rungs", default="1,3,9")
    parser.add_argument("--reduction", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    parser.add_argument("--storage", help="with --full-name and --mf-name: read two studies that already ran")
    parser.add_argument("--full-name")
    parser.add_argument("--mf-name")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rungs = [int(epochs) for epochs in args.rungs.split(",")]
    if args.storage:
        full = optuna.load_study(study_name=args.full_name, storage=args.storage)
        multi = optuna.load_study(study_name=args.mf_name, storage=args.storage)
    else:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kdsearch-mf-"))
        common = {"latency.repeats": 3, "latency.onnx_runtimes": [], "pareto.latency": "torch"}
        full = run(args.study, workdir, "full", {**common, "train.epochs": rungs[-1]}, args.full_trials)
        # Equal compute by construction: the full search's epochs are the multi-fidelity one's budget
        # (pareto.budget_epochs), which ends it; its trial count is only an upper bound.
        overrides = {**common, "pareto.rungs": rungs, "pareto.reduction": args.reduction}
        overrides["pareto.budget_epochs"] = epochs_trained(full)
        multi = run(args.study, workdir, "multi-fidelity", overrides, 20 * args.full_trials)
    slowest = max(p[1] for p in front_points(full) + front_points(multi))
    reference = (0.0, 1.1 * slowest)
    result = {
        "full": {"trials": len(full.trials), "epochs": epochs_trained(full), "front": len(full.best_trials),
                 "hypervolume": hypervolume(front_points(full), reference)},
        "multi_fidelity": {"trials": len(multi.trials), "epochs": epochs_trained(multi),
                           "front": len(multi.best_trials), "hypervolume": hypervolume(front_points(multi), reference)},
        "reference_point": reference,
    }  # fmt: skip
    result["hypervolume_ratio"] = result["multi_fidelity"]["hypervolume"] / max(result["full"]["hypervolume"], 1e-12)
    for name in ("full", "multi_fidelity"):
        row = result[name]
        print(f"{name:15} {row['trials']:3} trials  {row['epochs']:8} epochs  "
              f"front {row['front']}  hypervolume {row['hypervolume']:.2f}")  # fmt: skip
    print(f"hypervolume ratio (multi-fidelity / full): {result['hypervolume_ratio']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
