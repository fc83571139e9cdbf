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

Several processes share one study, and a search resumes where it stopped: `study_sampler` builds each
process's sampler with a seed of its own (`process_seed`), so they do not replay one random sequence,
and in a discrete space every registered sampler but the grid runs inside `UniqueSampler`, which sees
every trial in the storage, running and queued ones included (`_configurations`).
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from llmtune.config.choices import SAMPLER_CHOICES, sampler_problem
from llmtune.config.problems import one_of
from llmtune.config.space import Choice, Fixed, SearchSpace, is_active
from llmtune.errors import SearchError
from llmtune.study import engine
from llmtune.study.attrs import PROPOSAL

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
    if isinstance(distribution, FloatDistribution) and distribution.step:
        n = int(round((distribution.high - distribution.low) / distribution.step))
        return [distribution.low + i * distribution.step for i in range(n + 1)]  # as SearchSpace.grid
    return None


def distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    """Every searched setting as the distribution `SearchSpace.suggest` asks Optuna for."""
    out: dict[str, BaseDistribution] = {}
    for name in space.searched:
        spec = space.specs[name]
        if isinstance(spec, Choice):
            out[name] = CategoricalDistribution(list(spec.options))
        elif isinstance(spec, Fixed):
            continue
        elif spec.is_int:
            out[name] = IntDistribution(int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
        else:
            out[name] = FloatDistribution(spec.low, spec.high, step=spec.step, log=spec.log)
    return out


def active_params(space: SearchSpace, params: dict[str, Any]) -> dict[str, Any]:
    """The parameters a trial given `params` has: a conditional setting only under its condition."""
    values = {n: s.value for n, s in space.specs.items() if isinstance(s, Fixed)} | params
    return {n: v for n, v in params.items() if is_active(n, values)}


def _configurations(study: Study, trial: FrozenTrial) -> Iterable[dict[str, Any]]:
    """The configuration of every other trial that counts as tried: a finished trial's parameters; for a
    queued retry its fixed parameters; for a running trial of any process the configuration it was
    given (`PROPOSAL`: written before its parameters are), else what parameters it has so far."""
    for t in study.get_trials(deepcopy=False, states=_TRIED):
        if t.number == trial.number:
            continue
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            yield t.system_attrs.get("fixed_params") or t.system_attrs.get(PROPOSAL) or t.params
        else:
            yield t.params


class UniqueSampler(optuna.samplers.BaseSampler):
    """Wraps a sampler so that, in a discrete space, no configuration is proposed twice.

    Given the `space`, it proposes whole configurations itself (its relative search space is every
    searched setting): the wrapped sampler's relative proposal, completed by its independent samples,
    asked again while it repeats a tried configuration; while the wrapped sampler has no relative
    proposal (its random start-up trials, or a sampler that samples one setting at a time) it draws an
    untried configuration itself, uniformly: random without replacement. That works for any sampler.
    The chosen configuration is written on the trial (`PROPOSAL`) and checked once more, so that two
    processes asking at the same moment do not both take it.

    Without a `space` only the wrapped sampler's own relative proposals are checked.
    """

    def __init__(self, sampler: optuna.samplers.BaseSampler, *, space: SearchSpace | None = None, retries: int = 8,
                 seed: int | None = None) -> None:
        self.sampler = sampler
        self.space = space
        self.retries = retries
        self._distributions = distributions(space) if space is not None else None
        self._rng = np.random.RandomState(seed)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()
        self._rng = np.random.RandomState()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if self._distributions is not None:
            return dict(self._distributions)
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        maybe = {name: _choices(d) for name, d in search_space.items()}
        if not search_space or any(c is None for c in maybe.values()):
            return self.sampler.sample_relative(study, trial, search_space)
        if trial.system_attrs.get("fixed_params"):
            return {}  # a queued retry: it runs its own settings again
        choices = {name: c for name, c in maybe.items() if c is not None}
        names = sorted(search_space)
        params: dict[str, Any] = {}
        for _ in range(3):
            params = self._pick(study, trial, search_space, names, choices, _Tried(_configurations(study, trial), names))
            if self.space is None or not params:
                return params
            # Claim it where every process looks, then look again: of two processes that took the same
            # configuration at the same moment, at least one sees the other's claim and picks again.
            engine.storage(study).set_trial_system_attr(engine.trial_id(trial), PROPOSAL, active_params(self.space, params))
            if not _Tried(_configurations(study, trial), names).covers(params):
                return params
        return params

    def _pick(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution], names: list[str],
              choices: dict[str, list[Any]], tried: _Tried) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for _ in range(self.retries):
            params = self._proposal(study, trial, search_space)
            if not params:
                break  # the wrapped sampler is in its random start-up: draw untried points here
            if not tried.covers(params):
                return params
        fresh = self._untried(names, choices, tried)
        return fresh if fresh is not None else params

    def _proposal(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        """The wrapped sampler's next configuration; {} while it has no relative proposal."""
        if self.space is None:
            return self.sampler.sample_relative(study, trial, search_space)
        params = self.sampler.sample_relative(study, trial, self.sampler.infer_relative_search_space(study, trial))
        if not params:
            return {}
        # the settings it would sample one at a time (outside its relative space), as Optuna would ask it
        return {name: params[name] if name in params else self.sampler.sample_independent(study, trial, name, dist)
                for name, dist in search_space.items()}

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
        return UniqueSampler(tpe, space=space, seed=seed), f"{kind} over a discrete space, never repeating a configuration"
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
    """One entry of `study.sampler`: how to build it. What it cannot do (several objectives, a continuous
    space, a missing module) is config's (`llmtune.config.choices.SAMPLER_LIMITS`), checked with the recipe."""

    name: str
    help: str
    build: Callable[[SearchSpace, int, int, int | None, bool], BaseSampler]

    def problem(self, space: SearchSpace, n_objectives: int) -> str | None:
        """Why this sampler cannot run this search, with the fix; None when it can (`sampler_problem`)."""
        return sampler_problem(self.name, space, n_objectives)


# study.sampler's choices are this registry's names plus "auto" (see `make_sampler`): `SAMPLER_CHOICES`.
SAMPLERS: dict[str, SamplerKind] = {k.name: k for k in [
    SamplerKind("tpe", "multivariate TPE (Optuna), an eighth of n_trials random at the start", _tpe),
    SamplerKind("nsga2", "NSGA-II, for many objectives and large budgets", _nsga2),
    SamplerKind("gp", "Gaussian-process Bayesian optimisation", _gp),
    SamplerKind("random", "uniform random search", _random),
    SamplerKind("grid", "every point of a discrete space", _grid),
    SamplerKind("cmaes", "CMA-ES, one objective", _cmaes),
]}


def make_sampler(name: str, space: SearchSpace, n_objectives: int, n_trials: int | None, seed: int | None,
                 parallel: bool) -> tuple[BaseSampler, str]:
    """The sampler `study.sampler` names; ``auto`` picks by objectives, space and budget and says why.
    In a discrete space every sampler but the grid (which runs each point once by itself) is wrapped
    in `UniqueSampler`: none spends a trial on a configuration the study has run or is running."""
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
    sampler = kind.build(space, n_objectives, budget, seed, parallel)
    if name != "grid" and space.grid() is not None:
        return UniqueSampler(sampler, space=space, seed=seed), f"{name} ({why}; never repeating a configuration)"
    return sampler, f"{name} ({why})"


def process_seed(seed: int | None, study: Study, worker: str = "") -> int | None:
    """The seed one search process samples with: the study's seed mixed with the process (`worker`, e.g.
    host:pid; "" for a search that is alone on its storage) and the number of trials the study already
    holds. Processes started together on one study, or a search resumed with the same seed, would else
    replay one random sequence: the same start-up configurations again. A search alone on a fresh
    study keeps the seed itself, so that it stays reproducible."""
    if seed is None:
        return None
    trials = len(study.get_trials(deepcopy=False))
    if not trials and not worker:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{worker}:{trials}".encode()).digest()[:4], "little")


def study_sampler(study: Study, name: str, space: SearchSpace, n_objectives: int, n_trials: int | None,
                  seed: int | None, parallel: bool, worker: str = "") -> tuple[BaseSampler, str]:
    """The sampler this process uses on `study` (`make_sampler` with `process_seed`), set as the
    study's sampler; returns it and why it was chosen. What `Search.prepare` builds."""
    sampler, why = make_sampler(name, space, n_objectives, n_trials, process_seed(seed, study, worker), parallel)
    study.sampler = sampler
    return sampler, why
