"""What a report reads: the study in its Optuna storage and its runs in the MLflow store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from kdsearch.track.tracking import PARENT_KEY_TAG, ROLE_TAG

STATES = {"COMPLETE": "complete", "RUNNING": "running", "WAITING": "queued", "PRUNED": "pruned"}


@dataclass
class Source:
    study: optuna.Study
    kind: str
    total: int
    space: dict[str, Any]
    spec: dict[str, Any]  # the study file's spec as stored (the creating machine's paths)
    client: Any  # MlflowClient
    parent: Any | None  # the parent mlflow Run, None when nothing was logged
    runs: dict[str, Any]  # run id → the mlflow Run of a trial

    @property
    def trials(self) -> list[optuna.trial.FrozenTrial]:
        """Every trial but failed ones (a failed point is queued again as a new trial)."""
        return [t for t in self.study.get_trials(deepcopy=False) if t.state.name in STATES]

    def run_of(self, trial: optuna.trial.FrozenTrial):
        return self.runs.get(trial.user_attrs.get("run_id", ""))


def parent_run(client, key: str):
    """The study's parent run (tagged with its key), or None when nothing was logged."""
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    query = f"tags.`{PARENT_KEY_TAG}` = '{key}' and tags.`{ROLE_TAG}` = 'parent'"
    found = client.search_runs(experiments, filter_string=query, max_results=1) if experiments else []
    return found[0] if found else None


def child_runs(client, parent) -> list:
    """Every run nested under ``parent``, page by page."""
    runs, token = [], None
    query = f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    while True:
        page = client.search_runs([parent.info.experiment_id], query, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def trial_rows(source: Source) -> list[dict[str, Any]]:
    rows = []
    for trial in source.trials:
        complete = trial.state == TrialState.COMPLETE
        attrs = trial.user_attrs if complete else {}
        rows.append(
            {
                "trial": trial.number,
                "state": STATES[trial.state.name],
                # A queued trial holds its point in fixed_params until its objective suggests it.
                "params": dict(trial.params or trial.system_attrs.get("fixed_params") or {}),
                "val_acc": trial.values[0] if complete else None,
                "test_acc": attrs.get("test_acc"),
                **{key: attrs[key] for key in ("agreement_spearman", "agreement_iou_top10") if key in attrs},
            }
        )
    return rows
