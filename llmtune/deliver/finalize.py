"""What a search leaves in its output_dir: trials.csv/json, the chosen trial's adapter under best/, and
report.html. Written again by every finishing worker and by `llmtune report`.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import optuna

from llmtune.config.recipe import Recipe
from llmtune.deliver.results import SearchResult
from llmtune.study.attrs import DIR, METRICS_KEY, SETTINGS


def finalize(study: optuna.Study, recipe: Recipe, log: Callable[[str], None] = print) -> SearchResult:
    """Pareto front, the chosen trial's adapter under output_dir/best, trials.csv/json, report.html."""
    result = SearchResult(study, recipe)
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = result.trials
    df.to_csv(out / "trials.csv", index=False)
    df.to_json(out / "trials.json", orient="records", indent=1)
    best = result.best
    if best is not None:
        src = Path(best.user_attrs.get(DIR, "")) / "adapter"
        dst = out / "best"
        if src.is_dir():
            # Workers sharing one output_dir may finish at once: each builds its copy aside and swaps it
            # in whole, so best/ never mixes two trials; the last swap wins, none fails.
            tmp = out / f".best-{os.getpid()}-{threading.get_ident()}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp / "adapter")
            (tmp / "trial.json").write_text(json.dumps({
                "trial": best.number, "settings": best.user_attrs.get(SETTINGS),
                "metrics": best.user_attrs.get(METRICS_KEY), "selected_by": recipe.select.by,
                "base_model": recipe.model.name}, indent=2, default=str))
            for attempt in range(5):  # a directory cannot replace a non-empty one: move the old one aside
                old = out / f".best-old-{os.getpid()}-{threading.get_ident()}-{attempt}"
                try:
                    os.replace(dst, old)
                except FileNotFoundError:
                    pass
                try:
                    os.replace(tmp, dst)
                    break
                except OSError:  # another worker swapped its copy in meanwhile: move that aside too
                    continue
            for leftover in out.glob(f".best-*-{os.getpid()}-{threading.get_ident()}*"):
                shutil.rmtree(leftover, ignore_errors=True)
    from llmtune.deliver.report import write_report

    write_report(result, out / "report.html")
    return result
