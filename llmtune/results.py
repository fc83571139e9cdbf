"""Reading a study back: all trials as a table, the Pareto front, the chosen trial."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from llmtune.recipe import Recipe, recipe_from_dict
from llmtune.result import COMPLETE
from llmtune.storage import CURVE, DIR, METRICS_KEY, REASON, SETTINGS, STATUS, open_storage


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


class SearchResult:
    """A study's results for notebooks and the CLI (`llmtune.search` returns one)."""

    def __init__(self, study: optuna.Study, recipe: Recipe):
        self.study = study
        self.recipe = recipe
        self.objectives = recipe.objectives
        self.directions = list(recipe.objectives.values())

    @property
    def all_trials(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    @property
    def pareto_front(self) -> list[FrozenTrial]:
        return pareto_front(self.all_trials, self.directions)

    @property
    def best(self) -> FrozenTrial | None:
        return select(self.pareto_front, self.objectives, self.recipe.select.by, self.recipe.select.weights)

    @property
    def best_adapter(self) -> Path | None:
        path = Path(self.recipe.output_dir) / "best" / "adapter"
        return path if path.is_dir() else None

    def trial_dir(self, number: int) -> Path:
        return Path(self.study.trials[number].user_attrs[DIR])

    def curves(self) -> dict[int, list[list[float]]]:
        return {t.number: t.user_attrs.get(CURVE, []) for t in self.all_trials if t.user_attrs.get(CURVE)}

    @property
    def trials(self):
        """One row per trial: number, status, reason, feasibility, Pareto membership, settings, metrics."""
        import pandas as pd

        front = {t.number for t in self.pareto_front}
        best = self.best
        rows = []
        for t in self.all_trials:
            row: dict[str, Any] = {
                "trial": t.number, "status": t.user_attrs.get(STATUS, t.state.name.lower()),
                "feasible": feasible(t), "pareto": t.number in front, "chosen": best is not None and t.number == best.number,
                "reason": t.user_attrs.get(REASON, ""),
                "duration_s": t.duration.total_seconds() if t.duration else None,
            }
            row.update(t.user_attrs.get(SETTINGS) or t.params)
            row.update(t.user_attrs.get(METRICS_KEY) or {})
            rows.append(row)
        return pd.DataFrame(rows)

    def summary_rows(self, trials: list[FrozenTrial] | None = None) -> list[dict[str, Any]]:
        """Searched settings and objective values of the given (default: Pareto) trials."""
        searched = self.recipe.space.searched
        out = []
        for t in trials if trials is not None else self.pareto_front:
            settings = t.user_attrs.get(SETTINGS) or t.params
            metrics = t.user_attrs.get(METRICS_KEY) or {}
            row: dict[str, Any] = {"trial": t.number}
            row.update({k: settings.get(k) for k in searched})
            row.update({m: metrics.get(m) for m in self.objectives})
            out.append(row)
        return out

    def plot_pareto(self, x: str | None = None, y: str | None = None):
        """Plotly figure of the trials in two objectives, the front and the chosen trial marked."""
        from llmtune.report import pareto_figure

        return pareto_figure(self, x, y)

    def plot_curves(self):
        """Plotly figure of every trial's eval loss over the training budget (None before any eval)."""
        from llmtune.report import curves_figure

        return curves_figure(self)

    def export(self, to: str | Path, trial: int | None = None, merge: bool = False, tokenizer: bool | None = None):
        """Write a trial's adapter (default: the chosen one) as a PEFT folder with a model card
        (see `llmtune.hub.export_adapter`)."""
        from llmtune.hub import export_adapter

        return export_adapter(self, to, trial=trial, merge=merge, tokenizer=tokenizer)

    def push_to_hub(self, repo_id: str | None = None, **kwargs: Any):
        """Export a trial's adapter and upload it to the Hub in one commit (see `llmtune.hub.push_to_hub`:
        private, trial, revision, dry_run, token, export_dir)."""
        from llmtune.hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def __repr__(self) -> str:
        best = self.best
        return (f"SearchResult(study={self.study.study_name!r}, trials={len(self.all_trials)}, "
                f"pareto={len(self.pareto_front)}, best={None if best is None else best.number})")


def load_results(target: str | Path, study_name: str | None = None, storage: str | None = None) -> SearchResult:
    """Open a finished or running search from its output_dir (or a storage URL)."""
    target = str(target)
    if "://" in target:
        storage, out = target, None
    else:
        out = Path(target)
        if not (out / "study.db").exists() and storage is None:
            raise FileNotFoundError(f"{out} holds no study.db; pass the output_dir of a search or a storage URL")
    url = storage or f"sqlite:///{Path(target).resolve() / 'study.db'}"  # no storage: target is a folder
    names = optuna.get_all_study_names(storage=open_storage(url))
    if study_name is None:
        if len(names) != 1:
            raise ValueError(f"the storage holds studies {names}; pass study_name")
        study_name = names[0]
    study = optuna.load_study(study_name=study_name, storage=open_storage(url))
    recipe_data = study.user_attrs.get("llmtune.recipe")
    if recipe_data is None:
        raise ValueError(f"study {study_name!r} was not written by llmtune (no recipe stored)")
    recipe = recipe_from_dict(recipe_data)
    if out is not None:
        recipe.output_dir = str(out)
    return SearchResult(study, recipe)


__all__ = ["SearchResult", "load_results", "pareto_front", "select", "feasible"]
