"""Early stopping of weak LoRA trials in multi-objective studies.

Optuna's pruners refuse multi-objective studies (``Trial.report`` raises there), so llmtune
decides pruning itself.  While a trial trains, the parent process appends each evaluation to
the trial's user attribute ``"llmtune.curve"`` (a JSON list of ``[fraction, eval_loss]`` pairs,
fraction of the trial's training budget in (0, 1]).  The pruners here read those curves from the
study storage only, so they work across parallel workers sharing an RDB storage.

With one objective, or when nothing else is measured before the end, eval loss (minimised) is the
only signal.  In a multi-objective study, pruning on loss alone throws away exactly the trials that
trade a little loss for speed or memory, i.e. much of the Pareto front.  So when the search loop
also stores, per rung, what the trial has measured so far of its other objectives (user attribute
``"llmtune.rung_metrics"``: a JSON list of ``[fraction, {metric: value}]``; only metrics that are
known before the end, `PARTIAL_METRICS`), and the pruner was told the objectives, a trial is ranked
by non-dominated sorting on (loss at the rung, those metrics): multi-objective ASHA (Schmucker et
al., 2021), which reduces to plain ASHA when there is only the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol, runtime_checkable

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from llmtune.study.attrs import CURVE, RUNG_METRICS, STATUS
from llmtune.trial.endings import pruner_ignores

# Objectives whose value partway through training is a fair estimate of the final one (measured over
# the steps so far; train_time_s is extrapolated to the whole budget by the search loop).  Latency
# and generation memory are only measured after training, so they never take part in pruning.
PARTIAL_METRICS = frozenset({"train_throughput", "peak_memory_gb", "trainable_params", "train_time_s"})
# Measured objectives are noisy (throughput varied ~12% between identical runs of the tabular benchmark),
# so a pruner setting `metric_tolerance` makes values within that relative difference tie: a trial that
# barely trains then cannot survive on a 1% throughput fluke. Default 0: in the replay benchmark a 5-10%
# tolerance cost more training seconds to reach 90% of the front (1.2x -> 1.7-2.1x with llmtune's sampler)
# and did not help on the raw-timing table, so it is for users who see noisy fronts, not the default.
DEFAULT_METRIC_TOLERANCE = 0.0
# Fractions travel through JSON and arithmetic on several machines; compare with a tolerance.
FRACTION_TOL = 1e-6


@runtime_checkable
class Pruner(Protocol):
    """What the harness needs from a pruner."""

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


def geometric_rungs(min_fraction: float, eta: int) -> list[float]:
    """``min_fraction * eta**k`` for k = 0, 1, ... while below 1 (the full budget is no rung)."""
    rungs: list[float] = []
    k = 0
    while True:
        # Power, not repeated multiplication, so float error does not accumulate.
        rung = min_fraction * eta**k
        if rung >= 1.0 - FRACTION_TOL:
            return rungs
        rungs.append(rung)
        k += 1


def _match_rung(rungs: list[float], fraction: float) -> float | None:
    for rung in rungs:
        if abs(rung - fraction) <= FRACTION_TOL:
            return rung
    return None


def _is_ignored(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL or pruner_ignores(trial.user_attrs.get(STATUS))


def _loss_at(trial: FrozenTrial, rung: float) -> float | None:
    """The trial's eval loss at ``rung`` (non-finite -> inf), or None if it has no such point."""
    curve = trial.user_attrs.get(CURVE)
    if not isinstance(curve, list):
        return None
    for point in curve:
        try:
            fraction, loss = float(point[0]), float(point[1])
        except (TypeError, ValueError, IndexError, KeyError):
            continue  # a malformed point must not break every other worker's decision
        if abs(fraction - rung) <= FRACTION_TOL:
            # A diverged peer did reach the rung; it counts, ranked worst.
            return loss if math.isfinite(loss) else math.inf
    return None


def _metrics_at(trial: FrozenTrial, rung: float) -> dict[str, float]:
    """What the trial had measured of its other objectives when it reached ``rung`` ({} if unknown)."""
    points = trial.user_attrs.get(RUNG_METRICS)
    if not isinstance(points, list):
        return {}
    for point in points:
        try:
            if abs(float(point[0]) - rung) <= FRACTION_TOL and isinstance(point[1], dict):
                return {k: float(v) for k, v in point[1].items()}
        except (TypeError, ValueError, IndexError, KeyError):
            continue
    return {}


def _pareto_ranks(points: np.ndarray, tolerance: float = 0.0) -> np.ndarray:
    """Non-dominated sorting rank of each row (0 = not dominated), all columns minimised.

    Columns after the first (measured objectives) compare with a relative ``tolerance``: within it two
    values tie, so only a difference larger than measurement noise can make a row better or worse."""
    n = len(points)
    slack = np.zeros(points.shape[1])
    slack[1:] = tolerance
    a, b = points[:, None, :], points[None, :, :]
    margin = slack * np.abs(np.where(np.isfinite(b), b, 0.0))  # an infinite loss (diverged peer) has no margin
    # dominates[i, j]: row i is no worse than row j everywhere and better somewhere.
    no_worse = (a <= b + margin).all(axis=2)
    better = (a < b - margin).any(axis=2)
    dominates: np.ndarray = np.asarray(no_worse & better)
    ranks = np.full(n, -1)
    left = np.ones(n, dtype=bool)
    rank = 0
    while left.any():
        dominated = (dominates[left][:, left]).any(axis=0)
        front = np.flatnonzero(left)[~dominated]
        if front.size == 0:  # a tolerance can make dominance cyclic: the rest share the next rank
            ranks[left] = rank
            break
        ranks[front] = rank
        left[front] = False
        rank += 1
    return ranks


def _asha_prunes(
    study: optuna.Study,
    trial_number: int,
    rung: float,
    eval_loss: float,
    eta: int,
    min_trials: int,
    same_group: Callable[[int], bool] | None = None,
    objectives: dict[str, str] | None = None,
    metrics: dict[str, float] | None = None,
    tolerance: float = DEFAULT_METRIC_TOLERANCE,
) -> bool:
    """The successive-halving rule shared by ASHA and each Hyperband bracket.

    The trial continues iff fewer than ``keep`` peers are in better non-dominated fronts than its
    own; with the loss as the only column that is "its loss <= the keep-th smallest loss".
    """
    if not math.isfinite(eval_loss):
        return True  # diverged: no amount of extra budget fixes NaN
    rows: list[tuple[float, dict[str, float]]] = [(eval_loss, dict(metrics or {}))]
    # deepcopy=False keeps a 1000-trial study in the millisecond range; we only read.
    for trial in study.get_trials(deepcopy=False):
        # The running trial's own stored point (if already written) is replaced by eval_loss.
        if trial.number == trial_number or _is_ignored(trial):
            continue
        if same_group is not None and not same_group(trial.number):
            continue
        loss = _loss_at(trial, rung)
        if loss is not None:
            rows.append((loss, _metrics_at(trial, rung) if objectives else {}))
    if len(rows) < min_trials:
        return False
    keep = max(1, len(rows) // eta)
    # Other objectives take part only where every trial in the comparison measured them.
    extra = [m for m, d in (objectives or {}).items() if m in PARTIAL_METRICS
             and all(math.isfinite(r[1].get(m, math.nan)) for r in rows)]
    signs = [1.0 if (objectives or {})[m] == "minimize" else -1.0 for m in extra]
    points = np.array([[loss, *(s * r[m] for s, m in zip(signs, extra, strict=True))] for loss, r in rows])
    ranks = _pareto_ranks(points, tolerance)
    return int((ranks < ranks[0]).sum()) >= keep


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


def _ranked_on(objectives: dict[str, str]) -> str:
    extra = [m for m in objectives if m in PARTIAL_METRICS]
    return f", Pareto-ranked on eval_loss+{'+'.join(extra)}" if extra else ""


def _fmt(fractions: list[float]) -> str:
    return ",".join(f"{f:.3g}" for f in fractions) or "-"


class NopPruner:
    """Never prunes; asks for no intermediate evaluations."""

    def rungs(self) -> list[float]:
        return []

    def rungs_for_trial(self, trial_number: int) -> list[float]:
        return []

    def should_prune(self, study: optuna.Study, trial_number: int, fraction: float, eval_loss: float,
                     metrics: dict[str, float] | None = None) -> bool:
        return False

    def describe(self) -> str:
        return "none"


class ASHAPruner:
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

    A fraction that is not a rung (within 1e-6) never prunes.
    """

    def __init__(
        self, eta: int = 3, min_fraction: float = 1 / 9, min_trials_per_rung: int | None = None,
        objectives: dict[str, str] | None = None, metric_tolerance: float = DEFAULT_METRIC_TOLERANCE,
    ) -> None:
        self.eta = _check_eta(eta)
        self.min_fraction = _check_min_fraction(min_fraction)
        self.min_trials_per_rung = _check_min_trials(min_trials_per_rung, self.eta)
        self.objectives = dict(objectives or {})
        self.metric_tolerance = _check_tolerance(metric_tolerance)
        self._rungs = geometric_rungs(self.min_fraction, self.eta)

    def rungs(self) -> list[float]:
        return list(self._rungs)

    def rungs_for_trial(self, trial_number: int) -> list[float]:
        """Same rungs for every trial (Hyperband differs)."""
        return list(self._rungs)

    def should_prune(self, study: optuna.Study, trial_number: int, fraction: float, eval_loss: float,
                     metrics: dict[str, float] | None = None) -> bool:
        rung = _match_rung(self._rungs, fraction)
        if rung is None:
            return False
        return _asha_prunes(study, trial_number, rung, eval_loss, self.eta, self.min_trials_per_rung,
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


class HyperbandPruner:
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
    ) -> None:
        self.eta = _check_eta(eta)
        self.min_fraction = _check_min_fraction(min_fraction)
        self.min_trials_per_rung = _check_min_trials(min_trials_per_rung, self.eta)
        self.objectives = dict(objectives or {})
        self.metric_tolerance = _check_tolerance(metric_tolerance)
        base = geometric_rungs(self.min_fraction, self.eta)
        self._rungs = base
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
        rung = _match_rung(self.bracket_rungs[bracket], fraction)
        if rung is None:
            return False
        return _asha_prunes(
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


_RUNG_SETTINGS = ("eta", "min_fraction", "min_trials_per_rung", "metric_tolerance")
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
    partial measurements of their other objectives as well as their loss (see the module doc)."""
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
