"""Tests for llmtune.study.pruners and llmtune.study.rungs against real multi-objective Optuna studies."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState, create_trial

from llmtune.study.attrs import CURVE, RUNG_METRICS, STATUS
from llmtune.study.pruners import (
    ASHAPruner,
    HyperbandPruner,
    NopPruner,
    Pruner,
    make_pruner,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

DIRECTIONS = ["minimize", "minimize", "maximize"]  # eval loss, peak memory, throughput
R1, R2 = 1 / 9, 1 / 3


def new_study() -> optuna.Study:
    return optuna.create_study(directions=DIRECTIONS)


def add(
    study: optuna.Study, curve: list[list[float]], state: TrialState = TrialState.COMPLETE, **attrs: object
) -> int:
    """Add a trial carrying ``curve``; returns its number."""
    # Final objective values are irrelevant to pruning (only the curve is read).
    values = [1.0, 10.0, 100.0] if state == TrialState.COMPLETE else None
    study.add_trial(create_trial(state=state, values=values, user_attrs={CURVE: curve, **attrs}))
    return study.get_trials(deepcopy=False)[-1].number


def running(study: optuna.Study, curve: list[list[float]] | None = None) -> int:
    return add(study, curve or [], state=TrialState.RUNNING)


def test_rungs_and_describe() -> None:
    asha = ASHAPruner()
    assert asha.rungs() == pytest.approx([1 / 9, 1 / 3])
    assert ASHAPruner(eta=2, min_fraction=0.125).rungs() == pytest.approx([0.125, 0.25, 0.5])
    assert ASHAPruner(eta=3, min_fraction=1 / 27).rungs() == pytest.approx([1 / 27, 1 / 9, 1 / 3])
    assert asha.describe() == "ASHA(eta=3, rungs=0.111,0.333, min_trials_per_rung=3)"
    assert NopPruner().rungs() == [] and NopPruner().describe() == "none"
    hb = HyperbandPruner()
    assert hb.rungs() == pytest.approx([1 / 27, 1 / 9, 1 / 3])
    assert "Hyperband(eta=3" in hb.describe()
    for p in (asha, hb, NopPruner()):
        assert isinstance(p, Pruner)


def test_nop_never_prunes() -> None:
    study = new_study()
    for i in range(9):
        add(study, [[R1, 1.0 + i]])
    assert not NopPruner().should_prune(study, running(study), R1, math.nan)


def test_clear_cases_with_enough_peers() -> None:
    study = new_study()
    for loss in (2.0, 2.1, 2.2, 2.3, 2.4, 2.5):
        add(study, [[R1, loss], [R2, loss - 0.5], [1.0, loss - 0.8]])
    me = running(study)
    pruner = ASHAPruner()
    assert pruner.should_prune(study, me, R1, 9.0)
    assert not pruner.should_prune(study, me, R1, 1.0)
    assert pruner.should_prune(study, me, R2, 9.0)
    assert not pruner.should_prune(study, me, R2, 1.0)


def test_exact_cutoff_nine_trials() -> None:
    # 8 peers + the trial itself = 9 at the rung; eta 3 -> the 3 best continue.
    study = new_study()
    for loss in (1.0, 2.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0):
        add(study, [[R1, loss]])
    me = running(study)
    pruner = ASHAPruner(eta=3)
    assert not pruner.should_prune(study, me, R1, 2.9)  # 3rd best of 9
    assert pruner.should_prune(study, me, R1, 4.5)  # 4th best of 9
    # Ties with the cutoff continue: 4.0 becomes 3rd after (1, 2), tied with a peer.
    assert not pruner.should_prune(study, me, R1, 4.0)
    assert pruner.should_prune(study, me, R1, 4.0 + 1e-9)


def test_keep_count_uses_floor() -> None:
    # 5 at the rung: 5 // 3 = 1 -> only the best continues.
    study = new_study()
    for loss in (1.0, 2.0, 3.0, 4.0):
        add(study, [[R1, loss]])
    me = running(study)
    pruner = ASHAPruner()
    assert not pruner.should_prune(study, me, R1, 0.5)
    assert not pruner.should_prune(study, me, R1, 1.0)
    assert pruner.should_prune(study, me, R1, 1.5)


OBJECTIVES = {"eval_loss": "minimize", "peak_memory_gb": "minimize", "train_throughput": "maximize",
              "latency_ms": "minimize"}


def add_mo(study: optuna.Study, loss: float, throughput: float | None, memory: float = 1.0) -> int:
    metrics = {"peak_memory_gb": memory}
    if throughput is not None:
        metrics["train_throughput"] = throughput
    return add(study, [[R1, loss]], **{RUNG_METRICS: [[R1, metrics]]})


def test_multi_objective_keeps_fast_trials_that_loss_alone_would_prune() -> None:
    study = new_study()
    # 8 peers: losses 1..8, throughput rising with the loss (the usual trade-off), same memory.
    for loss in range(1, 9):
        add_mo(study, float(loss), throughput=100.0 * loss)
    me = running(study)
    loss_only, pareto = ASHAPruner(), ASHAPruner(objectives=OBJECTIVES)
    assert "Pareto-ranked on eval_loss+peak_memory_gb+train_throughput" in pareto.describe()
    assert "Pareto" not in loss_only.describe()
    fast = {"train_throughput": 5000.0, "peak_memory_gb": 1.0}
    # Loss 8.5 is 9th of 9 on loss, but nobody is faster: first front, continues.
    assert loss_only.should_prune(study, me, R1, 8.5)
    assert not pareto.should_prune(study, me, R1, 8.5, fast)
    # Slow and bad: dominated by every peer (rank 8 of 9; keep 3) -> pruned either way.
    slow = {"train_throughput": 50.0, "peak_memory_gb": 1.0}
    assert pareto.should_prune(study, me, R1, 8.5, slow)
    # All 9 are mutually non-dominated (loss up, throughput up): one front, everyone continues.
    assert not pareto.should_prune(study, me, R1, 8.5, {"train_throughput": 900.0, "peak_memory_gb": 1.0})
    # Without a tolerance any edge counts; with metric_tolerance=0.1 a throughput edge under 10% (805 vs
    # 800, measurement noise) buys nothing: the worse loss decides and the trial is pruned.
    assert not pareto.should_prune(study, me, R1, 8.5, {"train_throughput": 805.0, "peak_memory_gb": 1.0})
    tolerant = ASHAPruner(objectives=OBJECTIVES, metric_tolerance=0.1)
    assert tolerant.should_prune(study, me, R1, 8.5, {"train_throughput": 805.0, "peak_memory_gb": 1.0})
    assert not tolerant.should_prune(study, me, R1, 8.5, {"train_throughput": 900.0, "peak_memory_gb": 1.0})
    with pytest.raises(ValueError, match="metric_tolerance"):
        make_pruner("asha", metric_tolerance=1.5)


def test_multi_objective_counts_better_fronts_against_keep() -> None:
    study = new_study()
    # Front 0: (1, 900), (2, 950); front 1: (3, 800), (4, 850); then dominated ones.
    for loss, thr in ((1.0, 900.0), (2.0, 950.0), (3.0, 800.0), (4.0, 850.0), (5.0, 100.0), (6.0, 90.0)):
        add_mo(study, loss, thr)
    me = running(study)
    pareto = ASHAPruner(objectives=OBJECTIVES)  # 7 at the rung -> keep 2
    # In front 1 (dominated by (1, 900) only): 2 trials are better -> pruned.
    assert pareto.should_prune(study, me, R1, 3.5, {"train_throughput": 870.0, "peak_memory_gb": 1.0})
    # In front 0 with ties: continues.
    assert not pareto.should_prune(study, me, R1, 1.5, {"train_throughput": 920.0, "peak_memory_gb": 1.0})


def test_multi_objective_falls_back_to_loss_where_metrics_are_missing() -> None:
    study = new_study()
    for loss in (1.0, 2.0, 3.0, 4.0, 5.0):
        add_mo(study, loss, throughput=None)  # no throughput recorded: that objective cannot rank
    add(study, [[R1, 6.0]])  # an older trial without any rung metrics
    me = running(study)
    pareto = ASHAPruner(objectives=OBJECTIVES)
    fast = {"train_throughput": 1e9, "peak_memory_gb": 0.1}
    # Memory is missing on the older trial and throughput on all: loss only, 7 -> keep 2.
    assert pareto.should_prune(study, me, R1, 2.5, fast)
    assert not pareto.should_prune(study, me, R1, 2.0, fast)
    # latency_ms is an objective but never measured before the end: it never takes part.
    assert "latency" not in pareto.describe()


def test_make_pruner_passes_objectives_and_hyperband_uses_them() -> None:
    hb = make_pruner("hyperband", objectives=OBJECTIVES, eta=3)
    assert hb.objectives == OBJECTIVES and "Pareto" in hb.describe()
    assert make_pruner("asha").objectives == {}


def test_too_few_trials_continue() -> None:
    study = new_study()
    add(study, [[R1, 0.1]])
    me = running(study)
    assert not ASHAPruner().should_prune(study, me, R1, 50.0)  # 2 < default min (eta=3)
    add(study, [[R1, 0.2]])
    assert ASHAPruner().should_prune(study, me, R1, 50.0)  # now 3
    assert not ASHAPruner(min_trials_per_rung=10).should_prune(study, me, R1, 50.0)


def test_own_stored_point_is_replaced_by_passed_value() -> None:
    study = new_study()
    for loss in (1.0, 2.0, 3.0, 4.0, 5.0):
        add(study, [[R1, loss]])
    # The curve point was already written (as a terrible value); the passed loss wins and the
    # trial is not counted twice: 6 at the rung -> keep 2.
    me = running(study, [[R1, 100.0]])
    pruner = ASHAPruner()
    assert not pruner.should_prune(study, me, R1, 2.0)
    assert pruner.should_prune(study, me, R1, 2.5)


def test_fraction_tolerance_and_non_rung() -> None:
    study = new_study()
    for loss in (1.0, 1.1, 1.2, 1.3, 1.4, 1.5):
        add(study, [[0.1111111111111112, loss]])  # float error from another machine
    me = running(study)
    pruner = ASHAPruner()
    assert pruner.should_prune(study, me, 1 / 9 + 1e-9, 9.0)
    assert not pruner.should_prune(study, me, 0.2, 9.0)
    assert not pruner.should_prune(study, me, 1.0, 9.0)  # the full budget is never a rung
    assert not pruner.should_prune(study, me, 0.2, math.nan)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_prunes_even_alone(bad: float) -> None:
    study = new_study()
    me = running(study)
    assert ASHAPruner().should_prune(study, me, R1, bad)


def test_diverged_peers_count_as_worst() -> None:
    study = new_study()
    add(study, [[R1, math.nan]])
    add(study, [[R1, math.inf]])
    me = running(study)
    assert not ASHAPruner().should_prune(study, me, R1, 5.0)


def test_failed_and_dishonest_trials_are_ignored() -> None:
    study = new_study()
    add(study, [[R1, 5.0]])
    add(study, [[R1, 6.0]])
    # Excellent looking losses that must not count: a FAIL and statuses that stopped early.
    add(study, [[R1, 0.1]], state=TrialState.FAIL)
    for status in ("oom", "over_budget", "crashed", "timeout"):
        add(study, [[R1, 0.1]], state=TrialState.PRUNED, **{STATUS: status})
    me = running(study)
    # Only 5.0, 6.0 and itself remain: 3 at the rung, keep 1 -> 4.0 is best and continues.
    assert not ASHAPruner().should_prune(study, me, R1, 4.0)
    assert ASHAPruner().should_prune(study, me, R1, 5.5)
    # Other statuses (and pruned / running trials) do count.
    add(study, [[R1, 0.1]], state=TrialState.PRUNED, **{STATUS: "pruned"})
    running(study, [[R1, 0.2]])
    assert ASHAPruner().should_prune(study, me, R1, 4.0)


def test_trials_without_point_at_rung_do_not_count() -> None:
    study = new_study()
    add(study, [[R2, 0.1]])
    add(study, [])
    running(study)
    add(study, [[R1, "garbage"], [R1]])  # malformed points are skipped, not fatal
    me = running(study)
    assert not ASHAPruner().should_prune(study, me, R1, 50.0)


def test_hyperband_brackets_are_deterministic_and_weighted() -> None:
    a, b = HyperbandPruner(), HyperbandPruner()
    assert a.bracket_rungs[0] == pytest.approx([1 / 27, 1 / 9, 1 / 3])
    assert a.bracket_rungs[-1] == []
    assert a.weights == [27, 12, 6, 4]
    assignment = [a.bracket_of(n) for n in range(49 * 3)]
    assert assignment == [b.bracket_of(n) for n in range(49 * 3)]
    assert Counter(assignment[:49]) == {0: 27, 1: 12, 2: 6, 3: 4}
    assert set(assignment[:8]) == {0, 1, 2, 3}  # interleaved, not blocks
    assert a.rungs_for_trial(0) == pytest.approx([1 / 27, 1 / 9, 1 / 3])
    no_rungs = next(n for n in range(49) if a.bracket_of(n) == 3)
    assert a.rungs_for_trial(no_rungs) == []


def test_hyperband_compares_within_bracket_only() -> None:
    pruner = HyperbandPruner(eta=3, min_fraction=1 / 9)  # brackets: [1/9, 1/3], [1/3], []
    assert pruner.weights == [9, 5, 3]
    study = new_study()
    for _ in range(34):
        number = len(study.get_trials(deepcopy=False))  # the number add() will get
        # Bracket 1 peers are excellent at 1/3, bracket 0 peers poor: mixing them would flip results.
        loss = 0.5 if pruner.bracket_of(number) == 1 else 3.0
        add(study, [[R1, loss + 1.0], [R2, loss]])
    in_b0 = next(n for n in range(34, 100) if pruner.bracket_of(n) == 0)
    in_b1 = next(n for n in range(34, 100) if pruner.bracket_of(n) == 1)
    in_b2 = next(n for n in range(34, 100) if pruner.bracket_of(n) == 2)
    assert not pruner.should_prune(study, in_b0, R2, 2.0)  # best among bracket 0
    assert pruner.should_prune(study, in_b1, R2, 2.0)  # worse than all of bracket 1
    assert pruner.should_prune(study, in_b0, R1, 9.0)
    assert not pruner.should_prune(study, in_b1, R1, 9.0)  # 1/9 is not a rung of bracket 1
    assert not pruner.should_prune(study, in_b1, R1, math.nan)
    assert not pruner.should_prune(study, in_b2, R2, 9.0)  # last bracket never prunes


def test_two_workers_share_sqlite_storage(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="s", storage=url, directions=DIRECTIONS)
    # Two handles with their own RDBStorage (and Optuna's cache on top), as two workers have.
    worker1 = optuna.load_study(study_name="s", storage=optuna.storages.RDBStorage(url))
    worker2 = optuna.load_study(study_name="s", storage=optuna.storages.RDBStorage(url))
    pruner = make_pruner("asha")
    for loss in (1.0, 1.1):
        worker1.add_trial(create_trial(values=[loss, 1.0, 1.0], user_attrs={CURVE: [[R1, loss]]}))
    mine = worker2.ask()
    # 3 at the rung, keep 1: only a new best continues.  (This also warms worker 2's cache.)
    assert pruner.should_prune(worker2, mine.number, R1, 5.0)
    assert not pruner.should_prune(worker2, mine.number, R1, 0.9)

    # Worker 1 runs a trial and stores its first curve point through its own handle.
    theirs = worker1.ask()
    worker1._storage.set_trial_user_attr(theirs._trial_id, CURVE, [[R1, 0.8]])
    assert pruner.should_prune(worker2, mine.number, R1, 0.9)  # 0.8 now beats it

    # A later rewrite of the running trial's curve is seen too (not a stale cached copy).
    worker1._storage.set_trial_user_attr(theirs._trial_id, CURVE, [[R1, 2.0], [R2, 1.5]])
    assert not pruner.should_prune(worker2, mine.number, R1, 0.9)


def test_make_pruner() -> None:
    assert isinstance(make_pruner("none"), NopPruner)
    assert isinstance(make_pruner(" ASHA "), ASHAPruner)
    p = make_pruner("asha", eta="2", min_fraction="1/8", min_trials_per_rung=4)
    assert isinstance(p, ASHAPruner)
    assert (p.eta, p.min_trials_per_rung) == (2, 4)
    assert p.rungs() == pytest.approx([0.125, 0.25, 0.5])
    hb = make_pruner("hyperband", eta=3.0, min_fraction=1 / 27)
    assert isinstance(hb, HyperbandPruner) and hb.eta == 3


@pytest.mark.parametrize(
    ("name", "settings", "needles"),
    [
        ("median", {}, ["'median'", "'none', 'asha', 'hyperband'"]),
        (
            "asha",
            {"reduction_factor": 3},
            ["'reduction_factor'", "3", "eta, min_fraction, min_trials_per_rung"],
        ),
        ("none", {"eta": 3}, ["'eta'", "no settings"]),
        ("asha", {"eta": 1}, ["'eta'=1", "integer >= 2"]),
        ("asha", {"eta": 2.5}, ["'eta'=2.5", "integer >= 2"]),
        ("asha", {"min_fraction": 1}, ["'min_fraction'=1", "(0, 1)", "'none'"]),
        ("hyperband", {"min_fraction": 0}, ["'hyperband'", "'min_fraction'=0"]),
        ("asha", {"min_fraction": "a ninth"}, ["'min_fraction'='a ninth'"]),
        ("asha", {"min_trials_per_rung": 0}, ["'min_trials_per_rung'=0", "integer >= 1"]),
    ],
)
def test_make_pruner_errors(name: str, settings: dict[str, object], needles: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        make_pruner(name, **settings)
    for needle in needles:
        assert needle in str(info.value)


def test_a_diverged_peer_ranks_last_with_and_without_a_tolerance() -> None:
    from llmtune.study.rungs import _pareto_ranks

    points = np.array([[1.0, -100.0], [np.inf, -100.0], [2.0, -100.0]])  # loss, -throughput
    for tolerance in (0.0, 0.1):
        assert list(_pareto_ranks(points, tolerance)) == [0, 2, 1]


def _finished(study: optuna.Study, early: float, final: float) -> None:
    add(study, [[R1, early], [R2, (early + final) / 2], [1.0, final]], **{STATUS: "complete"})


@pytest.mark.parametrize("agree", [True, False])
def test_a_rung_whose_losses_do_not_rank_the_final_ones_prunes_nothing(agree: bool) -> None:
    """Finished trials whose early losses rank their final ones backwards (slow starters end best): the
    early rung stops deciding; where they agree, ASHA prunes the laggard as before."""
    from llmtune.study.rungs import rung_agreement

    study = new_study()
    for i in range(5):
        early = 1.0 + i
        _finished(study, early, 0.5 + i if agree else 5.0 - i)
    rho, pairs = rung_agreement(study, R1)
    assert pairs == 5 and rho == pytest.approx(1.0 if agree else -1.0)
    laggard = running(study)
    assert ASHAPruner().should_prune(study, laggard, R1, 10.0) is agree


def test_too_few_finished_trials_leave_asha_as_it_was() -> None:
    from llmtune.study.rungs import AGREEMENT_PAIRS, rung_agreement

    study = new_study()
    for i in range(AGREEMENT_PAIRS - 1):
        _finished(study, 1.0 + i, 5.0 - i)  # backwards, but too few to say so
    assert rung_agreement(study, R1) == (None, AGREEMENT_PAIRS - 1)
    assert ASHAPruner().should_prune(study, running(study), R1, 10.0)
