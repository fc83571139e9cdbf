"""The samplers `study.sampler` can name (one registry), and llmtune's default: multivariate TPE that
never spends a trial on a configuration it has run.

In a search space made only of choices (the usual LoRA space: ranks, alpha ratios, lengths, packing,
quantization, a few learning rates), TPE proposes configurations it has already tried more and more
often as it narrows in: each repeat costs a whole fine-tune and teaches nothing, because a trial is
deterministic given its settings and seed. `UniqueSampler` asks the wrapped sampler again when that
happens and, if it keeps repeating itself, runs an untried configuration drawn at random (which
is what exploration should do at that point anyway). Spaces with a float range are left alone:
repeats there have probability zero.

A configuration is what a trial runs: its active settings, the parameters it actually has. In a
conditional space (``bnb_4bit_*`` only with 4-bit quantization) a proposal also values the settings
it leaves inactive, and those must not make a repeat look new.
"""

from __future__ import annotations

import importlib.util
import itertools
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from llmtune.config.problems import one_of
from llmtune.config.space import SearchSpace
from llmtune.errors import SearchError

# Trials whose configuration counts as tried. A crash (FAIL) counts too: a trial is deterministic
# given its settings, so the same configuration would crash again. (Trials lost with their worker
# are re-queued by the search loop with fixed parameters, which take precedence over this sampler.)
_TRIED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING, TrialState.FAIL)
_MISSING = object()


def _choices(distribution: BaseDistribution) -> list[Any] | None:
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, IntDistribution) and not distribution.log:
        return list(range(distribution.low, distribution.high + 1, distribution.step))
    return None


class UniqueSampler(optuna.samplers.BaseSampler):
    """Wraps a sampler so that, in a discrete space, no configuration is proposed twice.

    Only the relative (joint) proposal is checked: that is where a multivariate sampler proposes a
    whole configuration. While the wrapped sampler samples independently (its random start-up
    trials) this sampler draws an untried configuration itself, uniformly: random without replacement.
    """

    def __init__(self, sampler: optuna.samplers.BaseSampler, *, retries: int = 8, seed: int | None = None) -> None:
        self.sampler = sampler
        self.retries = retries
        self._rng = np.random.RandomState(seed)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()
        self._rng = np.random.RandomState()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        choices = {name: _choices(d) for name, d in search_space.items()}
        if not search_space or any(c is None for c in choices.values()):
            return self.sampler.sample_relative(study, trial, search_space)
        names = sorted(search_space)
        tried = _Tried((t.params for t in study.get_trials(deepcopy=False, states=_TRIED) if t.number != trial.number),
                       names)
        params: dict[str, Any] = {}
        for _ in range(self.retries):
            params = self.sampler.sample_relative(study, trial, search_space)
            if not params:
                break  # the wrapped sampler is in its random start-up: draw untried points here
            if not tried.covers(params):
                return params
        fresh = self._untried(names, choices, tried)  # type: ignore[arg-type]
        return fresh if fresh is not None else params

    def _untried(self, names: list[str], choices: dict[str, list[Any]], tried: _Tried) -> dict[str, Any] | None:
        size = int(np.prod([len(choices[n]) for n in names], dtype=np.float64))
        if len(tried) >= size:
            return None  # every configuration has run: repeats are all that is left
        for _ in range(1000):  # rejection sampling: cheap while most of the space is untried
            pick = dict(zip(names, [choices[n][self._rng.randint(len(choices[n]))] for n in names], strict=True))
            if not tried.covers(pick):
                return pick
        untried = [p for p in (dict(zip(names, combo, strict=True)) for combo in itertools.product(*(choices[n] for n in names)))
                   if not tried.covers(p)]
        # A conditional space has fewer configurations than the product counted above: it can run out here.
        return untried[self._rng.randint(len(untried))] if untried else None

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.sampler.before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self.sampler.after_trial(study, trial, state, values)


class _Tried:
    """The configurations already run, each as the parameters (of the relative search space) its trial has.

    A proposal values every parameter, active or not. An objective asks for the same parameters in the
    same order whenever it gets the same answers, so a proposal that agrees with a tried trial on every
    parameter that trial has would run that trial again: the values it gives beyond those are never
    asked for. Trials are kept by which parameters they have (a few shapes: 4-bit or not), so that
    check is one set lookup a shape."""

    def __init__(self, trials: Iterable[dict[str, Any]], names: Sequence[str]) -> None:
        self._by_shape: dict[tuple[str, ...], set[tuple[Any, ...]]] = {}
        for params in trials:
            shape = tuple(n for n in names if n in params)
            if shape:  # a trial not yet given its parameters (another worker's, just claimed) has run nothing
                self._by_shape.setdefault(shape, set()).add(tuple(params[n] for n in shape))

    def __len__(self) -> int:
        return sum(len(values) for values in self._by_shape.values())

    def covers(self, proposal: dict[str, Any]) -> bool:
        """Whether a trial given these values would repeat a tried configuration."""
        return any(tuple(proposal.get(n, _MISSING) for n in shape) in values for shape, values in self._by_shape.items())


def startup_trials(n_trials: int) -> int:
    """Random trials before TPE models the results: an eighth of the budget, 4 to 10.

    Fewer than Optuna's 10 on small budgets: on the replayed LoRA table (benchmarks/replay.py) 5
    start-up trials out of 40 reached a higher hypervolume at 10, 20 and 40 trials than 10 did."""
    return max(4, min(10, n_trials // 8))


def _tpe(space: SearchSpace, n_objectives: int, n_trials: int, seed: int | None, parallel: bool) -> BaseSampler:
    with warnings.catch_warnings():  # multivariate/group are "experimental" in Optuna, and long-standing
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # constant liar: with parallel workers, running trials count as bad guesses so workers spread out
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          n_startup_trials=startup_trials(n_trials), constant_liar=parallel)


def default_sampler(space: SearchSpace, n_objectives: int, n_trials: int, seed: int | None,
                    parallel: bool = False) -> tuple[BaseSampler, str]:
    """The sampler `sampler: auto` uses when neither the grid nor NSGA-II fits: multivariate TPE,
    never re-running a configuration when the space is all choices. Returns it and why."""
    tpe = _tpe(space, n_objectives, n_trials, seed, parallel)
    kind = "multi-objective TPE" if n_objectives > 1 else "TPE"
    if space.grid() is not None:
        return UniqueSampler(tpe, seed=seed), f"{kind} over a discrete space, never repeating a configuration"
    return tpe, f"{kind} suits small budgets over mixed, conditional spaces"


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid, without its `study.stop()` (only legal inside `optimize`; we cap n_trials instead)."""

    def after_trial(self, study, trial, state, values) -> None:  # type: ignore[no-untyped-def]
        return None


def _grid(space: SearchSpace, n_objectives: int, n_trials: int, seed: int | None, parallel: bool) -> BaseSampler:
    return _GridSampler(space.grid() or {"_": [0]}, seed=seed)


def _nsga2(space: SearchSpace, n_objectives: int, n_trials: int, seed: int | None, parallel: bool) -> BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(8, min(50, n_trials // 5)))


def _gp(space: SearchSpace, n_objectives: int, n_trials: int, seed: int | None, parallel: bool) -> BaseSampler:
    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials(n_trials))


def _random(space: SearchSpace, n_objectives: int, n_trials: int, seed: int | None, parallel: bool) -> BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


def _cmaes(space: SearchSpace, n_objectives: int, n_trials: int, seed: int | None, parallel: bool) -> BaseSampler:
    return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup_trials(n_trials))


@dataclass(frozen=True)
class SamplerKind:
    """One entry of `study.sampler`: how to build it and what it cannot do (checked at validation)."""

    name: str
    help: str
    build: Callable[[SearchSpace, int, int, int | None, bool], BaseSampler]
    multi_objective: bool = True  # handles several objectives
    discrete_only: bool = False   # needs every searched setting to be choices or a stepped range
    needs: str | None = None      # a module it imports, with its pip name after a colon

    def problem(self, space: SearchSpace, n_objectives: int) -> str | None:
        """Why this sampler cannot run this search, with the fix; None when it can."""
        if not self.multi_objective and n_objectives > 1:
            return f"{self.name!r} handles one objective only, and the recipe has {n_objectives}; use auto, tpe or nsga2"
        if self.discrete_only and space.grid() is None:
            return (f"{self.name!r} needs every searched setting to be a list of choices or a range with step; "
                    "give the float ranges a step, or use auto")
        if self.needs:
            module, _, pip_name = self.needs.partition(":")
            if importlib.util.find_spec(module) is None:
                return f"{self.name!r} needs {module}: pip install {pip_name or module}"
        return None


# study.sampler's choices are this registry's names plus "auto" (see `make_sampler`).
SAMPLERS: dict[str, SamplerKind] = {k.name: k for k in [
    SamplerKind("tpe", "multivariate TPE (Optuna), an eighth of n_trials random at the start", _tpe),
    SamplerKind("nsga2", "NSGA-II, for many objectives and large budgets", _nsga2),
    SamplerKind("gp", "Gaussian-process Bayesian optimisation", _gp, needs="scipy"),
    SamplerKind("random", "uniform random search", _random),
    SamplerKind("grid", "every point of a discrete space", _grid, discrete_only=True),
    SamplerKind("cmaes", "CMA-ES, one objective", _cmaes, multi_objective=False, needs="cmaes"),
]}
SAMPLER_CHOICES = ("auto", *SAMPLERS)


def make_sampler(name: str, space: SearchSpace, n_objectives: int, n_trials: int | None, seed: int | None,
                 parallel: bool) -> tuple[BaseSampler, str]:
    """The sampler `study.sampler` names; ``auto`` picks by objectives, space and budget and says why."""
    budget = n_trials or 100
    if name == "auto":
        grid = space.grid_size()
        if grid is not None and grid <= budget:
            name, why = "grid", f"the space has {grid} points, within n_trials={budget}: try them all"
        elif n_objectives > 1 and budget > 200:
            name, why = "nsga2", f"{n_objectives} objectives and a large budget ({budget} trials)"
        else:  # multivariate TPE that never repeats a configuration (benchmarks/replay.py measures the choice)
            default, why = default_sampler(space, n_objectives, budget, seed, parallel)
            return default, f"tpe ({why})"
    else:
        why = "as the recipe asks"
    kind = SAMPLERS.get(name)
    if kind is None:
        raise SearchError(f"study.sampler: {one_of(name, list(SAMPLER_CHOICES))}")
    problem = kind.problem(space, n_objectives)
    if problem:
        raise SearchError(f"study.sampler: {problem}")
    return kind.build(space, n_objectives, budget, seed, parallel), f"{name} ({why})"
