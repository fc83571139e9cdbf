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

from llmtune.config.space import SearchSpace  # noqa: E402
from llmtune.study.attrs import CURVE, VARIANT_OF  # noqa: E402
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
    paused_at: dict[tuple, float] = {}
    for key, cost, rung, resumed in zip(run["key"], run["cost"], run["rung"], run["resumed"], strict=True):
        row = table.rows[key]
        spent = row[f"train_s@{round(paused_at.pop(key), 6):g}"] if resumed else 0.0  # a continuation pays the rest
        assert cost == pytest.approx((row["train_time_s"] if rung is None else row[f"train_s@{round(rung, 6):g}"]) - spent)
        if rung is not None:
            paused_at[key] = rung
    assert run["seconds"][-1] == pytest.approx(sum(run["cost"]))


def test_a_front_member_stopped_at_its_rung_is_promoted_later_and_found():
    """A table whose early losses rank the final ones backwards: the best configuration looks worst at the rung
    and is stopped. Paused, it is promoted once the finished trials show the rung does not rank (the rung gate),
    continues from the rung (paying only the rest) and completes: the front is found. Killed, it never is."""
    grid = {"learning_rate": [1e-4, 3e-4, 1e-3, 3e-3], "lora_r": [4, 8, 16]}
    table = R.synthetic_table(grid, [("eval_loss", "minimize")], seed=0, rungs=(1 / 3,), crossing=True)
    best = min(table.rows, key=lambda k: table.rows[k]["eval_loss"])
    pruner = "asha:min_fraction=0.333333:eta=2"
    run = R.replay(table, "random", pruner, seed=1, n_trials=12)
    turns = [(pruned, resumed) for key, pruned, resumed in zip(run["key"], run["pruned"], run["resumed"], strict=True)
             if key == best]
    assert turns == [(True, False), (False, True)]  # stopped at the rung, then continued to the end
    assert run["hv_ratio"][-1] == pytest.approx(1.0)
    i = run["resumed"].index(True)
    assert run["cost"][i] == pytest.approx(table.rows[run["key"][i]]["train_time_s"] * (1 - 1 / 3))
    killed = R.replay(table, "random", f"{pruner}:pause=false", seed=1, n_trials=12)
    assert not any(killed["resumed"]) and killed["hv_ratio"][-1] < 0.9


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


# ------------------------------------------------------------------ the documented table format (README)

LEARN = {"learning_rate": [1e-3, 1e-2], "lora_r": [4, 16]}
EXEC = {"sample_packing": [False, True], "gradient_checkpointing": [False, True]}


def _generic_rows(steps: int = 40) -> list[dict]:
    """A table recorded elsewhere: curves at optimizer steps, every (learning, execution) pair, probes."""
    rows = []
    for lr in LEARN["learning_rate"]:
        for r in LEARN["lora_r"]:
            final = 3.0 + (0.5 if lr == 1e-3 else 0.0) - (0.2 if r == 16 else 0.0)
            for packing in EXEC["sample_packing"]:
                for ckpt in EXEC["gradient_checkpointing"]:
                    seconds = (10.0 if packing else 20.0) * (2.0 if ckpt else 1.0) * (1.5 if r == 16 else 1.0)
                    row = {"learning_rate": lr, "lora_r": r, "sample_packing": packing, "gradient_checkpointing": ckpt,
                           "status": "complete", "eval_loss": final, "train_time_s": seconds, "steps": steps,
                           "train_throughput": 1000.0 / seconds, "peak_memory_gb": 2.0 if ckpt else 3.0,
                           "probe_s": 1.0, "probe_train_time_s": seconds * 1.1,
                           "probe_train_throughput": 1000.0 / seconds / 1.1, "probe_peak_memory_gb": 2.0 if ckpt else 3.0}
                    for step in (4, 20, 40):  # no point at the rungs 1/9, 1/3: interpolated
                        row[f"loss@step:{step}"] = final + 2.0 * (1 - step / steps)
                        row[f"train_s@step:{step}"] = seconds * step / steps
                    rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_generic_table_without_meta_infers_settings_and_converts_steps(tmp_path):
    _write_csv(tmp_path / "elsewhere.csv", _generic_rows())
    table = R.load_table(tmp_path / "elsewhere.csv", OBJECTIVES)
    assert table.grid == {**LEARN, **EXEC} and table.execution == []  # probe_*, *_s, steps, loss@...: not settings
    row = table.rows[(1e-2, 16, True, False)]
    assert row["loss@0.1"] == pytest.approx(2.8 + 1.8) and row["train_s@1"] == pytest.approx(15.0)
    # Rung 1/9 lies between steps 4 (0.1) and 20 (0.5): linear interpolation of loss and seconds.
    assert R.at_rung(row, "loss", 1 / 9) == pytest.approx(2.8 + 2.0 * (1 - 1 / 9))
    assert table.charge(row, 1 / 9) == pytest.approx(15.0 / 9)
    run = R.replay(table, "random", "asha", seed=0, n_trials=16)
    assert run["seconds"][-1] == pytest.approx(sum(run["cost"]))


def test_generic_table_with_meta_and_json_rows(tmp_path):
    rows = _generic_rows(steps=80)
    for r in rows:
        r["batch_note"] = "b8"  # a text column the meta does not name: not a setting
    meta = {"settings": [*LEARN, *EXEC], "execution": list(EXEC), "rungs": [1 / 9, 1 / 3]}
    (tmp_path / "t.json").write_text(json.dumps(rows))
    (tmp_path / "t.meta.json").write_text(json.dumps(meta))
    table = R.load_table(tmp_path / "t.json", OBJECTIVES)
    assert list(table.grid) == meta["settings"] and table.execution == list(EXEC) and table.learning == list(LEARN)
    assert table.rows[(1e-3, 4, False, False)]["loss@0.25"] == pytest.approx(3.5 + 1.5)  # step 20 of 80
    with pytest.raises(ValueError, match="no column"):
        R.load_table(tmp_path / "t.json", [("nonexistent", "minimize")])


def test_probe_policy_charges_probes_and_the_fastest_variant_and_reveals_every_pair():
    table = R.synthetic_table({**LEARN, **EXEC}, OBJECTIVES, seed=4, execution=tuple(EXEC))
    study = optuna.create_study(directions=["minimize", "maximize"])
    options = [{"sample_packing": p, "gradient_checkpointing": c} for p in (False, True) for c in (False, True)]
    study.enqueue_trial({"learning_rate": 1e-2, "lora_r": 16})
    trial = study.ask()
    values = R.learning_space(table, SearchSpace.from_dict(table.grid)).suggest(trial)
    cost, rung, key, found, probe_s = R.probe_trial(study, trial, table, values, options, make_pruner("none"))
    rows = [table.rows[table.key({**values, **o})] for o in options]
    fastest = min(rows, key=lambda r: r["probe_train_time_s"])
    assert probe_s == pytest.approx(sum(r["probe_s"] for r in rows))
    assert cost == pytest.approx(probe_s + fastest["train_time_s"]) and rung is None
    assert table.rows[key] is fastest and len(found) == 4
    trials = study.get_trials()
    assert len(trials) == 4 and [t.user_attrs.get(VARIANT_OF) for t in trials] == [None, 0, 0, 0]
    assert trials[0].params["sample_packing"] == dict(zip(table.grid, key, strict=True))["sample_packing"]
    # A variant that did not train is told its probe's speed scaled by the trained one's measured / probed.
    other = trials[1]
    row = table.rows[table.key(other.params)]
    scale = fastest["train_throughput"] / fastest["probe_train_throughput"]
    assert other.values == pytest.approx([fastest["eval_loss"], row["probe_train_throughput"] * scale])


def test_probe_policy_replay_on_a_synthetic_table():
    table = R.synthetic_table({**LEARN, "warmup_ratio": [0.0, 0.1], **EXEC}, OBJECTIVES, seed=5, execution=tuple(EXEC))
    run = R.replay(table, "llmtune-probes", "none", seed=0, n_trials=8, planned=4)
    # 8 learning configurations, each revealing its 4 variants: the whole grid, so the whole front.
    assert len(set(run["key"])) == 8 and run["hv_ratio"][-1] == pytest.approx(1.0)
    assert all(p > 0 for p in run["probe_s"]) and run["seconds"][-1] == pytest.approx(sum(run["cost"]))
    pruned = R.replay(table, "llmtune-probes", "asha", seed=0, n_trials=8, planned=4)
    assert any(pruned["pruned"]) and pruned["seconds"][-1] < run["seconds"][-1]
    for key, cost, at, probe_s in zip(pruned["key"], pruned["cost"], pruned["rung"], pruned["probe_s"], strict=True):
        assert cost == pytest.approx(probe_s + table.charge(table.rows[key], at))


def test_cli_replays_a_generic_table(tmp_path):
    _write_csv(tmp_path / "g.csv", _generic_rows())
    (tmp_path / "g.json").write_text(json.dumps({"execution": list(EXEC)}))
    assert R.main(["--table", str(tmp_path / "g.csv"), "--seeds", "2", "--trials", "6", "--budgets", "2,4",
                   "--methods", "llmtune-probes+asha,llmtune-probes+none,random+none,tpe+none",
                   "--out", str(tmp_path), "--tag", "r"]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["meta"]["ours"] == "llmtune-probes+asha"
    assert "llmtune-probes: asha / none" in result["ratios"] and (tmp_path / "r_hv.png").exists()


def test_priors_regret_reads_the_priors_starts_off_a_recorded_table() -> None:
    import priors_regret

    table = Path(__file__).resolve().parents[1] / "benchmarks/results/tabular_cpu-long.csv"
    result = priors_regret.one_table(str(table))
    assert result["facts"]["hidden_size"] == 128  # the tiny model, read from the table's recipe
    assert len(result["new"]) == 2 and all(s["eval_loss"] is not None for s in result["new"])
    assert result["new_regret"] == pytest.approx(min(s["eval_loss"] for s in result["new"]) / result["best"] - 1)
    assert 0 <= result["new_regret"] and 0 < result["random_pair_regret"]


def test_the_baselines_never_repeat_a_configuration() -> None:
    table = R.synthetic_table({"learning_rate": [1e-4, 1e-3], "lora_r": [4, 8]}, [("eval_loss", "minimize")])
    run = R.replay(table, "random", "none", seed=0, n_trials=4)
    assert len(set(run["key"])) == 4  # the whole 4-point grid, each point once


def test_a_rung_before_the_first_curve_point_never_decides() -> None:
    """A table whose curves start after the pruner's first rung replays: that rung is never decided."""
    table = R.synthetic_table({"learning_rate": [1e-4, 1e-3, 3e-3], "lora_r": [4, 8, 16]}, [("eval_loss", "minimize")],
                              rungs=(1 / 9, 1 / 3))
    run = R.replay(table, "random", "asha:min_fraction=0.037037", seed=0, n_trials=9)  # rungs 1/27, 1/9, 1/3
    assert len(run["key"]) == 9 and all(r != pytest.approx(1 / 27) for r in run["rung"] if r is not None)


def test_a_table_of_another_tools_sweep_replays(tmp_path) -> None:
    """A setting llmtune does not train with (a PEFT method) is one more choice; the loss objective may be named
    otherwise (no eval_loss column); a diverged run costs the seconds it ran."""
    rows = []
    for i, (method, lr, r) in enumerate([(m, lr, r) for m in ("lora", "dora") for lr in (1e-4, 1e-3) for r in (4, 8)]):
        rows.append({"peft_method": method, "learning_rate": lr, "lora_r": r, "status": "complete",
                     "val_loss": 3.0 + i / 10, "train_time_s": 10.0 + i, "loss@0.5": 3.5 + i / 10, "train_s@0.5": 5.0})
    rows[0].update(status="diverged", val_loss="")
    with open(tmp_path / "other.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = R.load_table(tmp_path / "other.csv", [("val_loss", "minimize"), ("train_time_s", "minimize")])
    assert table.grid["peft_method"] == ["dora", "lora"]
    for sampler in ("random", "llmtune", "tpe"):
        run = R.replay(table, sampler, "asha:min_fraction=0.5:eta=2", seed=0, n_trials=8)
        assert set(run["key"]) == set(table.rows) and run["hv_ratio"][-1] == pytest.approx(1.0)
        diverged = run["key"].index(("lora", 1e-4, 4))
        assert run["cost"][diverged] == 10.0 and run["rung"][diverged] is None


def test_repeated_runs_are_averaged_and_an_early_stopped_run_ends_pruned_where_its_sweep_stopped(tmp_path) -> None:
    """Two seeds of one configuration replay as their mean; a run its own sweep stopped at half its budget
    costs what it spent and ends pruned there, never a member of the front."""
    rows = [
        {"learning_rate": 1e-4, "status": "complete", "eval_loss": 3.0, "train_time_s": 10.0, "loss@0.5": 3.5},
        {"learning_rate": 1e-4, "status": "complete", "eval_loss": 2.0, "train_time_s": 12.0, "loss@0.5": 2.5},
        {"learning_rate": 1e-4, "status": "diverged", "eval_loss": "", "train_time_s": 4.0, "loss@0.5": ""},
        {"learning_rate": 1e-3, "status": "stopped", "eval_loss": "", "train_time_s": 6.0, "loss@0.5": 2.2},
        {"learning_rate": 1e-2, "status": "complete", "eval_loss": 2.8, "train_time_s": 8.0, "loss@0.5": 3.0},
    ]
    with open(tmp_path / "seeds.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = R.load_table(tmp_path / "seeds.csv", [("eval_loss", "minimize"), ("train_time_s", "minimize")])
    mean = table.rows[(1e-4,)]
    assert mean["runs"] == 2 and mean["eval_loss"] == pytest.approx(2.5) and mean["train_time_s"] == pytest.approx(11.0)
    assert mean["loss@0.5"] == pytest.approx(3.0) and table.rows[(1e-3,)]["status"] == "stopped"
    run = R.replay(table, "grid", "none", seed=0, n_trials=3)
    stopped = run["key"].index((1e-3,))
    assert run["cost"][stopped] == 6.0 and run["rung"][stopped] == pytest.approx(0.5)
    assert run["hv_ratio"][-1] == pytest.approx(1.0)  # the front: the two complete configurations
