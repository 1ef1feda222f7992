"""Downloads the trained students of a Pareto study's front (model.pt, from its MLflow store) into
OUT/trial<N>/, for ``bench/deploy_latency.py --students OUT/*/model.pt``.

    .venv/bin/python bench/pareto_students.py --study cifar10-pareto-pareto-d4e0f54e \\
        --workdir runs/cifar10-pareto --out runs/cifar10-pareto/front

A front trial that reused a twin's student (user attribute ``same_as_trial``) is the same student: it is
fetched once, under the twin's number. Prints one line per student.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient

from kdsearch.search.study import front


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True)
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    study = optuna.load_study(study_name=args.study, storage=f"sqlite:///{args.workdir}/studies.db")
    client = MlflowClient(f"sqlite:///{args.workdir}/mlruns/mlflow.db")
    by_number = {trial.number: trial for trial in study.trials}
    students = {trial.user_attrs.get("same_as_trial", trial.number) for trial in front(study)}
    for number in sorted(students):
        folder = args.out / f"trial{number}"
        folder.mkdir(parents=True, exist_ok=True)
        client.download_artifacts(by_number[number].user_attrs["run_id"], "model.pt", str(folder))
        print(f"trial {number} {by_number[number].params}: {folder / 'model.pt'}", flush=True)


if __name__ == "__main__":
    main()
