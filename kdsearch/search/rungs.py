"""Multi-fidelity for the accuracy × latency study: successive halving over two objectives.

A candidate trains in rungs (``pareto.rungs``, e.g. 1 → 3 → 9 epochs of one 9-epoch schedule). When it
ends a rung, it is compared with every candidate that has ended that rung so far (any worker, any state),
ranked by non-dominated sorting of (validation accuracy ↑, latency ↓) with crowding distance breaking ties
inside a front (NSGA-II's order), and it goes on only if it is among the best ``1 / reduction`` of them —
MO-ASHA's promotion rule, asynchronous as ASHA is (no worker waits for a rung to fill). As in Optuna's
successive-halving pruner, while fewer than ``reduction`` candidates have ended a rung only the best one
goes on. A candidate that goes on keeps training in the same process (its per-epoch checkpoints still let a
retried trial resume), so it is never trained twice and ends as an uninterrupted run of its epochs would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

RUNG_ATTR = "rung_{epochs}"  # a trial's validation accuracy at the end of the rung of that many epochs
STOPPED_ATTR = "stopped_at"  # the rung (epochs) after which a candidate was not promoted


def rung_accuracies(user_attrs: Mapping[str, Any]) -> dict[int, float]:
    """A trial's validation accuracy after each rung it ended, by epochs, in rung order."""
    prefix = RUNG_ATTR.removesuffix("{epochs}")
    reached = {int(key.removeprefix(prefix)): value for key, value in user_attrs.items() if key.startswith(prefix)}
    return dict(sorted(reached.items()))


def nondominated_ranks(points: Sequence[tuple[float, float]]) -> list[int]:
    """The front index (0: non-dominated) of each (accuracy, latency) point: higher accuracy and lower
    latency are better."""

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] >= b[0] and a[1] <= b[1] and a != b

    ranks = [-1] * len(points)
    remaining = set(range(len(points)))
    rank = 0
    while remaining:
        front = {i for i in remaining if not any(dominates(points[j], points[i]) for j in remaining if j != i)}
        for index in front:
            ranks[index] = rank
        remaining -= front
        rank += 1
    return ranks


def crowding_distances(points: Sequence[tuple[float, float]]) -> list[float]:
    """NSGA-II's crowding distance of each point within its own set: the ends of each objective are
    infinitely far; the rest sum the normalised gaps between their neighbours."""
    distances = [0.0] * len(points)
    for objective in range(2):
        order = sorted(range(len(points)), key=lambda i: points[i][objective])
        low, high = points[order[0]][objective], points[order[-1]][objective]
        distances[order[0]] = distances[order[-1]] = math.inf
        if high == low:
            continue
        for before, index, after in zip(order, order[1:], order[2:], strict=False):
            distances[index] += (points[after][objective] - points[before][objective]) / (high - low)
    return distances


def promotion_order(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of ``points``, best first: by front, then by crowding distance within the front (larger
    first), then by index (``promotable`` lists the candidate first, so a full tie promotes it)."""
    ranks = nondominated_ranks(points)
    crowding = [0.0] * len(points)
    for rank in set(ranks):
        members = [i for i, r in enumerate(ranks) if r == rank]
        for index, distance in zip(members, crowding_distances([points[i] for i in members]), strict=True):
            crowding[index] = distance
    return sorted(range(len(points)), key=lambda i: (ranks[i], -crowding[i], i))


def promotable(candidate: tuple[float, float], others: Sequence[tuple[float, float]], reduction: int) -> bool:
    """Whether ``candidate`` is among the best ``len(all) // reduction`` (at least 1) of itself and ``others``,
    the candidates that ended the same rung before it."""
    points = [candidate, *others]
    kept = max(1, len(points) // reduction)
    return 0 in promotion_order(points)[:kept]


def committed_epochs(
    state: str,
    rungs: Sequence[int],
    reached: Sequence[int],
    stopped_at: int | None,
    trained: bool,
    reference: bool,
) -> int:
    """Epochs a candidate has trained or is committed to, for a study's compute budget.

    ``state``: the trial's state name; ``rungs``: the rung ends (one rung of ``train.epochs`` without
    multi-fidelity); ``reached``: the rungs it has ended; ``trained``: False for a repeated point (it reuses
    its twin's student). An architecture too slow to train ends PRUNED after no rung and counts nothing. A
    finished candidate counts what it trained; a
    running one what it will have trained at its next rung's end — all of its rungs for a reference, which
    always goes on. A failed trial counts nothing: its retry (which resumes its checkpoint) counts instead.
    """
    if not trained:
        return 0
    if state == "COMPLETE":
        return rungs[-1]
    if state == "PRUNED":
        return stopped_at or 0
    if state == "RUNNING":
        if reference:
            return rungs[-1]
        return next((end for end in rungs if end > max(reached, default=0)), rungs[-1])
    return 0
