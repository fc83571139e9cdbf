"""The Python API: what notebooks and scripts call."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llmtune.recipe import Recipe, apply_overrides, load_recipe, recipe_from_dict
from llmtune.result import TrialResult
from llmtune.results import SearchResult


def _as_recipe(recipe: str | os.PathLike | Recipe | dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    if isinstance(recipe, Recipe):
        if overrides:
            return recipe_from_dict(apply_overrides(recipe.to_dict(), overrides))
        return recipe
    if isinstance(recipe, dict):
        return recipe_from_dict(apply_overrides(recipe, overrides) if overrides else recipe)
    return load_recipe(recipe, overrides)


def search(recipe: str | os.PathLike | Recipe | dict[str, Any], *, n_trials: int | None = None,
           storage: str | None = None, study_name: str | None = None, workers: int = 1,
           gpus: list[str] | None = None, output_dir: str | None = None, quiet: bool = True,
           overrides: list[str] | None = None) -> SearchResult:
    """Run (or resume) the recipe's search; returns the results (Pareto front, chosen trial, table).

    Re-running with the same recipe and output_dir continues the same study.
    """
    from llmtune.progress import make_progress
    from llmtune.study import Search, finalize

    r = _as_recipe(recipe, overrides)
    if output_dir:
        r.output_dir = output_dir
    run = Search(r, storage=storage, n_trials=n_trials, workers=workers, gpus=gpus, study_name=study_name,
                 progress=make_progress(quiet), log=(lambda m: None) if quiet else print)
    study = run.run()
    return finalize(study, r)


def train(recipe: str | os.PathLike | Recipe | dict[str, Any], values: dict[str, Any] | None = None, *,
          out_dir: str | os.PathLike | None = None, overrides: list[str] | None = None,
          in_process: bool = False) -> TrialResult:
    """One trial with the given settings (others: midpoints / first choices of the space).

    Runs in a child process like a search trial unless ``in_process``.
    """
    from llmtune.harness.train import eval_fractions
    from llmtune.runner import TrialJob, run_trial_process

    r = _as_recipe(recipe, overrides)
    settings = r.space.complete(values or {})
    out = Path(out_dir or Path(r.output_dir) / "train")
    if in_process:
        from llmtune.harness.train import run_trial

        return run_trial(r, settings, out)
    from llmtune.tiny import resolve_data_source, resolve_model_name

    resolve_model_name(r.model.name)
    resolve_data_source(r.data.source)
    job = TrialJob(recipe=r.to_dict(), values=settings, out_dir=out.resolve(), fractions=eval_fractions(r),
                   timeout=r.study.trial_timeout)
    return run_trial_process(job)


def estimate_memory(*args: Any, **kwargs: Any):
    """Predicted peak GPU memory of a LoRA trial (see `llmtune.memory.estimate_memory`)."""
    from llmtune.memory import estimate_memory as _estimate

    return _estimate(*args, **kwargs)


def load_results(target: str | os.PathLike, study_name: str | None = None, storage: str | None = None) -> SearchResult:
    """Open a finished or running search by its output_dir or storage URL."""
    from llmtune.results import load_results as _load

    return _load(os.fspath(target), study_name=study_name, storage=storage)
