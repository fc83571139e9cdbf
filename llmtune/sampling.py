"""llmtune's default sampler: multivariate TPE that never spends a trial on a configuration it has run.

In a search space made only of choices (the usual LoRA space: ranks, alpha ratios, lengths, packing,
quantization, a few learning rates), TPE proposes configurations it has already tried more and more
often as it narrows in: each repeat costs a whole fine-tune and teaches nothing, because a trial is
deterministic given its settings and seed. `UniqueSampler` asks the wrapped sampler again when that
happens and, if it keeps repeating itself, runs an untried configuration drawn at random (which
is what exploration should do at that point anyway). Spaces with a float range are left alone:
repeats there have probability zero.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
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
        tried = {tuple(t.params.get(n) for n in names)
                 for t in study.get_trials(deepcopy=False, states=_TRIED) if t.number != trial.number}
        params: dict[str, Any] = {}
        for _ in range(self.retries):
            params = self.sampler.sample_relative(study, trial, search_space)
            if not params:
                break  # the wrapped sampler is in its random start-up: draw untried points here
            if tuple(params.get(n) for n in names) not in tried:
                return params
        fresh = self._untried(names, choices, tried)  # type: ignore[arg-type]
        return fresh if fresh is not None else params

    def _untried(self, names: list[str], choices: dict[str, list[Any]], tried: set[tuple[Any, ...]]
                 ) -> dict[str, Any] | None:
        size = int(np.prod([len(choices[n]) for n in names], dtype=np.float64))
        if len(tried) >= size:
            return None  # every configuration has run: repeats are all that is left
        for _ in range(1000):  # rejection sampling: cheap while most of the space is untried
            pick = tuple(choices[n][self._rng.randint(len(choices[n]))] for n in names)
            if pick not in tried:
                return dict(zip(names, pick, strict=True))
        untried = [p for p in _product([choices[n] for n in names]) if p not in tried]
        return dict(zip(names, untried[self._rng.randint(len(untried))], strict=True))

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.sampler.before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self.sampler.after_trial(study, trial, state, values)


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
