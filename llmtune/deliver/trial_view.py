"""How the report and its figures read a trial: status, searched settings, metrics, and how a value prints."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, TypeGuard

from optuna.trial import FrozenTrial

from llmtune.deliver.front import feasible
from llmtune.study.attrs import METRICS_KEY, SETTINGS, STATUS

if TYPE_CHECKING:
    from llmtune.deliver.results import SearchResult


def is_number(v: Any) -> TypeGuard[float]:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt_value(v: Any) -> str:
    """A value as the report prints it: large whole floats with thousands separators, other floats to 4
    significant digits, None as a dash."""
    if isinstance(v, float) and v.is_integer() and 1e4 <= abs(v) < 1e15:
        return f"{int(v):,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return "—" if v is None else str(v)


def status_of(t: FrozenTrial) -> str:
    """The trial's llmtune status (complete, pruned, oom, ...), else its Optuna state."""
    return str(t.user_attrs.get(STATUS, t.state.name.lower()))


def settings_of(t: FrozenTrial) -> dict[str, Any]:
    """The settings the trial ran with as recorded, else its sampled params."""
    return t.user_attrs.get(SETTINGS) or dict(t.params)


def metric_of(result: SearchResult, t: FrozenTrial, name: str) -> float | None:
    """A trial's measured metric; an objective's told value only for feasible trials (never a penalty)."""
    v = (t.user_attrs.get(METRICS_KEY) or {}).get(name)
    if not is_number(v) and name in result.objectives and feasible(t) and t.values:
        v = t.values[list(result.objectives).index(name)]
    return float(v) if is_number(v) else None


def metrics_of(result: SearchResult, t: FrozenTrial) -> dict[str, Any]:
    """A trial's metrics, objectives first."""
    metrics = t.user_attrs.get(METRICS_KEY) or {}
    return {**{k: metrics[k] for k in result.objectives if k in metrics}, **metrics}


def feasible_trials(result: SearchResult) -> list[FrozenTrial]:
    """Feasible trials with a finite value in every objective."""
    return [t for t in result.all_trials if feasible(t) and t.values and all(is_number(v) for v in t.values)]
