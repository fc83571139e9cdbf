"""The tabular replayer (benchmarks/replay.py): HV accounting and the cost of pruned trials."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import optuna
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import replay as R  # noqa: E402

from llmtune.study.attrs import CURVE  # noqa: E402
from llmtune.study.pruners import make_pruner  # noqa: E402

GRID = {"learning_rate": [1e-3, 3e-3, 1e-2], "lora_r": [4, 16], "sample_packing": [False, True]}
OBJECTIVES = [("eval_loss", "minimize"), ("train_throughput", "maximize")]


@pytest.fixture(autouse=True)
def quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("sampler", ["grid", "llmtune"])
def test_seeing_every_config_gives_the_true_front(sampler):
    table = R.synthetic_table(GRID, OBJECTIVES, seed=3)
    # 12 trials over a 12-point grid: llmtune's auto choice is the grid sampler, which visits each once.
    run = R.replay(table, sampler, "none", seed=0, n_trials=12)
    assert len(set(run["key"])) == 12
    assert run["hv_ratio"][-1] == pytest.approx(1.0, abs=1e-12)
    assert all(a <= b + 1e-12 for a, b in zip(run["hv_ratio"], run["hv_ratio"][1:], strict=False))  # never shrinks
    assert run["seconds"][-1] == pytest.approx(sum(r["train_time_s"] for r in table.rows.values()))
    # A partial front is strictly below the true one on this table.
    assert run["hv_ratio"][0] < 1.0


def test_pruned_trial_is_charged_its_seconds_up_to_the_rung():
    table = R.synthetic_table(GRID, OBJECTIVES, seed=1)
    rows = list(table.rows.values())
    # Each new good trial is the best so far at the rung, so ASHA (top 1/3 continue) keeps all three.
    good = sorted(rows, key=lambda r: r["loss@0.111111"])[:3][::-1]
    bad = dict(max(rows, key=lambda r: r["loss@0.111111"]))
    bad.update({"train_s@0.111111": 1.25, "train_time_s": 99.0})  # distinct numbers: no accidental match
    study = optuna.create_study(directions=["minimize", "maximize"])
    pruner = make_pruner("asha")  # rungs 1/9, 1/3; decides from 3 trials at a rung
    for row in good:
        cost, rung = R.replay_trial(study, study.ask(), row, pruner, OBJECTIVES)
        assert (cost, rung) == (row["train_time_s"], None)
    trial = study.ask()
    cost, rung = R.replay_trial(study, trial, bad, pruner, OBJECTIVES)
    assert rung == pytest.approx(1 / 9) and cost == 1.25
    frozen = study.trials[-1]
    assert frozen.state == optuna.trial.TrialState.PRUNED
    assert frozen.user_attrs[CURVE] == [[pytest.approx(1 / 9), bad["loss@0.111111"]]]


def test_replay_costs_add_up_with_pruning():
    table = R.synthetic_table(GRID, OBJECTIVES, seed=2)
    run = R.replay(table, "random", "asha", seed=0, n_trials=30)
    assert any(run["pruned"]) and not all(run["pruned"])
    for key, cost, rung in zip(run["key"], run["cost"], run["rung"], strict=True):
        row = table.rows[key]
        assert cost == (row["train_time_s"] if rung is None else row[f"train_s@{round(rung, 6):g}"])
    assert run["seconds"][-1] == pytest.approx(sum(run["cost"]))


def test_load_table_reads_the_recorder_format(tmp_path):
    meta = {"grid": GRID, "rungs": [1 / 27, 1 / 9, 1 / 3]}
    (tmp_path / "tabular_x.json").write_text(json.dumps(meta))
    with open(tmp_path / "tabular_x.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["config_id", *GRID, "status", "eval_loss", "train_throughput",
                                          "train_time_s", "loss@0.111111", "train_s@0.111111"])
        w.writeheader()
        w.writerow({"config_id": 0, "learning_rate": 0.003, "lora_r": 16, "sample_packing": True, "status": "complete",
                    "eval_loss": 4.0, "train_throughput": 900.0, "train_time_s": 3.0, "loss@0.111111": 5.0,
                    "train_s@0.111111": 0.4})
        w.writerow({"config_id": 1, "learning_rate": 0.01, "lora_r": 4, "sample_packing": False, "status": "complete",
                    "eval_loss": 3.5, "train_throughput": 500.0, "train_time_s": 4.0, "loss@0.111111": 4.5,
                    "train_s@0.111111": 0.5})
    table = R.load_table(tmp_path / "tabular_x.csv", OBJECTIVES)
    row = table.rows[(0.003, 16, True)]
    assert row["eval_loss"] == 4.0 and R.at_rung(row, "train_s", 1 / 9) == 0.4
    # Two points, neither dominates: scaled to the corners (0, 1) and (1, 0) of the unit box.
    assert table.scaled(row).tolist() == [1.0, 0.0]
    assert table.true_hv == pytest.approx(1.1**2 - 1.0)


def test_quantiles_keep_never_as_never():
    assert R.quantiles([1.0, 2.0, 3.0, float("inf")])[0] == pytest.approx(1.75)
    assert R.quantiles([1.0, float("inf"), float("inf")])[1] == float("inf")


def test_default_sampler_never_repeats_a_configuration_of_a_discrete_space():
    from llmtune.config.space import SearchSpace
    from llmtune.study.samplers import UniqueSampler, default_sampler

    space = SearchSpace.from_dict(GRID)
    sampler, why = default_sampler(space, n_objectives=2, n_trials=12, seed=0)
    assert isinstance(sampler, UniqueSampler) and "never repeating" in why
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=sampler)
    seen = []
    for _ in range(12):  # 12 = the whole grid: TPE alone repeats itself well before that
        trial = study.ask()
        values = space.suggest(trial)
        seen.append(tuple(values[n] for n in GRID))
        study.tell(trial, [values["learning_rate"] * values["lora_r"], float(values["sample_packing"])])
    assert len(set(seen)) == 12
    # With a float range repeats cannot happen: plain TPE.
    mixed = SearchSpace.from_dict({**GRID, "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}})
    assert isinstance(default_sampler(mixed, 2, 40, 0)[0], optuna.samplers.TPESampler)
