"""Population-based training's settings (``study.pbt_settings``): their defaults and help, the check run with
the recipe (`check_pbt`) and the typed settings a search runs with (`pbt_settings`). What population-based
training does with them is `llmtune.study.pbt_plan` (ranking, exploit, explore) and `llmtune.study.pbt`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmtune.config.problems import did_you_mean, fmt
from llmtune.config.space import PERTURBABLE, Choice, Range, SearchSpace
from llmtune.errors import Problem

if TYPE_CHECKING:  # pragma: no cover
    from llmtune.config.recipe import Recipe

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
