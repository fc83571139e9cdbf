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
from fractions import Fraction
from typing import Any, Protocol, runtime_checkable

import optuna

from llmtune.study.rungs import (
    DEFAULT_METRIC_TOLERANCE,
    FRACTION_TOL,
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


def _check_tolerance(tolerance: Any) -> float:
    ok = isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool)
    if not ok or not 0.0 <= float(tolerance) < 1.0:
        raise ValueError(f"setting 'metric_tolerance'={tolerance!r} is invalid: use a relative difference in [0, 1), "
                         "e.g. metric_tolerance=0.1 to treat throughput within 10% as equal")
    return float(tolerance)


def _check_eta(eta: Any) -> int:
    if isinstance(eta, float) and eta.is_integer():
        eta = int(eta)  # YAML/CLI may hand over 3.0
    if isinstance(eta, bool) or not isinstance(eta, int) or eta < 2:
        raise ValueError(f"setting 'eta'={eta!r} is invalid: use an integer >= 2 (e.g. eta=3)")
    return eta


def _check_min_fraction(min_fraction: Any) -> float:
    ok = isinstance(min_fraction, (int, float)) and not isinstance(min_fraction, bool)
    if not ok or not (0.0 < float(min_fraction) < 1.0 - FRACTION_TOL):
        raise ValueError(
            f"setting 'min_fraction'={min_fraction!r} is invalid: use a number in (0, 1), "
            "e.g. min_fraction=1/9 (1 would never prune: use pruner 'none' for that)"
        )
    return float(min_fraction)


def _check_min_trials(min_trials: Any, eta: int) -> int:
    # Default eta: with fewer than eta trials at a rung the top-1/eta share rounds down to zero
    # trials, i.e. there is no evidence yet to rank anyone out; from eta on, the best continues.
    if min_trials is None:
        return eta
    if isinstance(min_trials, bool) or not isinstance(min_trials, int) or min_trials < 1:
        raise ValueError(
            f"setting 'min_trials_per_rung'={min_trials!r} is invalid: use an integer >= 1 "
            f"or leave it unset (defaults to eta={eta})"
        )
    return min_trials


def _check_pause(pause: Any) -> bool:
    if isinstance(pause, str) and pause.strip().lower() in ("true", "false"):  # from --set or a replay's spec
        pause = pause.strip().lower() == "true"
    if not isinstance(pause, bool):
        raise ValueError(f"setting 'pause'={pause!r} is invalid: use true (a stopped trial keeps its state and may "
                         "be promoted later) or false (stopped trials are killed, nothing kept)")
    return pause


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
    """The settings ASHA and Hyperband share, checked once; ``_rungs`` are the geometric rungs they give."""

    def __init__(self, eta: int, min_fraction: float, min_trials_per_rung: int | None,
                 objectives: dict[str, str] | None, metric_tolerance: float, pause: bool = True) -> None:
        problems: list[str] = []

        def checked(check: Callable[..., Any], *args: Any) -> Any:
            try:
                return check(*args)
            except ValueError as e:  # every bad setting is reported, not only the first
                problems.append(str(e))
                return None

        self.eta = checked(_check_eta, eta) or 3
        self.min_fraction = checked(_check_min_fraction, min_fraction) or 1 / 9
        self.min_trials_per_rung = checked(_check_min_trials, min_trials_per_rung, self.eta) or self.eta
        self.objectives = dict(objectives or {})
        self.metric_tolerance = checked(_check_tolerance, metric_tolerance) or 0.0
        self.pause = checked(_check_pause, pause) is not False  # a stopped trial is paused (study/promotion.py)
        if problems:
            raise ValueError("\n".join(problems))
        self._rungs = geometric_rungs(self.min_fraction, self.eta)


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

    def __init__(
        self, eta: int = 3, min_fraction: float = 1 / 9, min_trials_per_rung: int | None = None,
        objectives: dict[str, str] | None = None, metric_tolerance: float = DEFAULT_METRIC_TOLERANCE,
        pause: bool = True,
    ) -> None:
        super().__init__(eta, min_fraction, min_trials_per_rung, objectives, metric_tolerance, pause)

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

    def __init__(
        self, eta: int = 3, min_fraction: float = 1 / 27, min_trials_per_rung: int | None = None,
        objectives: dict[str, str] | None = None, metric_tolerance: float = DEFAULT_METRIC_TOLERANCE,
        pause: bool = True,
    ) -> None:
        super().__init__(eta, min_fraction, min_trials_per_rung, objectives, metric_tolerance, pause)
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
    cls: type
    settings: tuple[str, ...]
    help: str


_RUNG_SETTINGS = ("eta", "min_fraction", "min_trials_per_rung", "metric_tolerance", "pause")
# study.pruner's choices are this registry's names.
PRUNERS: dict[str, PrunerKind] = {k.name: k for k in [
    PrunerKind("none", NopPruner, (), "every trial runs its whole budget"),
    PrunerKind("asha", ASHAPruner, _RUNG_SETTINGS, "asynchronous successive halving, multi-objective ranks at each rung"),
    PrunerKind("hyperband", HyperbandPruner, _RUNG_SETTINGS, "several ASHA brackets, from aggressive to none"),
]}


def _coerce(value: Any) -> Any:
    """Numbers written as text in YAML/CLI ("3", "1/9", "0.05") become numbers."""
    if not isinstance(value, str):
        return value
    try:
        number = Fraction(value.strip())
    except (ValueError, ZeroDivisionError):
        return value  # left as text so the pruner's own check names it
    return int(number) if number.denominator == 1 else float(number)


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
    for setting, value in settings.items():
        if setting not in kind.settings:
            fix = f"allowed settings: {', '.join(kind.settings)}" if kind.settings else "it takes no settings"
            raise ValueError(f"pruner {key!r} has no setting {setting!r} (given {value!r}); {fix}")
    if not kind.settings:
        return kind.cls()
    kwargs = {k: _coerce(v) for k, v in settings.items()}
    try:
        return kind.cls(**kwargs, objectives=objectives)
    except ValueError as err:
        raise ValueError(f"pruner {key!r}: {err}") from None
