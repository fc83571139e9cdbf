"""The Pareto front of a study and the chosen trial: pure functions over Optuna's frozen trials.

A leaf: results, report, export and the model card all read it, and it reads none of them.
"""

from __future__ import annotations

import math

from optuna.trial import FrozenTrial, TrialState

from llmtune.study.attrs import STATUS
from llmtune.trial.endings import COMPLETE


def feasible(t: FrozenTrial) -> bool:
    """A completed trial that met every constraint (and did not run out of memory)."""
    return (t.state == TrialState.COMPLETE and t.user_attrs.get(STATUS) == COMPLETE
            and all(c <= 0 for c in t.constraints.values()))


def dominates(a: list[float], b: list[float], directions: list[str]) -> bool:
    """a is at least as good in every objective and better in one."""
    better = False
    for x, y, d in zip(a, b, directions, strict=True):
        if d == "maximize":
            x, y = -x, -y
        if x > y:
            return False
        if x < y:
            better = True
    return better


def pareto_front(trials: list[FrozenTrial], directions: list[str]) -> list[FrozenTrial]:
    """Non-dominated feasible trials, ordered by the first objective."""
    pool = [t for t in trials if feasible(t) and t.values and all(math.isfinite(v) for v in t.values)]
    front = [t for t in pool if not any(dominates(o.values, t.values, directions) for o in pool if o is not t)]
    sign = -1 if directions[0] == "maximize" else 1
    return sorted(front, key=lambda t: (sign * t.values[0], t.number))


def select(front: list[FrozenTrial], objectives: dict[str, str], by: str, weights: dict[str, float] | None = None) -> FrozenTrial | None:
    """The chosen trial: best in one objective, or the knee (closest to the ideal point, each
    objective scaled to [0, 1] over the front, optionally weighted)."""
    if not front:
        return None
    names = list(objectives)
    if by != "knee":
        i = names.index(by)
        sign = -1 if objectives[by] == "maximize" else 1
        return min(front, key=lambda t: (sign * t.values[i], t.number))
    weights = weights or {}
    lo = [min(t.values[i] for t in front) for i in range(len(names))]
    hi = [max(t.values[i] for t in front) for i in range(len(names))]

    def distance(t: FrozenTrial) -> float:
        total = 0.0
        for i, name in enumerate(names):
            span = hi[i] - lo[i] or 1.0
            scaled = (t.values[i] - lo[i]) / span
            if objectives[name] == "maximize":
                scaled = 1 - scaled
            total += weights.get(name, 1.0) * scaled**2
        return math.sqrt(total)

    return min(front, key=lambda t: (distance(t), t.number))
