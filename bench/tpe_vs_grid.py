"""TPE with pruning vs the full grid: epochs spent to get within 0.3 points of the grid's best.

    .venv/bin/python bench/tpe_vs_grid.py --storage sqlite:///runs/cifar10-grid/studies.db \\
        --grid cpu-quick-grid --tpe cpu-quick-tpe

Both studies must already have run (``bench/real_data.sh grid`` runs them on studies/cpu-quick.yaml);
this script only reads their Optuna storage. The grid's cost is every epoch of every trial. TPE's cost
to reach the target is the epochs of its trials in the order they started, up to and including the
first trial whose final validation accuracy is within ``--tolerance`` points of the grid's best; a
complete trial costs the study file's epochs, a pruned one the epochs it reported to the pruner. Also printed: the best of
each search and its test accuracy, and whether TPE reached the target at all. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json

import optuna
from optuna.trial import TrialState


def configured_epochs(study: optuna.Study) -> int:
    """Epochs of every trial, from the study file stored with the study."""
    return int(study.user_attrs["kdsearch"]["spec"]["train"]["epochs"])


def epochs_run(trial: optuna.trial.FrozenTrial, epochs: int) -> int:
    # A complete trial ran every epoch (grid trials report none to a pruner); a pruned one, those it reported.
    return epochs if trial.state == TrialState.COMPLETE else len(trial.intermediate_values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--grid", required=True, help="name of the grid study")
    parser.add_argument("--tpe", required=True, help="name of the TPE study")
    parser.add_argument("--tolerance", type=float, default=0.3, help="points of validation accuracy")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    grid = optuna.load_study(study_name=args.grid, storage=args.storage)
    tpe = optuna.load_study(study_name=args.tpe, storage=args.storage)

    grid_trials = grid.get_trials(states=(TrialState.COMPLETE,))
    grid_best = max(grid_trials, key=lambda t: t.value)
    grid_epochs = sum(epochs_run(t, configured_epochs(grid)) for t in grid_trials)
    target = grid_best.value - args.tolerance
    print(f"grid {args.grid}: {len(grid_trials)} complete trials, {grid_epochs} epochs")
    print(
        f"  best val_acc {grid_best.value:.2f} (test {grid_best.user_attrs.get('test_acc', float('nan')):.2f}) "
        f"at {grid_best.params}"
    )
    print(f"target: val_acc >= {target:.2f} (grid best - {args.tolerance})")

    spent, reached = 0, None
    finished = sorted(tpe.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)), key=lambda t: t.number)
    print(f"TPE {args.tpe}: {len(finished)} finished trials")
    for trial in finished:
        spent += epochs_run(trial, configured_epochs(tpe))
        value = trial.value if trial.state == TrialState.COMPLETE else None
        shown = f"{value:.2f}" if value is not None else f"pruned after {len(trial.intermediate_values)}"
        marker = ""
        if reached is None and value is not None and value >= target:
            reached = (trial.number, spent, value)
            marker = "  <- within tolerance"
        print(f"  trial {trial.number:>2}: {shown:<18} cumulative epochs {spent:>3}  {trial.params}{marker}")
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    tpe_best = max(complete, key=lambda t: t.value) if complete else None
    pruned = sum(t.state == TrialState.PRUNED for t in finished)
    if tpe_best is not None:
        print(
            f"TPE best val_acc {tpe_best.value:.2f} (test {tpe_best.user_attrs.get('test_acc', float('nan')):.2f}) "
            f"at {tpe_best.params}; {pruned} of {len(finished)} trials pruned; {spent} epochs in all"
        )
    if reached is None:
        print(f"TPE did not get within {args.tolerance} points of the grid's best in {spent} epochs")
    else:
        print(
            f"TPE reached the target at trial {reached[0]} after {reached[1]} epochs: "
            f"{reached[1] / grid_epochs:.2f}x the grid's {grid_epochs}"
        )
    print(
        json.dumps(
            {
                "grid_best": grid_best.value,
                "grid_epochs": grid_epochs,
                "target": target,
                "tpe_epochs_to_target": reached[1] if reached else None,
                "tpe_trial_at_target": reached[0] if reached else None,
                "tpe_best": tpe_best.value if tpe_best else None,
                "tpe_epochs_total": spent,
                "tpe_pruned": pruned,
            }
        )
    )


if __name__ == "__main__":
    main()
