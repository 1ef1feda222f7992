"""Size an ablation by measured noise: the baseline's seed-to-seed spread at candidate budgets.

    .venv/bin/python bench/ablation_noise.py \\
        --study 10k-8ep=sqlite:///runs/cifar10-ablation/studies.db:cifar10-ablation

Each ``--study LABEL=STORAGE_URL:STUDY_NAME`` is an ablation study (``kdsearch ablate``) holding at
least two completed baseline seeds. For each, the script prints the baseline's test accuracies, their
standard deviation s, the mean training time per run, and, for n seeds per arm, the 95 % CI half-width
of an arm-vs-baseline difference and the minimum detectable effect (two-sided paired t-test,
alpha 0.05, power 0.8). Until arms have run, the spread of a paired difference is taken as s * sqrt(2)
(arms independent given the seed); when other arms have completed seeds, the measured spread of
each arm's paired differences, and that spread pooled over the arms, are used too. The last line is
JSON.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import optuna
from optuna.trial import TrialState
from scipy import stats

TARGET_HALF_WIDTH = 0.5  # points: the bound on each arm-vs-baseline 95 % CI half-width
SEEDS = (3, 4, 5, 6, 8, 10, 12, 16, 20, 30, 40, 50)


def half_width(sd: float, n: int) -> float:
    return float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))


def seeds_for(sd: float, target: float) -> int:
    """The fewest seeds whose paired 95 % CI half-width is at most ``target`` at spread ``sd``."""
    n = 2
    while half_width(sd, n) > target:
        n += 1
    return n


def detectable_effect(sd: float, n: int, power: float = 0.8) -> float:
    return float((stats.t.ppf(0.975, n - 1) + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n))


def by_arm(study: optuna.Study) -> dict[str, dict[int, optuna.trial.FrozenTrial]]:
    arms: dict[str, dict[int, optuna.trial.FrozenTrial]] = {}
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        arms.setdefault(trial.params["arm"], {})[trial.params["seed"]] = trial
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", action="append", required=True, help="LABEL=STORAGE_URL:STUDY_NAME")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    summary = []
    for item in args.study:
        label, _, rest = item.partition("=")
        storage, _, name = rest.rpartition(":")
        arms = by_arm(optuna.load_study(study_name=name, storage=storage))
        baseline = arms.get("baseline", {})
        accuracies = np.array([baseline[seed].user_attrs["test_acc"] for seed in sorted(baseline)])
        times = [trial.user_attrs.get("train_time_s") for trial in baseline.values()]
        print(f"== {label} ({name}): baseline test accuracies {np.round(accuracies, 2).tolist()}")
        if len(accuracies) < 2:
            print("  fewer than 2 completed baseline seeds: no spread yet")
            continue
        sd = float(accuracies.std(ddof=1))
        sd_difference = sd * math.sqrt(2)
        measured_time = [t for t in times if t is not None]
        mean_time = float(np.mean(measured_time)) if measured_time else None
        shown_time = f"{mean_time / 60:.1f} min" if mean_time is not None else "n/a"
        # Wall time of each run: a run paused or sharing the CPU shows it here, so the mean is a hint only.
        per_run = ", ".join(f"{t / 60:.1f}" for t in measured_time)
        print(
            f"  mean {accuracies.mean():.2f}, std {sd:.2f} points; training wall time per run {per_run} min (mean {shown_time})"
        )
        measured = {}
        for arm, runs in arms.items():
            common = sorted(set(runs) & set(baseline))
            if arm == "baseline" or len(common) < 2:
                continue
            differences = np.array(
                [runs[s].user_attrs["test_acc"] - baseline[s].user_attrs["test_acc"] for s in common]
            )
            measured[arm] = {"n": len(common), "mean": float(differences.mean()), "sd": float(differences.std(ddof=1))}
            print(
                f"  measured {arm} - baseline over {len(common)} seeds: mean {differences.mean():+.2f}, "
                f"std {differences.std(ddof=1):.2f}, 95% CI half-width {half_width(differences.std(ddof=1), len(common)):.2f}"
            )
        spreads = {"assumed (baseline std * sqrt(2))": sd_difference}
        pooled_df = sum(arm["n"] - 1 for arm in measured.values())
        if pooled_df:
            # Every arm's differences pooled (each about its own mean): one spread estimate with more degrees
            # of freedom than any single arm's, on the assumption that pairing removes as much noise in each arm.
            pooled = math.sqrt(sum((arm["n"] - 1) * arm["sd"] ** 2 for arm in measured.values()) / pooled_df)
            spreads[f"measured, pooled over arms ({pooled_df} degrees of freedom)"] = pooled
        rows, needed = [], {}
        for source, spread in spreads.items():
            print(f"  spread of a paired difference, {source}: {spread:.2f}")
            for n in SEEDS:
                rows.append(
                    {
                        "spread": source,
                        "seeds": n,
                        "half_width": half_width(spread, n),
                        "mde": detectable_effect(spread, n),
                    }
                )
                print(
                    f"    n={n:>2}: 95% CI half-width {rows[-1]['half_width']:.2f}, "
                    f"minimum detectable effect {rows[-1]['mde']:.2f}"
                )
            needed[source] = seeds_for(spread, TARGET_HALF_WIDTH)
            print(f"    seeds for a half-width <= {TARGET_HALF_WIDTH}: {needed[source]}")
        summary.append(
            {
                "label": label,
                "study": name,
                "baseline": accuracies.tolist(),
                "std": sd,
                "train_time_s": mean_time,
                "rows": rows,
                "measured_differences": measured,
                "seeds_needed": needed,
            }
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
