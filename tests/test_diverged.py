"""A diverging trial stops at once, ends `diverged`, and teaches the sampler (infeasible)."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
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
    from llmtune.study.priors import ModelFacts, prior_configs

    space = SearchSpace.from_dict(PRIOR_SPACE)
    seven_b = ModelFacts(hidden_size=4096, parameters=7e9, steps=2000)
    configs = prior_configs(space, 5, seven_b)
    # lr x alpha 3.2e-3 at width 4096 (QLoRA's 2e-4 x 16), alpha 32: 1e-4, then 3x, then a third (clipped to 5e-5)
    assert configs == [{"learning_rate": 1e-4, "lora_r": 32, "lora_target_modules": "all-linear"},
                       {"learning_rate": 3e-4, "lora_r": 32, "lora_target_modules": "all-linear"},
                       {"learning_rate": 5e-5, "lora_r": 32, "lora_target_modules": "all-linear"}]
    assert prior_configs(space, 1, seven_b) == configs[:1] and prior_configs(space, 0, seven_b) == []
    stepped = SearchSpace.from_dict({"learning_rate": [1e-4, 3e-4, 2e-3], "lora_r": {"low": 4, "high": 64, "step": 4},
                                     "quantization": ["none", "4bit"]})
    # alpha = 2 x r 32 = 64: 5e-5 snaps to 1e-4; the second (1.5e-5) would snap there too: the option above
    assert [c["learning_rate"] for c in prior_configs(stepped, 2, seven_b)] == [1e-4, 3e-4]
    for c in prior_configs(stepped, 3, seven_b):
        assert c["lora_r"] % 4 == 0 and 4 <= c["lora_r"] <= 64 and c["quantization"] == "none"
        assert "bnb_4bit_quant_type" not in c  # inactive without 4bit


def test_priors_follow_the_model_width_size_and_budget() -> None:
    from llmtune.config.space import SearchSpace
    from llmtune.study.priors import ModelFacts, prior_configs

    space = SearchSpace.from_dict({"learning_rate": {"low": 1e-6, "high": 1e-1, "log": True}, "lora_r": [4, 8, 16, 32, 64, 128],
                                   "lora_alpha": 32})
    first = {name: prior_configs(space, 1, facts)[0] for name, facts in {
        "135M": ModelFacts(576, 1.35e8, steps=2000), "8B": ModelFacts(4096, 8e9, steps=2000),
        "70B": ModelFacts(8192, 7e10, steps=2000), "135M short": ModelFacts(576, 1.35e8, steps=150)}.items()}
    assert [first[n]["lora_r"] for n in ("135M", "8B", "70B")] == [16, 32, 64]  # the rank grows with the model
    assert first["135M"]["learning_rate"] > first["8B"]["learning_rate"] > first["70B"]["learning_rate"]
    assert first["8B"]["learning_rate"] == pytest.approx(1e-4) and first["70B"]["learning_rate"] == pytest.approx(5e-5)
    assert first["135M short"]["learning_rate"] == pytest.approx(1.5 * first["135M"]["learning_rate"], rel=0.05)
    rs = SearchSpace.from_dict({"learning_rate": {"low": 1e-6, "high": 1e-1, "log": True}, "lora_r": 64,
                                "lora_alpha": 32, "use_rslora": True})
    # rsLoRA scales by alpha / sqrt(r): the same update needs sqrt(64) = 8x less learning rate
    assert prior_configs(rs, 1, ModelFacts(4096, 8e9, steps=2000))[0]["learning_rate"] == pytest.approx(1.25e-5, rel=0.05)


def test_model_facts_from_real_configs() -> None:
    from transformers import LlamaConfig, Qwen2Config

    from llmtune.study.priors import facts_from_config

    llama = facts_from_config(LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                          vocab_size=128256))
    assert llama.hidden_size == 4096 and 7e9 < llama.parameters < 9e9  # Llama-3-8B
    qwen = facts_from_config(Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                         vocab_size=151936))
    assert 4e8 < qwen.parameters < 6e8  # Qwen2.5-0.5B


def test_a_new_study_queues_the_priors_first_and_a_resumed_one_does_not(tiny_model_path, tiny_data_path,
                                                                      tmp_path: Path) -> None:
    from llmtune.study.attrs import PRIOR
    from llmtune.study.loop import Search
    from llmtune.study.samplers import distributions

    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path, search=PRIOR_SPACE, study={"n_trials": 8}))
    search = Search(recipe, log=lambda _: None)
    study = search.prepare()
    waiting = study.get_trials(states=(TrialState.WAITING,))
    # the tiny model (width 128, 6 steps) wants more than the space's top: 5e-4, then the third start's 1.7e-4
    assert [t.system_attrs["fixed_params"] for t in waiting] == [
        {"learning_rate": 5e-4, "lora_r": 16, "lora_target_modules": "all-linear"},
        # peak_memory_gb is an objective: the cheap end of the front (attention only), second
        {"learning_rate": 5e-4, "lora_r": 16, "lora_target_modules": "attention"},
        {"learning_rate": 1.7e-4, "lora_r": 16, "lora_target_modules": "all-linear"}]
    assert all(t.user_attrs[PRIOR] for t in waiting)
    space = distributions(recipe.space)
    for t in waiting:
        for name, value in t.system_attrs["fixed_params"].items():
            assert space[name]._contains(space[name].to_internal_repr(value))
    first = study.ask()  # the next trial runs the first prior
    assert first.number == waiting[0].number
    assert first.suggest_float("learning_rate", 5e-5, 5e-4, log=True) == 5e-4

    again = Search(recipe, log=lambda _: None).prepare()  # resumed: nothing more queued
    assert len(again.get_trials(states=(TrialState.WAITING,))) == 2
    assert len(again.trials) == 3

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


def test_a_cost_objective_queues_the_cheap_end_of_the_front() -> None:
    from llmtune.config.space import SearchSpace
    from llmtune.study.priors import ModelFacts, cheap_config, prior_configs

    space = SearchSpace.from_dict({"learning_rate": {"low": 1e-6, "high": 1e-1, "log": True}, "lora_r": [4, 16, 64],
                                   "lora_target_modules": ["attention", "all-linear"]})
    facts = ModelFacts(576, 1.35e8, steps=2000)
    assert cheap_config(space, facts) == {**prior_configs(space, 1, facts)[0], "lora_target_modules": "attention"}
    cheap = cheap_config(space, facts, smallest_rank=True)  # the adapter's size is an objective
    assert cheap is not None and cheap["lora_r"] == 4 and cheap["lora_target_modules"] == "attention"
    first = prior_configs(space, 1, facts)[0]
    # alpha = 2 x r: a 4x smaller rank is a 4x smaller alpha, so the rule's learning rate is 4x larger
    assert cheap["learning_rate"] == pytest.approx(4 * first["learning_rate"], rel=0.05)
    assert cheap_config(SearchSpace.from_dict({"learning_rate": [1e-4, 1e-3]}), facts) is None


def test_the_starting_points_span_the_front_before_they_hedge_the_learning_rate() -> None:
    """With a cost objective the first two starts are the two ends of the front (the loss end, then the cheap
    end), the learning-rate hedge third; a loss-only search or a small one gets the two learning-rate starts."""
    from llmtune.config.space import SearchSpace
    from llmtune.study.priors import ModelFacts, cheap_config, prior_configs, starting_points

    space = SearchSpace.from_dict({"learning_rate": {"low": 1e-6, "high": 1e-1, "log": True}, "lora_r": [4, 16, 64],
                                   "lora_target_modules": ["attention", "all-linear"]})
    facts = ModelFacts(576, 1.35e8, steps=2000)
    first, hedge = prior_configs(space, 2, facts)
    assert starting_points(space, facts, {"eval_loss", "train_time_s"}, 20) == [first, cheap_config(space, facts), hedge]
    assert starting_points(space, facts, {"eval_loss", "trainable_params"}, None)[1] == cheap_config(space, facts, True)
    assert starting_points(space, facts, {"eval_loss"}, 20) == [first, hedge]
    assert starting_points(space, facts, {"eval_loss", "train_time_s"}, 7) == [first]  # a quarter of 7, no cheap end
