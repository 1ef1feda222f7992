"""Orchestration overhead of a grid study: its wall time against the sum of its trials' own training time.

    python bench/study_overhead.py --trials 8 --epochs 3

A grid of N points (N temperatures) on synthetic data with the tiny CNN, tracked in a fresh MLflow
SQLite store, in a fresh Optuna SQLite storage. One-time costs that a study shares with every later
study (the teacher and the IG cache in the cache directory, creating the MLflow tables) are paid
before the clock starts; everything a study itself does (loading data and teacher, measuring the
teacher, per-trial Optuna and MLflow calls, latency and FLOPs, checkpoints) is inside it. The target
(issue 3) is a ratio <= 1.1.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

STUDY = Path(__file__).resolve().parents[1] / "studies" / "smoke.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="grid points (temperatures 1..N)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--synthetic-size", type=int, default=4000, help="synthetic training images")
    args = parser.parse_args()

    import optuna
    from mlflow import MlflowClient

    from kdsearch.search.optuna_storage import HeartbeatConfig
    from kdsearch.search.study import open_study, run_study
    from kdsearch.search.studyfile import load_study
    from kdsearch.search.trial import prepare
    from kdsearch.search.tune import GRID
    from kdsearch.track.tracking import MlflowTracker, device_name

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        os.environ["KDSEARCH_CACHE_DIR"] = str(scratch / "cache")
        overrides = {
            "grid.t": [float(t) for t in range(1, args.trials + 1)],
            "grid.alpha": [0.5],
            "grid.p": [0.5],
            "train.epochs": args.epochs,
            "train.data.synthetic_size": args.synthetic_size,
            "train.data.val_size": args.synthetic_size // 4,
        }
        spec = load_study(STUDY, overrides)
        storage = f"sqlite:///{scratch}/studies.db"
        tracking = f"sqlite:///{scratch}/mlruns/mlflow.db"
        (scratch / "mlruns").mkdir()
        handle = open_study(GRID, spec, storage, HeartbeatConfig())
        prepare(spec, GRID.trial_configs(spec, handle.space), progress=False)  # teacher + IG cache: once per cache dir
        MlflowClient(tracking).search_experiments()  # MLflow's tables: once per store

        start = time.perf_counter()
        # As the CLI runs it: per-epoch trial checkpoints under the work directory.
        summary = run_study(handle, MlflowTracker(tracking), progress=False, checkpoint_root=scratch / "checkpoints")
        wall = time.perf_counter() - start

        trials = handle.study.get_trials()
        train_s = sum(trial.user_attrs["train_time_s"] for trial in trials)
        assert summary.done == args.trials == len(trials)

    print(f"# study_overhead: torch {torch.__version__}, {device_name(torch.device('cpu'))}")
    print(
        f"grid trials           {args.trials} (tiny_cnn, {args.synthetic_size} synthetic images, {args.epochs} epochs)"
    )
    print(f"sum of train_time_s   {train_s:8.2f} s")
    print(f"study wall time       {wall:8.2f} s")
    print(f"overhead per trial    {(wall - train_s) / args.trials:8.2f} s")
    print(f"ratio wall / train    {wall / train_s:8.3f}  (target <= 1.1)")


if __name__ == "__main__":
    main()
