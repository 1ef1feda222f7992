"""kdsearch: knowledge distillation with Integrated Gradients overlays, searched and ablated with Optuna and MLflow.

The names a Python user needs, as ``from kdsearch import …``; everything else by its module path::

    from kdsearch import TrainConfig, ModelConfig, KDConfig, train
    result = train(TrainConfig(student=ModelConfig(drop_blocks=5), kd=KDConfig(alpha=0.5), ...))

    from kdsearch import Workspace, load_study
    summary = Workspace("runs/demo").run("grid", load_study("studies/smoke.yaml"))

They are imported on first use, so ``import kdsearch`` (and ``kdsearch --help``) imports no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# name → the module that defines it
_EXPORTS = {
    **dict.fromkeys(
        (
            "TrainConfig",
            "DataConfig",
            "ModelConfig",
            "KDConfig",
            "OverlayConfig",
            "IGConfig",
            "AttributionConfig",
            "OptimConfig",
            "AttentionConfig",
            "PruneConfig",
            "TeacherRecipe",
            "LatencyConfig",
        ),
        "kdsearch.config",
    ),
    "KdsearchError": "kdsearch.errors",
    "train": "kdsearch.distill.train",
    "TrainResult": "kdsearch.distill.train",
    "load_model": "kdsearch.models.classifiers",
    "save_checkpoint": "kdsearch.models.classifiers",
    "load_study": "kdsearch.search.studyfile",
    "StudySpec": "kdsearch.search.studyfile",
    "Workspace": "kdsearch.search.launch",
    "STUDY_KINDS": "kdsearch.search.kinds",
    "ablation_table": "kdsearch.search.ablation",
    "point_from_study": "kdsearch.search.ablation",
    "best_trial": "kdsearch.search.study",
    "find_study": "kdsearch.search.study",
    "evaluate": "kdsearch.deploy.evaluate",
    "ReportConfig": "kdsearch.report.render",
    "write_report": "kdsearch.report.render",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kdsearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
