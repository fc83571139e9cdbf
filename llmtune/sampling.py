"""llmtune's default sampler: multivariate TPE that never spends a trial on a configuration it has run.

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

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from llmtune.space import SearchSpace

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
        untried = [p for p in (dict(zip(names, combo, strict=True)) for combo in _product([choices[n] for n in names]))
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


def _product(lists: list[list[Any]]) -> list[tuple[Any, ...]]:
    import itertools

    return list(itertools.product(*lists))


def startup_trials(n_trials: int) -> int:
    """Random trials before TPE models the results: an eighth of the budget, 4 to 10.

    Fewer than Optuna's 10 on small budgets: on the replayed LoRA table (benchmarks/replay.py) 5
    start-up trials out of 40 reached a higher hypervolume at 10, 20 and 40 trials than 10 did."""
    return max(4, min(10, n_trials // 8))


def default_sampler(space: SearchSpace, n_objectives: int, n_trials: int, seed: int | None,
                    parallel: bool = False) -> tuple[optuna.samplers.BaseSampler, str]:
    """The sampler `sampler: auto` uses when neither the grid nor NSGA-II fits: multivariate TPE,
    never re-running a configuration when the space is all choices. Returns it and why."""
    with warnings.catch_warnings():  # multivariate/group are "experimental" in Optuna, and long-standing
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        tpe = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                         n_startup_trials=startup_trials(n_trials), constant_liar=parallel)
    kind = "multi-objective TPE" if n_objectives > 1 else "TPE"
    if space.grid() is not None:
        return UniqueSampler(tpe, seed=seed), f"{kind} over a discrete space, never repeating a configuration"
    return tpe, f"{kind} suits small budgets over mixed, conditional spaces"
