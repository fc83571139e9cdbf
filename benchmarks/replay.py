"""Replay samplers and pruners against a recorded tabular LoRA benchmark, as if the trials were real.

Each replay is a real Optuna study driven by ask/tell: the sampler proposes a configuration of the
table's grid (through llmtune's own SearchSpace), the table answers with what that fine-tune
measured, and the pruner decides at each rung from the learning curves stored in the trials' user
attributes, exactly as llmtune's search loop stores them. A completed trial costs its recorded
training seconds; a pruned one the training seconds it had spent when it reached its rung.

Any table in the documented format (benchmarks/README.md#table-format, `replay_table.py`) replays. On a
table with execution settings, ``llmtune-probes`` replays llmtune's default search (`study.execution:
probe`, `probe_trial`): the sampler sees the learning settings only, each learning configuration pays
for probing all its execution variants and trains the fastest, and every variant enters the front.

Quality is the hypervolume of the feasible front found so far divided by the hypervolume of the
table's true front (objectives turned to minimisation, scaled to [0, 1] by the table's best and
worst values; reference point 1.1 in every objective).

    python3 benchmarks/replay.py --table benchmarks/results/tabular_cpu.csv [--seeds 20] [--jobs 4]
    python3 benchmarks/replay.py --table benchmarks/results/tabular_cpu-long.csv --tag replay_long \
        --methods llmtune-probes+asha,llmtune-probes+none,llmtune-priors+asha,random+none,random+asha,tpe+none,nsga2+none
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replay_report import (  # noqa: E402
    cheapest_to,
    hv_at_seconds,
    markdown,
    plot,
    probe_accuracy,
    quantiles,
    ratios,
    rung_correlations,
    seconds_to,
    summarise,
    targets,
)
from replay_table import (  # noqa: E402  (re-exported: tests and other benchmarks use them from here)
    DONE,
    REF,
    Table,
    at_rung,
    exclude,
    final_loss,
    hypervolume,
    load_table,
    pool_speed,
    synthetic_table,
    true_front_size,
)

from llmtune.config.space import PARAMS, Choice, Fixed, SearchSpace  # noqa: E402
from llmtune.study import engine, probes, promotion  # noqa: E402
from llmtune.study.attrs import CURVE, PAUSED, PRIOR, RUNG_METRICS, STATUS, VARIANT_OF  # noqa: E402
from llmtune.study.priors import starting_points  # noqa: E402
from llmtune.study.pruners import make_pruner  # noqa: E402
from llmtune.study.rungs import FRACTION_TOL, PARTIAL_METRICS  # noqa: E402

__all__ = ["REF", "Table", "at_rung", "exclude", "hv_at_seconds", "hypervolume", "load_table", "pool_speed",
           "probe_trial", "quantiles", "replay", "replay_trial", "seconds_to", "synthetic_table", "true_front_size"]
# llmtune's samplers: "llmtune" = `sampler: auto` alone; "-priors" with its known-good starting points
# queued first (the search with `study.execution: search`); "-probes" also searching the learning settings
# only, execution variants probed (`study.execution: probe`, llmtune's default).
PRIORS_SAMPLERS = ("llmtune-priors", "llmtune-probes")
SAMPLERS = ("llmtune", "llmtune-new", *PRIORS_SAMPLERS, "random", "grid", "nsga2", "tpe", "gp")
# The baselines as a real llmtune search runs them (`study.sampler: random` and so on, llmtune's sampler registry:
# tpe is multivariate TPE): in a discrete space wrapped in `UniqueSampler`, so that no sampler, ours or theirs,
# pays twice for one configuration. (Before 2026-12-07 "tpe" was Optuna's independent TPE inside `UniqueSampler`,
# which has no relative proposal to check and so drew uniformly: it replayed as random search.)
BASELINES = ("random", "nsga2", "tpe", "gp")
DEFAULT_OBJECTIVES = "eval_loss:minimize,train_throughput:maximize"


def make_sampler(name: str, table: Table, space: SearchSpace, seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    """The samplers compared: llmtune's choice for this recipe, and the baselines as llmtune's registry builds them."""
    if name == "llmtune":
        from llmtune.study.samplers import make_sampler as llmtune_sampler

        return llmtune_sampler("auto", space, len(table.objectives), n_trials, seed, parallel=False)[0]
    if name == "llmtune-new":
        from llmtune.study.samplers import default_sampler

        return default_sampler(space, n_objectives=len(table.objectives), n_trials=n_trials, seed=seed)[0]
    if name in BASELINES:  # as `study.sampler: <name>` builds it: llmtune's registry, never repeating a configuration
        from llmtune.study.samplers import make_sampler as llmtune_sampler

        return llmtune_sampler(name, space, len(table.objectives), n_trials, seed, parallel=False)[0]
    if name == "grid":  # llmtune's `sampler: grid` (Optuna's grid sampler): every grid point once, seeded order
        from llmtune.study.samplers import SAMPLERS

        return SAMPLERS["grid"].build(space, len(table.objectives), n_trials, seed, False)
    raise ValueError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")


def replay_pruner(spec: str, table: Table) -> Any:
    """A pruner from its replay name: "asha", "hyperband", "none"; "<name>-loss" ranks on eval loss alone
    (llmtune before multi-objective pruning); settings after colons, as in the recipe's pruner section:
    "asha:min_fraction=0.333333:eta=2"."""
    name, *settings = spec.split(":")
    loss_only = name.endswith("-loss")
    kwargs = dict(s.split("=", 1) for s in settings)
    return make_pruner(name.removesuffix("-loss"), objectives=None if loss_only else dict(table.objectives), **kwargs)


def replay(table: Table, sampler_name: str, pruner_name: str, seed: int, n_trials: int,
           planned: int | None = None, variant_values: str = "probe", stop_at_front: bool = False,
           facts: Any = None) -> dict[str, list]:
    """One replayed search. Per trial: cumulative training seconds, HV ratio, whether it was pruned,
    its own cost, the rung it was pruned at (None: it completed), its configuration's key and the
    seconds of that cost spent on probes. ``planned`` is the n_trials llmtune's samplers are configured
    for (default: n_trials); ``variant_values``: see `probe_trial`; ``stop_at_front``: stop once the whole
    true front is found (nothing after that changes a result about seconds); ``facts``: the model and
    budget the priors start from (`llmtune.study.priors.ModelFacts`; None: the rule's 7B-class default)."""
    probing = sampler_name == "llmtune-probes"
    if probing and not table.execution:
        raise ValueError("llmtune-probes needs a table with execution settings (the meta's \"execution\")")
    space = replay_space(table.grid)
    sample_space = learning_space(table, space) if probing else space
    budget = planned or n_trials
    base = "llmtune" if sampler_name in PRIORS_SAMPLERS else sampler_name
    sampler = make_sampler(base, table, sample_space, seed, budget)
    pruner = replay_pruner(pruner_name, table)
    study = optuna.create_study(directions=[d for _, d in table.objectives], sampler=sampler)
    if sampler_name in PRIORS_SAMPLERS and not isinstance(sampler, optuna.samplers.GridSampler):
        # As Strategy.created does for `sampler: auto`
        for config in starting_points(sample_space, facts, {m for m, _ in table.objectives}, budget):
            study.enqueue_trial(config, user_attrs={PRIOR: True}, skip_if_exists=True)
    options = [dict(zip(table.execution, combo, strict=True))
               for combo in itertools.product(*(table.grid[n] for n in table.execution))]
    spent, front = 0.0, []
    out: dict[str, list] = {"seconds": [], "hv_ratio": [], "pruned": [], "cost": [], "rung": [], "key": [],
                            "probe_s": [], "resumed": [], "regret": [], "missing": []}
    # Single-objective view: the best loss found so far over the table's best (relative regret)
    loss = table.objectives[0][0]
    table_best = min(float(r[loss]) for r in table.rows.values() if r["status"] == "complete" and r.get(loss) is not None)
    best = math.inf
    if base.startswith("llmtune") or base == "grid":
        # These never repeat a configuration: past the grid's size they would only spin on repeats.
        n_trials = min(n_trials, sample_space.grid_size() or n_trials)
    configurations = 0
    while configurations < n_trials or promotion.waiting(study):
        if pruner.pause:  # as Strategy.next_state: paused trials the rule now lets go on are queued first
            promotion.promote(study, pruner.should_prune, log=lambda line: None)
        trial = study.ask()
        values = sample_space.suggest(trial)
        resume = promotion.resume_of(engine.frozen(study, trial))
        if resume is not None:  # a continuation: its paused trial's configuration (and execution variant), no probes
            values = {**values, **study.trials[resume.trial].params}
            key = table.key(values)
            cost, pruned_at = replay_trial(study, trial, table.rows[key], pruner, table.objectives, table.charge, resume)
            found, probe_s = ([table.rows[key]] if pruned_at is None else []), 0.0
        elif probing:
            cost, pruned_at, key, found, probe_s = probe_trial(study, trial, table, values, options, pruner,
                                                               variant_values)
        else:
            key = table.key(values)
            row = table.rows.get(key)
            if row is None:
                raise ValueError(f"the table has no configuration {key}: record the whole grid")
            cost, pruned_at = replay_trial(study, trial, row, pruner, table.objectives, table.charge)
            found, probe_s = ([row] if pruned_at is None and row["status"] == "complete" else []), 0.0
        spent += cost
        front += [table.scaled(r) for r in found]
        best = min([best, *(float(r[loss]) for r in found if r.get(loss) is not None)])
        out["regret"].append((best - table_best) / abs(table_best) if math.isfinite(best) else math.inf)
        out["seconds"].append(spent)
        out["hv_ratio"].append(hypervolume(np.array(front)) / table.true_hv if front else 0.0)
        out["pruned"].append(pruned_at is not None)
        out["cost"].append(cost)
        out["rung"].append(pruned_at)
        out["key"].append(key)
        out["probe_s"].append(probe_s)
        out["resumed"].append(resume is not None)
        # a grid point a partial table (--missing fail) does not hold: charged 0 s and no configuration
        out["missing"].append(table.rows.get(key, {}).get("status") == "missing")
        configurations += resume is None
        if stop_at_front and out["hv_ratio"][-1] >= 1.0 - 1e-9:
            break
    return out


def replay_space(grid: dict[str, list[Any]]) -> SearchSpace:
    """llmtune's search space over a table's grid; a setting llmtune does not know (a table of another tool's
    sweep: a PEFT method, an optimizer) is one more categorical the samplers choose like any other."""
    space = SearchSpace.from_dict({n: v for n, v in grid.items() if n in PARAMS})
    for name, choices in grid.items():
        if name not in PARAMS:
            space.specs[name] = Choice(tuple(choices))
    return space


def learning_space(table: Table, space: SearchSpace) -> SearchSpace:
    """The space the sampler sees under probes: llmtune's own (`probes.learning_space`) when the table's
    execution columns are the settings llmtune probes; else those columns fixed the same way."""
    if set(probes.probed_settings(space)) == set(table.execution):
        return probes.learning_space(space)
    specs = dict(space.specs)
    for n in table.execution:
        specs[n] = Fixed(table.grid[n][0])
    return SearchSpace(specs)


def probe_trial(study: optuna.Study, trial: optuna.Trial, table: Table, values: dict[str, Any],
                options: list[dict[str, Any]], pruner: Any, variant_values: str = "probe"
                ) -> tuple[float, float | None, tuple[Any, ...], list[dict[str, Any]], float]:
    """One learning configuration under `study.execution: probe` (llmtune/study/probes.py): probe every
    execution variant (each costs its ``probe_s``), train the fastest feasible one by its probe's projected
    seconds (pruned as usual), then record every other variant as a finished trial of its own.

    The values told to the study for a variant: ``variant_values="probe"``, as probes.py computes them
    (the full trial's loss and latency; the variant probe's memory; its probe's throughput and seconds
    scaled by how the full trial compared with its own probe); "table": the variant's own recorded row
    (a perfectly calibrated probe). The front is scored on the table's values of every pair revealed.
    Returns (seconds, rung pruned at or None, the trained pair's key, the rows revealed, probe seconds)."""
    pairs = [(table.key({**values, **v}), v) for v in options]
    absent = [k for k, _ in pairs if k not in table.rows]
    if absent:
        raise ValueError(f"the table has no configuration {absent[0]}: record the whole grid")
    rows = [table.rows[k] for k, _ in pairs]
    probe_s = sum(float(r.get("probe_s") or 0.0) for r in rows)
    feasible = [i for i, r in enumerate(rows) if r["status"] == "complete" and r.get("probe_train_time_s") is not None]
    storage, tid = engine.storage(study), engine.trial_id(trial)
    if not feasible:  # no variant fits (or none was recorded): the trial fails after its probes
        storage.set_trial_user_attr(tid, STATUS, "over_budget")
        study.tell(trial, state=TrialState.FAIL)
        return probe_s, None, pairs[0][0], [], probe_s
    best = min(feasible, key=lambda i: float(rows[i]["probe_train_time_s"]))
    chosen, (key, variant) = rows[best], pairs[best]
    for name, value in variant.items():  # the loop records the chosen variant as the trial's params
        dist = CategoricalDistribution(list(table.grid[name]))
        storage.set_trial_param(tid, name, dist.to_internal_repr(value), dist)
    cost, pruned_at = replay_trial(study, trial, chosen, pruner, table.objectives, table.charge)
    if pruned_at is not None:
        return probe_s + cost, pruned_at, key, [], probe_s
    parent = engine.storage(study).get_trial(tid)
    for i in feasible:
        if i == best:
            continue
        told = rows[i] if variant_values == "table" else variant_metrics(rows[i], chosen)
        params = {**{k: v for k, v in parent.params.items() if k not in table.execution}, **pairs[i][1]}
        dists = {k: parent.distributions.get(k) or CategoricalDistribution(list(table.grid[k])) for k in params}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=dists, values=[float(told[m]) for m, _ in table.objectives],
            user_attrs={STATUS: "complete", VARIANT_OF: parent.number}))
    return probe_s + cost, None, key, [rows[i] for i in feasible], probe_s


def variant_metrics(row: dict[str, Any], chosen: dict[str, Any]) -> dict[str, Any]:
    """What probes.py records for a variant that did not train: the full trial's loss (and other
    layout-independent metrics), the variant's probed memory, its probed speed times the full trial's
    measured / probed ratio."""
    out = dict(row)
    out.update({k: chosen[k] for k in probes.FROM_FULL if k in chosen})
    out["peak_memory_gb"] = row.get("probe_peak_memory_gb") or row.get("peak_memory_gb")
    for k in probes.SCALED:
        mine, theirs, measured = row.get(f"probe_{k}"), chosen.get(f"probe_{k}"), chosen.get(k)
        if mine is not None and theirs and measured is not None:
            out[k] = float(mine) * float(measured) / float(theirs)
    return out


def partial_metrics(row: dict[str, Any], rung: float, names: list[str]) -> dict[str, float]:
    """What a trial has measured of its other objectives when it reaches ``rung``, from the table.

    Throughput so far: the rung's share of the trial's real tokens (the budget is in examples, so
    about proportional) over the training seconds recorded up to the rung; train_time_s: those
    seconds extrapolated to the whole budget; memory and parameter count: the final values (the
    peak is reached in the first steps; the count is known before training).
    """
    seconds = at_rung(row, "train_s", rung) or 0.0
    out: dict[str, float] = {}
    for name in names:
        if name not in PARTIAL_METRICS or row.get(name) is None:
            continue
        if name == "train_throughput" and seconds > 0:
            out[name] = rung * float(row["train_throughput"]) * float(row["train_time_s"]) / seconds
        elif name == "train_time_s" and seconds > 0:
            out[name] = seconds / rung
        else:
            out[name] = float(row[name])
    return out


def replay_trial(study: optuna.Study, trial: optuna.Trial, row: dict[str, Any], pruner: Any,
                 objectives: list[tuple[str, str]], charge: Any = None,
                 resume: promotion.Resume | None = None) -> tuple[float, float | None]:
    """Tell the study what the recorded run measured, pruning at rungs as llmtune's loop does: a pruned trial is
    paused where the pruner pauses (`study/promotion.py`), and a continuation (``resume``) goes on from its
    paused trial's rung, with its curve so far, paying only for the rest of the run.

    Returns (seconds charged, the rung where it was pruned or None); ``charge(row, rung)`` prices
    a trial (default: recorded training seconds).
    """
    charge = charge or Table(grid={}, objectives=[], rungs=[]).charge
    storage, tid = engine.storage(study), engine.trial_id(trial)
    start = resume.fraction if resume is not None else 0.0
    spent = charge(row, start) if start else 0.0
    if row["status"] not in DONE:
        storage.set_trial_user_attr(tid, STATUS, row["status"])
        study.tell(trial, state=TrialState.FAIL)
        return charge(row) - spent, None
    last = max((float(k.partition("@")[2]) for k, v in row.items() if k.startswith("loss@") and v is not None),
               default=1.0) if row["status"] == "stopped" else 1.0
    curve: list[list[float]] = list(resume.curve) if resume is not None else []
    partial: list[list[Any]] = list(resume.rung_metrics) if resume is not None else []
    config = resume.first if resume is not None else trial.number
    for rung in pruner.rungs_for_trial(config):
        if rung <= start + FRACTION_TOL:
            continue  # reached (and recorded) before it was paused
        if rung > last + FRACTION_TOL:
            break  # an early-stopped row has no curve past where its sweep stopped it
        loss = at_rung(row, "loss", rung)
        if loss is None:
            if not any(k.startswith("loss@") and row[k] is not None for k in row):
                raise ValueError(f"the table has no learning curves (loss@... columns): the pruner's rung {rung:.4g} "
                                 "cannot be replayed; record them with the pruner's rungs, or replay --pruners none")
            # A rung before the row's first curve point (or two rungs on one optimizer step, in short packed
            # runs, where the harness evaluates once, at the later rung): never reported, never decides.
            continue
        curve.append([rung, loss])
        metrics = partial_metrics(row, rung, [m for m, _ in objectives])
        partial.append([rung, metrics])
        # A copy each time: the in-memory storage keeps the object, and llmtune writes a new list too.
        storage.set_trial_user_attr(tid, CURVE, list(curve))
        storage.set_trial_user_attr(tid, RUNG_METRICS, list(partial))
        if pruner.should_prune(study, config, rung, loss, metrics):
            storage.set_trial_user_attr(tid, STATUS, "pruned")
            if pruner.pause:  # as record.tell marks a trial whose state the harness saved
                storage.set_trial_user_attr(tid, PAUSED, {"fraction": rung, "state": "(replayed)"})
            study.tell(trial, state=TrialState.PRUNED)
            return charge(row, rung) - spent, rung
    if row["status"] == "stopped":  # its sweep stopped it at `last`: pruned there, by another's rule
        loss = at_rung(row, "loss", last)
        if loss is not None and (not curve or curve[-1][0] < last - FRACTION_TOL):
            curve.append([last, loss])
        storage.set_trial_user_attr(tid, CURVE, curve)
        storage.set_trial_user_attr(tid, STATUS, "pruned")
        study.tell(trial, state=TrialState.PRUNED)
        return charge(row) - spent, last
    curve.append([1.0, final_loss(row, objectives)])
    storage.set_trial_user_attr(tid, CURVE, curve)
    storage.set_trial_user_attr(tid, STATUS, "complete")
    study.tell(trial, [float(row[m]) for m, _ in objectives])
    return charge(row) - spent, None



# ------------------------------------------------------------------------------------------- driver

_TABLE: Table | None = None
_OPTIONS: dict[str, Any] = {}


def _init(table: Table, options: dict[str, Any]) -> None:
    global _TABLE, _OPTIONS
    _TABLE, _OPTIONS = table, options
    if options.get("min_agreement") is not None:
        from llmtune.study import rungs

        rungs.MIN_AGREEMENT = options["min_agreement"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _job(job: tuple[str, int]) -> tuple[str, int, dict[str, list]]:
    method, seed = job
    sampler, _, pruner = method.partition("+")
    assert _TABLE is not None
    try:
        return method, seed, replay(_TABLE, sampler, pruner or "none", seed, _OPTIONS["trials"], _OPTIONS["planned"],
                                    _OPTIONS["variant_values"], stop_at_front=True, facts=_OPTIONS.get("facts"))
    except Exception as e:  # a table or option problem: one line, not a pool traceback
        raise SystemExit(f"replay of {method} (seed {seed}) failed: {type(e).__name__}: {e}") from None


def table_facts(meta: dict[str, Any], table: Table) -> Any:
    """What the priors know of a table's model and budget: from the recipe its meta keeps (llmtune's own
    tables), else None (a table that names no model: the rule's 7B-class default)."""
    recipe = meta.get("recipe")
    if not isinstance(recipe, dict):
        return None
    from llmtune.config.recipe import recipe_from_dict
    from llmtune.study.priors import recipe_facts

    try:
        return recipe_facts(recipe_from_dict(recipe), SearchSpace.from_dict(table.grid))
    except Exception as e:  # a recipe of an older llmtune: say so, and replay without
        print(f"(the table's recipe gives no model facts: {type(e).__name__}: {e}; priors assume a 7B-class model)")
        return None


def parse_objectives(text: str) -> list[tuple[str, str]]:
    out = []
    for part in text.split(","):
        name, _, direction = part.strip().partition(":")
        if direction not in ("minimize", "maximize"):
            raise SystemExit(f"--objectives: {part!r} needs a direction, e.g. eval_loss:minimize")
        out.append((name, direction))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", default="benchmarks/results/tabular_cpu.csv",
                   help="a table in the documented format (benchmarks/README.md#table-format), or 'synthetic'")
    p.add_argument("--objectives", default=DEFAULT_OBJECTIVES, help="name:direction,... (columns of the table)")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--trials", type=int, default=80, help="trials per replay (budgets are read off its prefix); "
                   "under probes a trial is a learning configuration")
    p.add_argument("--budgets", default="10,20,40")
    p.add_argument("--planned", type=int, default=20, help="the n_trials llmtune's samplers are set up for, as a "
                   "user asking for that many would (default: 20, the shipped recipes' n_trials)")
    p.add_argument("--methods", default=None, help="sampler+pruner,... (default: every --samplers x --pruners); "
                   f"samplers: {', '.join(SAMPLERS)}; pruners: none, asha, hyperband, ...")
    p.add_argument("--samplers", default=",".join(s for s in SAMPLERS if s not in ("llmtune-probes", "gp")))
    p.add_argument("--pruners", default="none,asha")
    p.add_argument("--ours", default=None, help="the method the ratios and targets are about (default: "
                   "llmtune-probes+asha if replayed, else the first method)")
    p.add_argument("--variant-values", choices=("probe", "table"), default="probe",
                   help="under probes, what the study is told about variants that did not train: probe: scaled "
                   "probe measurements, as llmtune does; table: their recorded rows (a perfect probe)")
    p.add_argument("--missing", choices=("error", "fail"), default="error",
                   help="grid points without a (complete) row: an error, or failed trials charged 0 s (a partial table)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--exclude", action="append", metavar="SETTING=VALUE",
                   help="drop one choice from the grid and its rows (e.g. quantization=4bit); repeatable")
    p.add_argument("--pool-speed", action="store_true",
                   help="average timing/memory over runs that differ only in learning rate, alpha, warmup")
    p.add_argument("--cost", choices=("train", "wall"), default="train",
                   help="train: recorded training seconds; wall: the trial's whole recorded time")
    p.add_argument("--min-agreement", type=float, default=None,
                   help="the rung gate's threshold (llmtune.study.rungs.MIN_AGREEMENT); -2 turns the gate off")
    p.add_argument("--notes", default="", help="a sentence for the report's header")
    p.add_argument("--out", default="benchmarks/results", help="folder for <tag>.md/.json/_hv.png")
    p.add_argument("--tag", default="replay")
    args = p.parse_args(argv)
    objectives = parse_objectives(args.objectives)
    if args.table in ("synthetic", "synthetic-crossing"):  # the replayer's dry run; crossing: a rung-gate check
        from tabular_record import GRIDS

        table = synthetic_table(GRIDS["cpu"], objectives, execution=("sample_packing", "gradient_checkpointing"),
                                crossing=args.table == "synthetic-crossing")
        table_meta: dict[str, Any] = {"machine": {"platform": "synthetic"}}
    else:
        try:
            table = load_table(args.table, objectives, missing=args.missing)
        except ValueError as e:
            raise SystemExit(f"--table: {e}") from None
        meta_file = Path(args.table).with_suffix(".json" if Path(args.table).suffix != ".json" else ".meta.json")
        table_meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    table.cost = args.cost
    for item in args.exclude or []:
        table = exclude(table, item)
    if args.pool_speed:
        table = pool_speed(table)
    budgets = [int(b) for b in args.budgets.split(",")]
    methods = (args.methods.split(",") if args.methods else
               [f"{s}+{pr}" for s in args.samplers.split(",") for pr in args.pruners.split(",")])
    unknown = [m for m in methods if m.partition("+")[0] not in SAMPLERS]
    if unknown:
        raise SystemExit(f"--methods: unknown sampler in {', '.join(unknown)}; samplers: {', '.join(SAMPLERS)}")
    ours = args.ours or ("llmtune-probes+asha" if "llmtune-probes+asha" in methods else methods[0])
    options = {"trials": args.trials, "planned": args.planned, "variant_values": args.variant_values,
               "facts": table_facts(table_meta, table), "min_agreement": args.min_agreement}
    t0 = time.time()
    runs: dict[str, list[dict[str, list]]] = {m: [] for m in methods}
    with mp.get_context("fork").Pool(args.jobs, initializer=_init, initargs=(table, options)) as pool:
        for method, _seed, run in pool.imap_unordered(_job, [(m, seed) for m in methods for seed in range(args.seeds)]):
            runs[method].append(run)
    grid_seconds = sum(table.charge(r) for r in table.rows.values())
    summary = summarise(runs, budgets, grid_seconds)
    rat = ratios(summary, ours)
    m = table_meta.get("machine", {})
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "table": str(args.table) + "".join(f" without {e}" for e in args.exclude or [])
        + (", speed pooled over runs with the same computation" if args.pool_speed else ""),
        "configs": sum(r["status"] == "complete" for r in table.rows.values()),
        "failed": sum(r["status"] != "complete" for r in table.rows.values()), "unrecorded": table.unrecorded,
        "machine": f"{m.get('platform', '?')}, {m.get('cpu_count', '?')} CPUs, device {m.get('device', '?')}",
        "objectives": ", ".join(f"{n} ({d[:3]})" for n, d in objectives), "seeds": args.seeds, "trials": args.trials,
        "planned": options["planned"], "variant_values": args.variant_values, "ours": ours,
        "grid_seconds": grid_seconds, "true_front_size": true_front_size(table), "notes": args.notes,
        "replay_wall_s": round(time.time() - t0, 1), "cost": "training" if args.cost == "train" else "wall-clock trial",
    }
    meta["targets"] = targets(rat, ours)
    policies = {"one configuration a trial": False, **({"probes (a learning configuration a trial)": True}
                                                       if any(m.startswith("llmtune-probes") for m in methods) else {})}
    meta["rung_rank_correlation"] = rung_correlations(table, [1 / 9, 1 / 3])
    meta["probe_accuracy"] = probe_accuracy(table) if table.execution else {}
    meta["oracle"] = {name: {f"{int(lv * 100)}%": cheapest_to(table, lv, probing) for lv in (0.9, 0.95)}
                      for name, probing in policies.items()}
    text = markdown(summary, rat, budgets, meta)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.md").write_text(text)
    (out / f"{args.tag}.json").write_text(json.dumps({"meta": meta, "summary": summary, "ratios": rat},
                                                     indent=1, default=str))
    plot(runs, out / f"{args.tag}_hv.png", f"{meta['table']}\n{meta['objectives']}; {args.seeds} seeds: median "
         "(band: IQR without pruning); solid: no pruning, dashed: asha, dotted: other")
    return 0


if __name__ == "__main__":
    sys.exit(main())
