"""Population-based training's rules: its settings (``study.pbt_settings``, checked with the recipe), how a
generation's members are ranked, which of them copy another (exploit) and how the copy's settings change
(explore). Pure functions over plain data; the search that runs them is `llmtune.study.pbt`.

Ranking is the pruner's multi-objective rule (`llmtune.study.rungs`): non-dominated sorting on the eval
loss and the objectives known before the end of training (`PARTIAL_METRICS`: throughput, peak memory,
projected training seconds, trainable parameters), ties broken by the loss; with eval_loss the only such
objective it is a ranking by loss.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from llmtune.config.problems import did_you_mean, fmt
from llmtune.config.space import PERTURBABLE, Choice, Range, SearchSpace
from llmtune.errors import Problem
from llmtune.study.rungs import PARTIAL_METRICS, _pareto_ranks

if TYPE_CHECKING:  # pragma: no cover
    from llmtune.config.recipe import Recipe

STRATEGIES = ("search", "pbt")
DEFAULTS: dict[str, Any] = {"population": 4, "interval": 0.25, "quantile": 0.25, "perturb": None,
                            "factors": [0.8, 1.25], "resample_probability": 0.25, "checkpoint_dir": None}
HELP = {
    "population": "members trained side by side (at least 2)",
    "interval": "fraction of the budget between exploit/explore steps (each segment is one trial)",
    "quantile": "share of members replaced at each step by copies of the best as many (0 < q <= 0.5)",
    "perturb": f"settings explore may change (default: those of {', '.join(PERTURBABLE)} that the space searches)",
    "factors": "explore multiplies a perturbed range setting by one of these (a choice moves one step)",
    "resample_probability": "chance that explore draws a perturbed setting afresh from its range instead",
    "checkpoint_dir": "folder of the members' saved states, shared by every worker (default <output_dir>/pbt-state)",
}


@dataclass(frozen=True)
class PBTSettings:
    population: int
    interval: float
    quantile: float
    perturb: tuple[str, ...]
    factors: tuple[float, ...]
    resample_probability: float
    checkpoint_dir: str | None

    @property
    def bounds(self) -> list[float]:
        """Where each segment ends, as fractions of the budget; the last is 1."""
        n = math.ceil(1.0 / self.interval - 1e-9)
        return [round(min(1.0, (i + 1) * self.interval), 6) for i in range(n)]

    @property
    def cut(self) -> int:
        """How many members are replaced (and how many count as the best) at each step."""
        return max(1, int(self.quantile * self.population + 1e-9))


def _searched_perturbable(space: SearchSpace) -> list[str]:
    return [n for n in PERTURBABLE if n in space.searched]


def check_pbt(recipe: Recipe) -> list[Problem]:
    """Every problem with ``study.strategy: pbt`` and ``study.pbt_settings`` (empty for other strategies)."""
    s = recipe.study
    if s.strategy != "pbt":
        return [Problem("study.pbt_settings", "is set but study.strategy is not pbt; set strategy: pbt or remove it")] \
            if s.pbt_settings else []
    problems: list[Problem] = []
    path = "study.pbt_settings"
    raw = s.pbt_settings if isinstance(s.pbt_settings, dict) else {}
    for key in raw:
        if key not in DEFAULTS:
            problems.append(Problem(f"{path}.{key}", f"unknown setting{did_you_mean(str(key), list(DEFAULTS))} "
                                                     f"(known: {', '.join(DEFAULTS)})"))
    v = {**DEFAULTS, **raw}

    def number(key: str, ok: bool, want: str) -> None:
        value = v[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
            problems.append(Problem(f"{path}.{key}", f"{fmt(value)} must be {want}"))

    pop = v["population"]
    number("population", isinstance(pop, int) and not isinstance(pop, bool) and pop >= 2, "a whole number >= 2")
    iv = v["interval"]
    number("interval", isinstance(iv, (int, float)) and 0 < iv <= 0.5,
           "a fraction of the budget in (0, 0.5] (0.25: four segments)")
    q = v["quantile"]
    number("quantile", isinstance(q, (int, float)) and 0 < q <= 0.5, "in (0, 0.5] (0.25: the worst quarter)")
    rp = v["resample_probability"]
    number("resample_probability", isinstance(rp, (int, float)) and 0 <= rp <= 1, "a probability in [0, 1]")
    factors = v["factors"]
    if not isinstance(factors, list) or not factors or not all(
            isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in factors):
        problems.append(Problem(f"{path}.factors", f"{fmt(factors)} must be a list of positive numbers, e.g. [0.8, 1.25]"))
    ckpt = v["checkpoint_dir"]
    if ckpt is not None and (not isinstance(ckpt, str) or "://" in ckpt):
        problems.append(Problem(f"{path}.checkpoint_dir", f"{fmt(ckpt)} must be a folder path that every worker can "
                                                          "read and write (e.g. an NFS mount); object storage URLs "
                                                          "are not supported"))
    if s.pruner != "none":
        problems.append(Problem("study.pruner", f"{fmt(s.pruner)}: population-based training replaces the pruner "
                                                "(its exploit step stops the worst members); set pruner: none"))
    try:
        space = SearchSpace.from_dict(recipe.search)
    except Exception:  # the search section's own problems are reported by check_search
        return problems
    if not problems:
        problems += _too_short(recipe, space, float(v["interval"]))
    perturb = v["perturb"]
    if perturb is None:
        if not _searched_perturbable(space):
            problems.append(Problem("search", "population-based training needs at least one of "
                                              f"{', '.join(PERTURBABLE)} searched (a range or choices) to explore, "
                                              "e.g. learning_rate: {low: 1e-5, high: 1e-3, log: true}"))
    elif not isinstance(perturb, list) or not perturb:
        problems.append(Problem(f"{path}.perturb", f"{fmt(perturb)} must be a list of settings, e.g. [learning_rate]"))
    else:
        for name in perturb:
            if name not in PERTURBABLE:
                problems.append(Problem(f"{path}.perturb", f"{fmt(name)} cannot change during training (it shapes the "
                                        f"adapter or the data plan; it is copied on exploit); perturb only "
                                        f"{', '.join(PERTURBABLE)}"))
            elif name not in space.searched:
                problems.append(Problem(f"{path}.perturb", f"{fmt(name)} is fixed in search; give it a range or "
                                                           "choices to perturb it"))
    return problems


def _largest(spec: Any) -> Any:
    if isinstance(spec, Choice):
        return max(spec.options)
    return spec.high if isinstance(spec, Range) else spec.value


def _too_short(recipe: Recipe, space: SearchSpace, interval: float) -> list[Problem]:
    """A budget in examples fixes a trial's optimizer steps: each segment needs at least one, with the
    largest global batch the space allows (budgets in tokens or epochs are checked when a segment runs)."""
    budget = recipe.train.budget
    if budget.kind != "examples" or not budget.amount or budget.amount <= 0:
        return []
    batch = _largest(space.specs["batch_size"]) if "batch_size" in space.specs else None
    if batch is None:
        batch = _largest(space.specs["micro_batch_size"]) * recipe.train.gradient_accumulation_steps
    steps, segments = math.ceil(budget.amount / batch), math.ceil(1.0 / interval - 1e-9)
    if steps >= segments:
        return []
    return [Problem("study.pbt_settings.interval", f"{interval:g} cuts a trial into {segments} segments, but it has only "
                    f"{steps} optimizer step(s) ({budget.amount:g} examples in batches of up to {batch}); raise "
                    f"train.budget.examples or the interval")]


def pbt_settings(recipe: Recipe) -> PBTSettings:
    """The checked settings (`check_pbt` has passed), with defaults filled in."""
    v = {**DEFAULTS, **(recipe.study.pbt_settings or {})}
    perturb = v["perturb"] if v["perturb"] is not None else _searched_perturbable(recipe.space)
    return PBTSettings(population=int(v["population"]), interval=float(v["interval"]), quantile=float(v["quantile"]),
                       perturb=tuple(perturb), factors=tuple(float(f) for f in v["factors"]),
                       resample_probability=float(v["resample_probability"]), checkpoint_dir=v["checkpoint_dir"])


# ---------------------------------------------------------------------------------------------- decisions


@dataclass
class Member:
    """A member after one segment, as the study recorded it."""

    member: int
    trial: int                     # the segment's trial number
    alive: bool                    # trained and evaluated with a finite loss (not crashed, diverged, oom)
    loss: float
    metrics: dict[str, float]
    params: dict[str, Any]         # its searched settings (the Optuna params)
    schedule: list[dict[str, Any]]
    state: str                     # folder of its saved state


@dataclass
class Next:
    """What a member does in the next segment."""

    member: int
    source: int                    # the member whose state it resumes: itself, or the one it copies
    source_trial: int
    exploited: bool
    params: dict[str, Any]
    resume: str
    schedule: list[dict[str, Any]] = field(default_factory=list)  # up to the previous segment


def rank(members: list[Member], objectives: dict[str, str]) -> list[Member]:
    """Living members, best first: the pruner's non-dominated sorting on loss and the partial objectives
    every member measured, then loss, then member number (a stable order every worker agrees on)."""
    alive = [m for m in members if m.alive and math.isfinite(m.loss)]
    if not alive:
        return []
    extra = [k for k, d in objectives.items() if k in PARTIAL_METRICS
             and all(math.isfinite(m.metrics.get(k, math.nan)) for m in alive)]
    signs = [1.0 if objectives[k] == "minimize" else -1.0 for k in extra]
    points = np.array([[m.loss, *(s * m.metrics[k] for s, k in zip(signs, extra, strict=True))] for m in alive])
    ranks = _pareto_ranks(points)
    order = sorted(range(len(alive)), key=lambda i: (int(ranks[i]), alive[i].loss, alive[i].member))
    return [alive[i] for i in order]


def explore(params: dict[str, Any], settings: PBTSettings, space: SearchSpace, rng: random.Random) -> dict[str, Any]:
    """A copy's settings: each perturbed setting multiplied by a factor (a choice moves one step), or drawn
    afresh with `resample_probability`; kept inside its range. Nothing else changes."""
    out = dict(params)
    for name in settings.perturb:
        spec = space.specs.get(name)
        if name not in out or spec is None:
            continue
        fresh = rng.random() < settings.resample_probability
        if isinstance(spec, Choice):
            options = list(spec.options)
            i = options.index(out[name]) if out[name] in options else 0
            out[name] = rng.choice(options) if fresh else options[min(len(options) - 1, max(0, i + rng.choice((-1, 1))))]
        elif isinstance(spec, Range):
            if fresh:
                value = (math.exp(rng.uniform(math.log(spec.low), math.log(spec.high))) if spec.log
                         else rng.uniform(spec.low, spec.high))
            else:
                value = float(out[name]) * rng.choice(settings.factors)
            value = min(spec.high, max(spec.low, value))
            if spec.step:
                value = min(spec.high, spec.low + round((value - spec.low) / spec.step) * spec.step)
            out[name] = int(round(value)) if spec.is_int else float(value)
    return out


def next_generation(members: list[Member], settings: PBTSettings, space: SearchSpace, objectives: dict[str, str],
                    rng: random.Random) -> list[Next]:
    """Each member's next segment: the worst `cut` living members and every dead one copy one of the best
    `cut` (state and settings: exploit) and perturb the copy (explore); the others continue as they are.
    Empty when no member is alive."""
    ranked = rank(members, objectives)
    if not ranked:
        return []
    cut = min(settings.cut, max(1, len(ranked) // 2)) if len(ranked) > 1 else 1
    top = ranked[:cut]
    replaced = {m.member for m in ranked[max(cut, len(ranked) - cut):]} | {m.member for m in members if m not in ranked}
    out = []
    for m in sorted(members, key=lambda m: m.member):
        if m.member in replaced:
            src = top[rng.randrange(len(top))]
            out.append(Next(m.member, src.member, src.trial, True, explore(src.params, settings, space, rng),
                            src.state, list(src.schedule)))
        else:
            out.append(Next(m.member, m.member, m.trial, False, dict(m.params), m.state, list(m.schedule)))
    return out
