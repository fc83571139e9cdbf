"""A diverging trial stops at once, ends `diverged`, and teaches the sampler (infeasible)."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
from conftest import tiny_recipe_dict
from optuna.trial import TrialState

from llmtune.config.recipe import recipe_from_dict
from llmtune.harness.train import DIVERGED_FACTOR, DIVERGED_MARGIN, diverged, run_trial
from llmtune.study import record
from llmtune.study.attrs import STATUS
from llmtune.trial import endings
from llmtune.trial.result import TrialResult


def test_the_divergence_rule() -> None:
    assert diverged(math.nan, 3.0) and diverged(math.inf, None)
    limit = 3.0 * DIVERGED_FACTOR + DIVERGED_MARGIN
    assert diverged(limit + 0.01, 3.0) and diverged(limit - 0.01, 3.0) is None
    assert diverged(3.2, 3.0) is None and diverged(50.0, None) is None  # no base: only non-finite counts
    row = endings.ENDINGS[endings.DIVERGED]
    assert (row.optuna_state, row.infeasible, row.counts, row.retried, row.pruner_uses) == ("COMPLETE", True, True,
                                                                                          False, False)
    assert endings.pruner_ignores("diverged") and endings.is_infeasible("diverged")


def test_a_huge_learning_rate_diverges_early_and_a_normal_one_completes(tiny_model_path, tiny_data_path,
                                                                        tmp_path: Path) -> None:
    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path, train={"budget": {"examples": 128}, "eval_points": 4},
                                               measure={"latency": False}))
    events: list[dict] = []
    res = run_trial(recipe, recipe.space.complete({"learning_rate": 5.0}), tmp_path / "hot", save_adapter=False,
                    on_event=events.append)
    assert res.status == "diverged" and "lower learning_rate" in res.reason, res.reason
    assert res.info["steps_done"] < res.info["plan"]["steps"]  # stopped before the end of its budget
    assert res.curve[-1][0] < 1.0
    # the pruner never saw a diverged eval: its verdict cannot turn the ending into `pruned` (when the training
    # loss went non-finite first, which one depends on float details of the tiny model's build, no eval diverged)
    if res.reason.startswith("eval loss"):
        assert not any(e["event"] == "eval" and e["fraction"] == res.curve[-1][0] for e in events)
    else:
        assert res.reason.startswith("training loss became")
    ok = run_trial(recipe, recipe.space.complete({"learning_rate": 2e-3}), tmp_path / "ok", save_adapter=False)
    assert ok.status == "complete" and ok.info["steps_done"] == ok.info["plan"]["steps"]

    # Told as the table says: COMPLETE with penalty values and the infeasible constraint, counted.
    study = optuna.create_study(directions=["minimize", "minimize"])
    record.tell(study, study.ask(), recipe, ok)
    record.tell(study, study.ask(), recipe, res)
    done, bad = study.trials
    assert bad.state == TrialState.COMPLETE and bad.user_attrs[STATUS] == "diverged"
    assert list(bad.constraints.values())[0] == 1.0  # "infeasible" comes first
    assert all(math.isfinite(v) for v in bad.values) and bad.values[0] > done.values[0]
    assert list(done.constraints.values())[0] == 0.0


def test_record_tells_a_diverged_trial_infeasible_with_penalty_values(tmp_path: Path) -> None:
    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path))  # eval_loss and peak_memory_gb, minimized
    study = optuna.create_study(directions=["minimize", "minimize"])
    record.tell(study, study.ask(), recipe, TrialResult(status="complete", curve=[[0.0, 3.0], [1.0, 2.0]],
                                                        metrics={"eval_loss": 2.0, "peak_memory_gb": 1.0}))
    record.tell(study, study.ask(), recipe, TrialResult(status="diverged", reason="eval loss became nan",
                                                        curve=[[0.0, 3.0], [0.5, math.nan]]))
    bad = study.trials[1]
    assert bad.state == TrialState.COMPLETE and bad.values == [3.0, 1.0]  # the untrained loss
    assert list(bad.constraints.values())[0] == 1.0 and bad.user_attrs["llmtune.metrics"] == {}


# -- known-good starting points ---------------------------------------------------------------------------

PRIOR_SPACE = {"learning_rate": {"low": 5e-5, "high": 5e-4, "log": True}, "lora_r": [4, 8, 16, 32, 64],
               "lora_target_modules": ["attention", "all-linear"], "lora_alpha": 32, "sequence_len": 128,
               "micro_batch_size": 8, "lora_dropout": 0.0}


def test_prior_configs_are_snapped_into_the_space() -> None:
    from llmtune.config.space import SearchSpace
    from llmtune.study.priors import prior_configs

    space = SearchSpace.from_dict(PRIOR_SPACE)
    configs = prior_configs(space, 5)
    # 2e-4 fits; 1e-3 is clipped to the top (5e-4), as is the third prior, a repeat: dropped
    assert configs == [{"learning_rate": 2e-4, "lora_r": 16, "lora_target_modules": "all-linear"},
                       {"learning_rate": 5e-4, "lora_r": 16, "lora_target_modules": "all-linear"}]
    assert prior_configs(space, 1) == configs[:1] and prior_configs(space, 0) == []
    stepped = SearchSpace.from_dict({"learning_rate": [1e-4, 3e-4, 2e-3], "lora_r": {"low": 4, "high": 64, "step": 4},
                                     "quantization": ["none", "4bit"]})
    # nearest options on a log scale: 2e-4 -> 3e-4, 1e-3 -> 2e-3; 5e-4 -> 3e-4 again (alpha is not searched)
    assert [c["learning_rate"] for c in prior_configs(stepped, 3)] == [3e-4, 2e-3]
    for c in prior_configs(stepped, 3):
        assert c["lora_r"] % 4 == 0 and 4 <= c["lora_r"] <= 64 and c["quantization"] == "none"
        assert "bnb_4bit_quant_type" not in c  # inactive without 4bit


def test_a_new_study_queues_the_priors_first_and_a_resumed_one_does_not(tiny_model_path, tiny_data_path,
                                                                      tmp_path: Path) -> None:
    from llmtune.study.attrs import PRIOR
    from llmtune.study.loop import Search
    from llmtune.study.samplers import distributions

    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path, search=PRIOR_SPACE, study={"n_trials": 8}))
    search = Search(recipe, log=lambda _: None)
    study = search.prepare()
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting] == [
        {"learning_rate": 2e-4, "lora_r": 16, "lora_target_modules": "all-linear"},
        {"learning_rate": 5e-4, "lora_r": 16, "lora_target_modules": "all-linear"}]
    assert all(t.user_attrs[PRIOR] for t in waiting)
    space = distributions(recipe.space)
    for t in waiting:
        for name, value in t.system_attrs["fixed_params"].items():
            assert space[name]._contains(space[name].to_internal_repr(value))
    first = study.ask()  # the next trial runs the first prior
    assert first.number == waiting[0].number
    assert first.suggest_float("learning_rate", 5e-5, 5e-4, log=True) == 2e-4

    again = Search(recipe, log=lambda _: None).prepare()  # resumed: nothing more queued
    assert len(again.get_trials(states=(TrialState.WAITING,))) == 1
    assert len(again.trials) == 2

    other = recipe_from_dict(tiny_recipe_dict(tmp_path / "b", search=PRIOR_SPACE,
                                              study={"n_trials": 8, "sampler": "random"}))
    assert Search(other, log=lambda _: None).prepare().trials == []  # only `sampler: auto` gets priors


def test_a_search_records_a_diverged_trial_as_infeasible(tiny_model_path, tiny_data_path, tmp_path: Path) -> None:
    from llmtune.api import search

    recipe = tiny_recipe_dict(tmp_path, search={"learning_rate": [5.0, 2e-3]}, measure={"latency": False},
                              train={"budget": {"examples": 128}, "eval_points": 4},
                              study={"n_trials": 2, "trial_timeout": 300})
    result = search(recipe, quiet=True)
    study = result.study
    by_lr = {t.params["learning_rate"]: t for t in study.trials}
    hot, ok = by_lr[5.0], by_lr[2e-3]
    assert hot.user_attrs[STATUS] == "diverged" and hot.state == TrialState.COMPLETE
    assert list(hot.constraints.values())[0] == 1.0 and hot.values[0] >= ok.values[0]
    assert ok.user_attrs[STATUS] == "complete" and list(ok.constraints.values())[0] == 0.0
    assert len(study.trials) == 2  # counted towards n_trials, not retried
