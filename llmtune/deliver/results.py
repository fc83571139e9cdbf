"""Reading a study back: all trials as a table, the Pareto front, the chosen trial."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial

from llmtune.config.recipe import Recipe, recipe_from_dict
from llmtune.deliver.front import feasible, pareto_front, select
from llmtune.errors import SearchError
from llmtune.study.attrs import CURVE, DIR, METRICS_KEY, REASON, RECIPE, SETTINGS, STATUS
from llmtune.study.storage import counted, has_studies, mask_url, open_storage, storage_error

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import plotly.graph_objects as go

    from llmtune.deliver.hub import Export, Push


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
    def counted_trials(self) -> int:
        """Trials that ran to an ending of their own, as n_trials counts them: not the tries a retry repeats
        (interrupted, killed, environment), not surplus trials, not execution variants (`storage.counted`)."""
        return counted(self.study)[0]

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
    def trials(self) -> pd.DataFrame:
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

    def plot_pareto(self, x: str | None = None, y: str | None = None) -> go.Figure:
        """Plotly figure of the trials in two objectives, the front and the chosen trial marked."""
        from llmtune.deliver.figures import pareto_figure

        return pareto_figure(self, x, y)

    def plot_curves(self) -> go.Figure | None:
        """Plotly figure of every trial's eval loss over the training budget (None before any eval)."""
        from llmtune.deliver.figures import curves_figure

        return curves_figure(self)

    def export(self, output_dir: str | Path, trial: int | None = None, merge: bool = False, tokenizer: bool | None = None) -> Export:
        """Write a trial's adapter (default: the chosen one) as a PEFT folder with a model card
        (see `llmtune.deliver.hub.export_adapter`)."""
        from llmtune.deliver.hub import export_adapter

        return export_adapter(self, output_dir, trial=trial, merge=merge, tokenizer=tokenizer)

    def push_to_hub(self, repo_id: str | None = None, **kwargs: Any) -> Push:
        """Export a trial's adapter and upload it to the Hub in one commit (see `llmtune.deliver.hub.push_to_hub`:
        private, trial, revision, dry_run, token, output_dir)."""
        from llmtune.deliver.hub import push_to_hub

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
        # as `search` reads it (storage.storage_url): --storage, then LLMTUNE_STORAGE, then the folder's study.db
        storage = os.path.expandvars(storage or os.environ.get("LLMTUNE_STORAGE", "")) or None
        if storage is None and not (out / "study.db").exists():
            why = "does not exist" if not out.exists() else "holds no study.db"
            raise SearchError(f"{target!r} {why}; pass the output_dir of a search, or a storage URL (--storage)")
    url = storage or f"sqlite:///{Path(target).resolve() / 'study.db'}"  # no storage: target is a folder
    db = Path(url.partition(":///")[2].partition("?")[0]) if url.startswith("sqlite:") else None
    if db is not None and str(db) not in ("", ":memory:") and not db.is_file():
        raise SearchError(f"{mask_url(url)}: {str(db)!r} does not exist; pass the output_dir of a search, or its "
                          "storage URL")  # SQLite would create an empty one
    try:
        if db is None and not has_studies(url):  # a server's database: Optuna would create its tables
            raise SearchError(f"the storage {mask_url(url)} holds no study yet; run a search against it first "
                              "(llmtune search RECIPE --storage URL), or check the URL")
        rdb = open_storage(url)
        names = optuna.get_all_study_names(storage=rdb)
    except (ImportError, ValueError, optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
        raise SearchError(storage_error(url, e)) from None
    if not names:
        raise SearchError(f"the storage {mask_url(url)} holds no study yet; run a search against it first "
                          "(llmtune search RECIPE --storage URL), or check the URL")
    if study_name is None:
        if len(names) != 1:
            raise SearchError(f"the storage {mask_url(url)} holds studies {names}; pass --study-name (study_name=)")
        study_name = names[0]
    elif study_name not in names:
        raise SearchError(f"--study-name {study_name!r}: no such study in {mask_url(url)}; it holds {names}")
    study = optuna.load_study(study_name=study_name, storage=rdb)
    recipe_data = study.user_attrs.get(RECIPE)
    if recipe_data is None:
        raise SearchError(f"study {study_name!r} was not written by llmtune (no recipe stored)")
    recipe = recipe_from_dict(recipe_data)
    if out is not None:
        recipe.output_dir = str(out)
    return SearchResult(study, recipe)


__all__ = ["SearchResult", "load_results"]
