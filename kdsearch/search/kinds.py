"""Every study kind by its stored name: the only place that knows them all, used by the top (the CLI,
a worker joining a stored study, the report) to pick the kind a study was created with."""

from __future__ import annotations

from kdsearch.search.ablation import ABLATION
from kdsearch.search.pareto import PARETO
from kdsearch.search.study import StudyKind
from kdsearch.search.tune import GRID, TPE

STUDY_KINDS: dict[str, StudyKind] = {kind.name: kind for kind in (GRID, TPE, ABLATION, PARETO)}
