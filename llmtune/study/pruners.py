"""Early stopping of weak LoRA trials in multi-objective studies.

Optuna's pruners refuse multi-objective studies (``Trial.report`` raises there), so llmtune
decides pruning itself: the pruners here (none, ASHA, Hyperband) say which rungs a trial is
evaluated at and apply the successive-halving rule of `llmtune.study.rungs`, which reads every
trial's curve from the study storage and, given the objectives, ranks trials on their partial
measurements as well as their loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import optuna

from llmtune.config.choices import PRUNER_SETTINGS
from llmtune.config.pruner_settings import (
    DEFAULT_METRIC_TOLERANCE,
    check_pruner_settings,
    check_rung_settings,
)
from llmtune.study.rungs import (
    PARTIAL_METRICS,
    asha_prunes,
    geometric_rungs,
    match_rung,
)


@runtime_checkable
class Pruner(Protocol):
    """What the harness needs from a pruner."""

    pause: bool  # a stopped trial keeps its state, to be promoted later (study/promotion.py)

    def rungs(self) -> list[float]:
        """Ascending fractions (< 1) at which the study wants an evaluation and a decision."""
        ...

    def should_prune(self, study: optuna.Study, trial_number: int, fraction: float, eval_loss: float,
                     metrics: dict[str, float] | None = None) -> bool:
        """Whether running trial ``trial_number``, just evaluated at ``fraction``, should stop.

        ``metrics``: what the trial has measured so far of its other objectives (may be omitted)."""
        ...

    def describe(self) -> str:
        """One line for logs."""
        ...


def _ranked_on(objectives: dict[str, str]) -> str:
    extra = [m for m in objectives if m in PARTIAL_METRICS]
    return f", Pareto-ranked on eval_loss+{'+'.join(extra)}" if extra else ""


def _fmt(fractions: list[float]) -> str:
    return ",".join(f"{f:.3g}" for f in fractions) or "-"


class NopPruner:
    """Never prunes; asks for no intermediate evaluations."""

    pause = False

    def rungs(self) -> list[float]:
        return []

    def rungs_for_trial(self, trial_number: int) -> list[float]:
        return []

    def should_prune(self, study: optuna.Study, trial_number: int, fraction: float, eval_loss: float,
                     metrics: dict[str, float] | None = None) -> bool:
        return False

    def describe(self) -> str:
        return "none"


class _RungSettings:
    """The settings ASHA and Hyperband share, checked once (`config.pruner_settings.check_rung_settings`);
    ``_rungs`` are the geometric rungs they give. ``min_fraction`` unset is the pruner's own `MIN_FRACTION`."""

    MIN_FRACTION = 1 / 9

    def __init__(
        self, eta: int = 3, min_fraction: float | None = None, min_trials_per_rung: int | None = None,
        objectives: dict[str, str] | None = None, metric_tolerance: float = DEFAULT_METRIC_TOLERANCE,
        pause: bool = True,
    ) -> None:
        if min_fraction is None:
            min_fraction = self.MIN_FRACTION
        values, problems = check_rung_settings(eta, min_fraction, min_trials_per_rung, metric_tolerance, pause)
        if problems:
            raise ValueError("\n".join(problems))
        self.eta: int = values["eta"]
        self.min_fraction: float = values["min_fraction"]
        self.min_trials_per_rung: int = values["min_trials_per_rung"]
        self.objectives = dict(objectives or {})
        self.metric_tolerance: float = values["metric_tolerance"]
        self.pause: bool = values["pause"]  # a stopped trial is paused (study/promotion.py)
        self._rungs = geometric_rungs(self.min_fraction, self.eta)
        self._brackets()

    def _brackets(self) -> None:
        """Hyperband's brackets over `_rungs`; ASHA has one."""


class ASHAPruner(_RungSettings):
    """Asynchronous successive halving on eval loss.

    Rungs are ``min_fraction * eta**k`` below 1 (eta=3, min_fraction=1/9 -> [1/9, 1/3]).
    When a trial is evaluated at a rung, the population is every trial with a curve point at that
    rung (any state, running ones included), minus FAIL trials and trials whose
    ``llmtune.status`` is oom/over_budget/crashed/timeout, plus the trial itself with the loss
    just passed.  With n trials in that population:

    * non-finite eval loss -> prune (a peer's non-finite loss counts as +inf);
    * n < min_trials_per_rung (default eta) -> continue;
    * otherwise keep = max(1, n // eta) (floor) and the trial continues iff its loss is <= the
      keep-th smallest loss.  Ties at the cutoff all continue, so more than ``keep`` trials may
      survive, and the outcome never depends on which tied trial arrived first.

    A fraction that is not a rung (within 1e-6) never prunes. ``trial_number`` is the trial's configuration
    (`rungs.configuration`). With ``pause`` (default) a stopped trial keeps its state and is promoted later
    when the rule, asked again, lets it continue (`llmtune.study.promotion`).
    """

    MIN_FRACTION = 1 / 9

    def rungs(self) -> list[float]:
        return list(self._rungs)

    def rungs_for_trial(self, trial_number: int) -> list[float]:
        """Same rungs for every trial (Hyperband differs)."""
        return list(self._rungs)

    def should_prune(self, study: optuna.Study, trial_number: int, fraction: float, eval_loss: float,
                     metrics: dict[str, float] | None = None) -> bool:
        rung = match_rung(self._rungs, fraction)
        if rung is None:
            return False
        return asha_prunes(study, trial_number, rung, eval_loss, self.eta, self.min_trials_per_rung,
                            objectives=self.objectives, metrics=metrics, tolerance=self.metric_tolerance)

    def describe(self) -> str:
        return (
            f"ASHA(eta={self.eta}, rungs={_fmt(self._rungs)}, min_trials_per_rung={self.min_trials_per_rung}"
            f"{_ranked_on(self.objectives)})"
        )


def _interleave(weights: list[int]) -> list[int]:
    """Smooth weighted round robin: bracket i appears weights[i] times per period, spread out.

    Spreading matters for small studies: contiguous blocks would put the first few dozen
    trials all in one bracket.
    """
    total = sum(weights)
    credit = [0] * len(weights)
    order: list[int] = []
    for _ in range(total):
        for i, w in enumerate(weights):
            credit[i] += w
        pick = max(range(len(weights)), key=credit.__getitem__)  # ties -> lowest index
        credit[pick] -= total
        order.append(pick)
    return order


class HyperbandPruner(_RungSettings):
    """Several ASHA brackets with increasingly late first rungs.

    With base rungs ``geometric_rungs(min_fraction, eta)`` = r_0 < ... < r_{m-1}, bracket b
    (b = 0..m) uses rungs r_b..r_{m-1}; bracket m has none and trains everything fully, as in
    the Hyperband paper (eta=3, min 1/27 -> 4 brackets starting at 1/27, 1/9, 1/3, none).
    A bracket with s rungs gets weight ceil((m+1) * eta**s / (s+1)) (the paper's trial counts,
    which give every bracket roughly the same total budget); trial number t goes to
    ``bracket_of(t)``, a fixed weighted round robin over t, so every worker agrees without
    coordination.  Decisions follow the ASHA rule, comparing only trials of the same bracket.
    """

    MIN_FRACTION = 1 / 27

    def _brackets(self) -> None:
        base = self._rungs
        self.bracket_rungs: list[list[float]] = [base[b:] for b in range(len(base) + 1)]
        n = len(self.bracket_rungs)
        self.weights: list[int] = [
            math.ceil(n * self.eta ** len(r) / (len(r) + 1)) for r in self.bracket_rungs
        ]
        self._schedule = _interleave(self.weights)

    def bracket_of(self, trial_number: int) -> int:
        """Bracket index of a trial; depends only on its number."""
        return self._schedule[trial_number % len(self._schedule)]

    def rungs(self) -> list[float]:
        # Every bracket's rungs are a suffix of the base rungs, so these cover all of them.
        return list(self._rungs)

    def rungs_for_trial(self, trial_number: int) -> list[float]:
        """Only the rungs where this trial can be pruned (lets the harness skip useless evals)."""
        return list(self.bracket_rungs[self.bracket_of(trial_number)])

    def should_prune(self, study: optuna.Study, trial_number: int, fraction: float, eval_loss: float,
                     metrics: dict[str, float] | None = None) -> bool:
        bracket = self.bracket_of(trial_number)
        rung = match_rung(self.bracket_rungs[bracket], fraction)
        if rung is None:
            return False
        return asha_prunes(
            study,
            trial_number,
            rung,
            eval_loss,
            self.eta,
            self.min_trials_per_rung,
            same_group=lambda number: self.bracket_of(number) == bracket,
            objectives=self.objectives,
            metrics=metrics,
            tolerance=self.metric_tolerance,
        )

    def describe(self) -> str:
        brackets = " | ".join(_fmt(r) for r in self.bracket_rungs)
        weights = "/".join(str(w) for w in self.weights)
        return (
            f"Hyperband(eta={self.eta}, brackets=[{brackets}], weights={weights}, "
            f"min_trials_per_rung={self.min_trials_per_rung}{_ranked_on(self.objectives)})"
        )


@dataclass(frozen=True)
class PrunerKind:
    """One entry of `study.pruner`: its class and the settings `study.pruner_settings` may give it."""

    name: str
    cls: Callable[..., Pruner]  # the pruner class: takes its settings and the objectives
    settings: tuple[str, ...]
    help: str


# study.pruner's choices are this registry's names; the settings each takes, and their rules, are config's
# (`llmtune.config.choices.PRUNER_SETTINGS`, `llmtune.config.pruner_settings`), so that a recipe is checked
# without this module.
PRUNERS: dict[str, PrunerKind] = {k.name: k for k in [
    PrunerKind("none", NopPruner, PRUNER_SETTINGS["none"], "every trial runs its whole budget"),
    PrunerKind("asha", ASHAPruner, PRUNER_SETTINGS["asha"],
               "asynchronous successive halving, multi-objective ranks at each rung"),
    PrunerKind("hyperband", HyperbandPruner, PRUNER_SETTINGS["hyperband"], "several ASHA brackets, from aggressive to none"),
]}


def make_pruner(
    name: str, *, objectives: dict[str, str] | None = None, **settings: Any
) -> Pruner:
    """Build a pruner from a config name ("none" | "asha" | "hyperband") and its settings.

    ``objectives`` (metric -> minimize/maximize, the study's) lets the pruner rank trials on the
    partial measurements of their other objectives as well as their loss (see `llmtune.study.rungs`)."""
    key = name.strip().lower() if isinstance(name, str) else name
    kind = PRUNERS.get(key)
    if kind is None:
        raise ValueError(f"unknown pruner {name!r}: use one of {', '.join(repr(k) for k in PRUNERS)}")
    problems = check_pruner_settings(kind.name, settings)
    if problems:
        raise ValueError("\n".join(problems))
    if not kind.settings:
        return kind.cls()
    return kind.cls(**settings, objectives=objectives)
