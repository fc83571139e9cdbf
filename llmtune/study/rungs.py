"""Rungs and the successive-halving rule that ASHA and Hyperband share, read from the study storage.

While a trial trains, the parent process appends each evaluation to the trial's user attribute
``"llmtune.curve"`` (a JSON list of ``[fraction, eval_loss]`` pairs, fraction of the trial's training
budget in (0, 1]).  The rule here reads those curves from the study storage only, so it works across
parallel workers sharing an RDB storage.

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

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from llmtune.config.pruner_settings import DEFAULT_METRIC_TOLERANCE, FRACTION_TOL
from llmtune.study.attrs import CURVE, RESUME_OF, RUNG_METRICS, STATUS
from llmtune.trial.endings import pruner_ignores

# Objectives whose value partway through training is a fair estimate of the final one (measured over
# the steps so far; train_time_s is extrapolated to the whole budget by the search loop).  Latency
# and generation memory are only measured after training, so they never take part in pruning.
PARTIAL_METRICS = frozenset({"train_throughput", "peak_memory_gb", "trainable_params", "train_time_s"})
# A rung decides only while its losses rank the final losses. On public LoRA sweeps of real models the
# loss at 1/9 of the budget ranked the final loss anywhere from -0.69 to +0.62 (Spearman, issue 21), so the
# rule measures it online: over the study's finished trials (losses at the rung vs at the end), and once
# `AGREEMENT_PAIRS` of them exist, a rung whose rank correlation is below `MIN_AGREEMENT` prunes nothing
# (its trials train on; a later rung that ranks well still decides). Before that much evidence, ASHA
# decides as usual (on llmtune's own tables the early rungs rank at +0.9).
AGREEMENT_PAIRS = 4
MIN_AGREEMENT = 0.5


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


def match_rung(rungs: list[float], fraction: float) -> float | None:
    """The rung within `FRACTION_TOL` of ``fraction``, or None when it is not one."""
    for rung in rungs:
        if abs(rung - fraction) <= FRACTION_TOL:
            return rung
    return None


def configuration(trial: FrozenTrial) -> int:
    """The number of the first trial of this configuration: a continuation of a paused trial names it
    (`RESUME_OF`, study/promotion.py), every other trial is its own. A rung's population counts each
    configuration once, and Hyperband's bracket is its first trial's."""
    first = trial.user_attrs.get(RESUME_OF)
    return int(first["first"]) if isinstance(first, dict) and "first" in first else trial.number


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


def _spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (ties ranked by their average position); 0 when either side is constant."""
    def ranks(x: list[float]) -> np.ndarray:
        values = np.asarray(x, dtype=float)
        order = np.argsort(values, kind="stable")
        r = np.empty(len(values))
        r[order] = np.arange(len(values), dtype=float)
        for v in np.unique(values):  # average the ranks of ties
            tied = values == v
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def rung_agreement(study: optuna.Study, rung: float, same_group: Callable[[int], bool] | None = None,
                   trials: list[FrozenTrial] | None = None) -> tuple[float | None, int]:
    """How well the losses at ``rung`` rank the final losses among the study's finished trials: (Spearman's
    rho, pairs), rho None below `AGREEMENT_PAIRS` pairs. A diverged curve point ranks worst on both sides."""
    at_rung, final = [], []
    for trial in trials if trials is not None else study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.state != TrialState.COMPLETE or (same_group is not None and not same_group(configuration(trial))):
            continue
        early, end = _loss_at(trial, rung), _loss_at(trial, 1.0)
        if early is not None and end is not None:
            at_rung.append(min(early, 1e30))
            final.append(min(end, 1e30))
    if len(at_rung) < AGREEMENT_PAIRS:
        return None, len(at_rung)
    return _spearman(at_rung, final), len(at_rung)


def asha_prunes(
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
    own; with the loss as the only column that is "its loss <= the keep-th smallest loss". A rung whose
    losses have been seen not to rank the final ones (`rung_agreement` below `MIN_AGREEMENT`) prunes nothing.
    ``trial_number`` is the deciding trial's configuration (`configuration`): its own trials are no peers,
    and each other configuration counts once (a paused trial and its continuation share their points).
    """
    if not math.isfinite(eval_loss):
        return True  # diverged: no amount of extra budget fixes NaN
    rows: list[tuple[float, dict[str, float]]] = [(eval_loss, dict(metrics or {}))]
    # deepcopy=False keeps a 1000-trial study in the millisecond range; we only read.
    everyone = study.get_trials(deepcopy=False)
    rho, _ = rung_agreement(study, rung, None, everyone)  # every finished curve is evidence, whatever its bracket
    if rho is not None and rho < MIN_AGREEMENT:
        return False
    seen = {trial_number}  # the running trial's own stored point (if already written) is replaced by eval_loss
    for trial in everyone:
        config = configuration(trial)
        if config in seen or _is_ignored(trial) or (same_group is not None and not same_group(config)):
            continue
        loss = _loss_at(trial, rung)
        if loss is not None:
            seen.add(config)
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
