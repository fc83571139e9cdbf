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
from llmtune.deliver.lineage import schedule_document
from llmtune.deliver.report import write_report
from llmtune.deliver.results import SearchResult
from llmtune.errors import SearchError
from llmtune.files import write_atomic
from llmtune.study.attrs import DIR, FINGERPRINT, METRICS_KEY, SETTINGS


def finalize(study: optuna.Study, recipe: Recipe, log: Callable[[str], None] = print) -> SearchResult:
    """Pareto front, the chosen trial's adapter under output_dir/best, trials.csv/json, report.html.

    Each file is written whole or not at all; a file-system error (a full disk, a folder that became
    read-only) leaves no partial file or temp folder behind and is one `SearchError` naming the folder."""
    result = SearchResult(study, recipe)
    out = Path(recipe.output_dir)
    try:
        _write_outputs(result, recipe, out)
    except OSError as e:
        for leftover in out.glob(f".*{os.getpid()}-{threading.get_ident()}*"):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        raise SearchError(f"cannot write the search's results into {str(out)!r}: {e.strerror or e}; free space or "
                          "make it writable, then run `llmtune report` on it (the study keeps every trial)") from None
    return result


def _write_outputs(result: SearchResult, recipe: Recipe, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    df = result.trials
    write_atomic(out / "trials.csv", df.to_csv(index=False))
    write_atomic(out / "trials.json", df.to_json(orient="records", indent=1) or "")
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
            schedule = schedule_document(best, result.study.user_attrs.get(FINGERPRINT, {}).get("recipe_fingerprint"))
            if schedule is not None:  # a PBT member: its settings per segment, replayed by train --schedule
                (tmp / "schedule.json").write_text(json.dumps(schedule, indent=2, default=str))
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
    write_report(result, out / "report.html")
