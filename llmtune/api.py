"""The Python API, and the only door to the work: every CLI command calls one of these functions, which
do every check (values, ``gpus``, masking), so a notebook and the command line behave the same.

Names: ``recipe`` is a YAML path, a mapping or a `Recipe`; ``run`` is what a search left (its output_dir,
a storage URL, or a `SearchResult`); ``output_dir`` is where this call writes; ``storage`` and
``study_name`` say which study to open; ``overrides`` are ``key=value`` strings as ``--set`` takes them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtune.config.recipe import Recipe, apply_overrides, recipe_from_dict, set_search_values, unsafe_name
from llmtune.config.recipe_file import read_recipe_file
from llmtune.deliver.results import SearchResult
from llmtune.errors import Problem, RecipeError
from llmtune.study.memory import MemoryEstimate, estimate_memory
from llmtune.trial.result import TrialResult

if TYPE_CHECKING:  # pragma: no cover
    from llmtune.deliver.hub import Export, Push

RecipeLike = str | os.PathLike[str] | Recipe | dict[str, Any]
RunLike = str | os.PathLike[str] | SearchResult


def _silent(message: str) -> None:
    return None


# One trial is no search: a PBT recipe's strategy (which needs a setting left to explore) does not apply to it.
ONE_TRIAL = ["study.strategy=search", "study.pbt_settings={}"]


def load(recipe: RecipeLike, overrides: list[str] | None = None, values: dict[str, Any] | None = None) -> Recipe:
    """The validated recipe (a new one), with ``overrides`` and fixed ``values`` of searchable settings applied.

    Raises `RecipeError` listing every problem (unknown keys with a "did you mean", bad values)."""
    if isinstance(recipe, Recipe):
        data, source = recipe.to_dict(), None
    elif isinstance(recipe, dict):
        data, source = recipe, None
    else:
        data, source = read_recipe_file(recipe), os.fspath(recipe)
    if overrides:
        data = apply_overrides(data, overrides, source=source)
    if values:
        data = set_search_values(data, values)
    return recipe_from_dict(data, source=source)


def init_recipe(model: str, data: str | os.PathLike[str], *, output: str | os.PathLike[str] = "recipe.yaml",
                gpu_memory_gb: float | None = None, overwrite: bool = False,
                log: Callable[[str], None] | None = None) -> Path:
    """Write a commented recipe for `model` and the data file `data` to `output` and return its path:
    the data format guessed from the first row, a search space from published LoRA priors, the
    quantizations that fit ``gpu_memory_gb`` (default: this machine's GPU 0; none but "none" without
    one). ``data`` may also be a parquet file, a folder of split files or a built-in data set
    (llmtune/tiny-tasks). On a machine without a GPU the training budget is sized for its CPU and what a
    trial and the search will take goes to ``log``. Raises `RecipeError` when the data cannot be read or
    `output` exists (unless ``overwrite``)."""
    from llmtune.config.init import recipe_text

    out = Path(output)
    if out.exists() and not overwrite:
        raise RecipeError([Problem("--output", f"{str(out)!r} exists; give another path or --force")])
    text = recipe_text(model, os.fspath(data), gpu_memory_gb=gpu_memory_gb, log=log)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def validate(recipe: RecipeLike, *, overrides: list[str] | None = None,
             warn: Callable[[str], None] | None = None) -> Recipe:
    """Check a recipe, its data, its model (config only) and this machine; returns the recipe, or raises
    `RecipeError` with every problem (see `llmtune.preflight`).

    Each warning (e.g. bad data rows that trials will drop: how many, why, which rows, the fix) goes to
    ``warn``; by default it is printed to stderr as ``warning: ...``."""
    from llmtune.preflight import preflight

    r = load(recipe, overrides)
    for message in preflight(r).warnings:
        (warn or _warn_stderr)(message)
    return r


def search(recipe: RecipeLike, *, n_trials: int | None = None, storage: str | None = None,
           study_name: str | None = None, workers: int = 1, gpus: str | list[str] | None = None,
           output_dir: str | os.PathLike[str] | None = None, quiet: bool = True, overrides: list[str] | None = None,
           log: Callable[[str], None] | None = None) -> SearchResult:
    """Run (or resume) the recipe's search; returns the results (Pareto front, chosen trial, table).

    ``gpus``: "all", "0,1", groups "0+1,2+3", or a list of entries: one trial at a time per entry.
    Re-running with the same recipe and output_dir continues the same study.
    """
    from llmtune.deliver.finalize import finalize
    from llmtune.preflight import preflight
    from llmtune.study.loop import Search, parse_gpus
    from llmtune.study.progress import make_progress

    bad = []
    if n_trials is not None and n_trials < 1:
        bad.append(Problem("n_trials (--n-trials)", f"{n_trials} must be at least 1; leave it out for study.n_trials"))
    if workers < 1:
        bad.append(Problem("workers (--workers)", f"{workers} must be at least 1"))
    elif workers > MAX_WORKERS:
        bad.append(Problem("workers (--workers)", f"{workers} is more trials at once than one machine runs well (at most "
                                                  f"{MAX_WORKERS}); to scale out, start a search per machine on one "
                                                  "shared storage (--storage postgresql://...)"))
    if study_name is not None and (why := unsafe_name(study_name, "--study-name")):
        bad.append(Problem("study_name", why))
    bad += _output_dir_given(output_dir)
    if bad:
        raise RecipeError(bad)
    entries = _check_gpus(parse_gpus(gpus)) if gpus is not None else None
    r = load(recipe, overrides)
    if output_dir is not None:
        r.output_dir = os.fspath(output_dir)
    # before anything is written: the storage and output_dir this search will use, not only the recipe's
    checked = preflight(r, storage=storage, output_dir=_output_field(r.output_dir, output_dir))
    for message in checked.warnings:
        _warn_stderr(message)
    say = log or (_silent if quiet else print)
    run = Search(r, storage=storage, n_trials=n_trials, workers=workers, gpus=entries,
                 study_name=study_name, progress=make_progress(quiet), log=say,
                 data_fingerprint=checked.data_fingerprint)
    study = run.run()
    return finalize(study, r)


# Trials at once in one search process (--workers): each is a process with its own model copy and threads.
MAX_WORKERS = 64


def _output_dir_given(output_dir: str | os.PathLike[str] | None) -> list[Problem]:
    """An empty ``output_dir`` (``--output-dir ""``) would write into the current folder."""
    if output_dir is not None and not os.fspath(output_dir).strip():
        return [Problem("output_dir (--output-dir)", f"{os.fspath(output_dir)!r} is empty, which would write into the "
                                                     "current folder; give a folder, e.g. runs/NAME, or leave "
                                                     "--output-dir out for the recipe's output_dir")]
    return []


def _check_gpus(entries: list[str]) -> list[str]:
    """--gpus entries on this machine: there are GPUs, and no GPU is given to two workers."""
    from llmtune.errors import SearchError
    from llmtune.hardware import gpu_count

    if entries and not gpu_count():
        raise SearchError(f"--gpus {','.join(entries)}: no NVIDIA GPU is visible here, so the trials would run on the "
                          "CPU; leave --gpus out to run on the CPU (--workers N for trials at once)")
    seen: dict[str, str] = {}
    for entry in entries:
        for gpu in (g.strip() for g in entry.split("+")):
            if gpu in seen:
                raise SearchError(f"--gpus: GPU {gpu} is given twice ({seen[gpu]!r} and {entry!r}): two trials on one "
                                  "GPU would each size itself for the whole card; give each GPU once, e.g. --gpus 0,1")
            seen[gpu] = entry
    return entries


def train(recipe: RecipeLike, values: dict[str, Any] | None = None, *, output_dir: str | os.PathLike[str] | None = None,
          overrides: list[str] | None = None, in_process: bool = False,
          schedule: str | os.PathLike[str] | None = None) -> TrialResult:
    """One trial with the given settings; the other searched settings take their midpoints / first choices.

    ``schedule``: a PBT member's schedule file (best/schedule.json of a population-based search): the
    trial takes its settings and changes learning rate, warmup and dropout where the member did, making
    the member's updates again (`llmtune.harness.resume`).

    ``values`` are checked like recipe values (unknown names and bad values raise `RecipeError`). Runs in
    a child process like a search trial unless ``in_process``. Writes to ``output_dir`` (default
    <the recipe's output_dir>/train).
    """
    from llmtune.harness.train import eval_fractions
    from llmtune.preflight import preflight
    from llmtune.study.storage import masked_recipe
    from llmtune.trial.runner import TrialJob, run_trial_process

    overrides = [*(overrides or []), *ONE_TRIAL]
    segment = None
    if schedule is not None:
        from llmtune.deliver.lineage import read_schedule

        doc = read_schedule(os.fspath(schedule))
        made_for = doc.get("recipe_fingerprint")
        if made_for and load(recipe, overrides).fingerprint() != made_for:
            raise RecipeError([Problem("--schedule", f"{os.fspath(schedule)!r} was made by a search with other training "
                                       "settings (model, data, budget, seed or search space); replay it with that "
                                       "search's recipe")])
        values = {**doc["settings"], **(values or {})}
        segment = {"schedule": doc["schedule"], "start": 0.0, "stop": 1.0}
    given = _output_dir_given(output_dir)
    if given:
        raise RecipeError(given)
    r = load(recipe, overrides, values)
    out = Path(output_dir or Path(r.output_dir) / "train")
    for message in preflight(r, study=False, output_dir=_output_field(out, output_dir)).warnings:
        _warn_stderr(message)  # the rows the trial drops, as validate and search say
    settings = r.space.complete({})
    if in_process:
        from llmtune.harness.train import run_trial

        return run_trial(r, settings, out, segment=segment)
    from llmtune.builtin.names import resolve_data_source, resolve_model_name

    resolve_model_name(r.model.name)
    resolve_data_source(r.data.source)
    job = TrialJob(recipe=masked_recipe(r), values=settings, out_dir=out.resolve(), fractions=eval_fractions(r),
                   timeout=r.study.trial_timeout, segment=segment)
    return run_trial_process(job)


def _output_field(path: str | os.PathLike[str], given: str | os.PathLike[str] | None) -> tuple[str, str]:
    """(folder, the field it came from) for the preflight's check of where a command writes."""
    return os.fspath(path), "output_dir (--output-dir)" if given is not None else "output_dir"


def _writable(path: str | os.PathLike[str], given: str | os.PathLike[str] | None) -> None:
    """Raise `RecipeError` when the folder a command would write cannot be made, before it reads anything."""
    from llmtune.preflight import folder_problem

    if given is not None and (empty := _output_dir_given(given)):
        raise RecipeError(empty)
    problem = folder_problem(*_output_field(path, given))
    if problem:
        raise RecipeError([problem])


def trial_settings_for(recipe: RecipeLike, values: dict[str, Any] | None = None, *,
                       overrides: list[str] | None = None) -> dict[str, Any]:
    """Every setting a `train` call with these arguments would use."""
    return load(recipe, overrides, values).space.complete({})


def estimate_space(recipe: RecipeLike, *, overrides: list[str] | None = None, gpu_memory_gb: float | None = None,
                   limit: int = 64) -> list[dict[str, Any]]:
    """Predicted peak GPU memory of the space's memory-relevant corners (config only, no weights), one row
    each, smallest first: the searched memory settings, weights, activations+logits, predicted_gb, and
    whether it fits ``gpu_memory_gb`` (default: this machine's GPU 0, if any) and the recipe's budget."""
    from llmtune.hardware import gpu_memory_bytes
    from llmtune.study.gate import MEMORY_SETTINGS, estimate_for, representative_points

    r = load(recipe, overrides)
    if gpu_memory_gb is None and (total := gpu_memory_bytes(0)):
        gpu_memory_gb = total / 2**30
    limit_gb = r.constraints.get("peak_memory_gb", {}).get("max")
    rows = []
    for values in representative_points(r, limit=limit):
        est = estimate_for(r, values)
        row: dict[str, Any] = {k: values[k] for k in MEMORY_SETTINGS if k in r.space.searched}
        row.update({"weights": est.weights / 2**30, "activations+logits": (est.activations + est.logits) / 2**30,
                    "predicted_gb": est.total_gb})
        if gpu_memory_gb is not None:
            row["fits"] = "yes" if est.total_gb <= gpu_memory_gb else "no"
        if limit_gb is not None:
            row["within_budget"] = "yes" if est.total_gb <= limit_gb else "no"
        rows.append(row)
    rows.sort(key=lambda row: row["predicted_gb"])
    return rows


def load_results(run: RunLike, *, study_name: str | None = None, storage: str | None = None) -> SearchResult:
    """Open a finished or running search by its output_dir or storage URL."""
    from llmtune.deliver.results import load_results as _load

    if isinstance(run, SearchResult):
        return run
    return _load(os.fspath(run), study_name=study_name, storage=storage)


def report(run: RunLike, *, study_name: str | None = None, storage: str | None = None,
           output_dir: str | os.PathLike[str] | None = None) -> SearchResult:
    """Write trials.csv/json, best/ and report.html of a finished or running search (default: into its
    output_dir); returns the results."""
    from llmtune.deliver.finalize import finalize

    if output_dir is not None:
        _writable(output_dir, output_dir)
    result = load_results(run, study_name=study_name, storage=storage)
    if output_dir is not None:
        result.recipe.output_dir = os.fspath(output_dir)
    else:
        _writable(result.recipe.output_dir, None)
    return finalize(result.study, result.recipe)


def export_adapter(run: RunLike, output_dir: str | os.PathLike[str], *, trial: int | None = None, merge: bool = False,
                   tokenizer: bool | None = None, study_name: str | None = None, storage: str | None = None) -> Export:
    """Write a trial's adapter (default: the chosen one) as a PEFT folder with a model card into ``output_dir``
    (new, empty, or an earlier export). ``merge`` adds the merged full model (16/32-bit bases only)."""
    from llmtune.deliver.hub import export_adapter as _export

    _writable(output_dir, output_dir)
    result = load_results(run, study_name=study_name, storage=storage)
    return _export(result, os.fspath(output_dir), trial=trial, merge=merge, tokenizer=tokenizer)


def push_to_hub(run: RunLike, repo_id: str | None = None, *, private: bool | None = None, trial: int | None = None,
                revision: str | None = None, dry_run: bool = False, token: str | None = None,
                output_dir: str | os.PathLike[str] | None = None, study_name: str | None = None,
                storage: str | None = None, endpoint: str | None = None) -> Push:
    """Export a trial's adapter (into ``output_dir``, default <run>/export/trial-NNNN) and upload it to the Hub
    in one commit; private by default; ``dry_run`` uploads nothing. Token from HF_TOKEN / `hf auth login`;
    ``endpoint``: another Hub server (default: HF_ENDPOINT or the Hugging Face Hub)."""
    from llmtune.deliver.hub import push_to_hub as _push

    if output_dir is not None:
        _writable(output_dir, output_dir)
    result = load_results(run, study_name=study_name, storage=storage)
    return _push(result, repo_id, private=private, trial=trial, revision=revision, dry_run=dry_run, token=token,
                 output_dir=None if output_dir is None else os.fspath(output_dir), endpoint=endpoint)


__all__ = ["load", "validate", "search", "train", "trial_settings_for", "estimate_memory", "estimate_space",
           "MemoryEstimate", "load_results", "report", "export_adapter", "push_to_hub"]
