"""Execution settings measured by probes (llmtune/study/probes.py): the choice of variant, what is
recorded, and a real search on the tiny model."""

from __future__ import annotations

import json

import optuna
import pytest
from conftest import tiny_recipe_dict

from llmtune.config.recipe import recipe_from_dict
from llmtune.study import probes
from llmtune.study.attrs import DIR, METRICS_KEY, PROBES, SETTINGS, STATUS, VARIANT_OF
from llmtune.study.storage import counted
from llmtune.trial.result import TrialResult


def _recipe(tmp_path, **sections):
    base = {"search": {**tiny_recipe_dict(tmp_path)["search"], "sample_packing": [False, True],
                       "gradient_checkpointing": [False, True], "lora_r": [4, 8]},
            "constraints": {"peak_memory_gb": {"max": 1.0}}}
    return recipe_from_dict(tiny_recipe_dict(tmp_path, **{**base, **sections}))


def test_variants_are_the_choices_of_the_execution_settings_and_the_sampler_sees_learning_only(tmp_path):
    recipe = _recipe(tmp_path)
    assert probes.enabled(recipe)
    assert probes.probed_settings(recipe.space) == ["sample_packing", "gradient_checkpointing"]
    assert len(probes.variants(recipe.space)) == 4
    assert probes.learning_space(recipe.space).searched == ["lora_r"]
    off = _recipe(tmp_path, study={"execution": "search"})
    assert not probes.enabled(off)
    one = recipe_from_dict(tiny_recipe_dict(tmp_path))  # no execution setting searched: nothing to probe
    assert not probes.enabled(one)


def _fake_probes(recipe, outcomes):
    """Probes whose runs return the given results by variant, in order; no gate."""
    calls = []

    def run_probe(settings, folder):
        key = (settings["sample_packing"], settings["gradient_checkpointing"])
        calls.append(key)
        status, metrics = outcomes[key]
        return TrialResult(status=status, reason="" if status == "complete" else "out of memory", settings=settings,
                           metrics=metrics, info={"process_wall_s": 1.5})

    return probes.Probes(recipe, run_probe, lambda settings: (None, None)), calls


def test_the_fastest_variant_that_fits_trains_and_every_other_pair_is_recorded(tmp_path):
    recipe = _recipe(tmp_path)
    outcomes = {
        (False, False): ("complete", {"peak_memory_gb": 0.9, "train_throughput": 1000.0, "train_time_s": 10.0}),
        (True, False): ("oom", {}),                                  # found by its probe, in seconds
        (False, True): ("complete", {"peak_memory_gb": 0.6, "train_throughput": 800.0, "train_time_s": 12.5}),
        (True, True): ("complete", {"peak_memory_gb": 1.4, "train_throughput": 5000.0, "train_time_s": 2.0}),  # over the budget
    }
    prober, calls = _fake_probes(recipe, outcomes)
    study = optuna.create_study(directions=["minimize", "minimize"])
    trial = study.ask({"lora_r": optuna.distributions.CategoricalDistribution([4, 8])})
    study._storage.set_trial_user_attr(trial._trial_id, DIR, "/runs/trials/0000")
    values = recipe.space.complete({"lora_r": trial.params["lora_r"]})
    chosen = prober.probe(study, trial, values, tmp_path)
    assert len(calls) == 4
    assert chosen is not None and (chosen.settings["sample_packing"], chosen.settings["gradient_checkpointing"]) == (False, False)
    found = study._storage.get_trial(trial._trial_id).user_attrs[PROBES]
    assert [p["feasible"] for p in found] == [True, True, False, False]  # (F,F), (F,T), (T,F), (T,T)
    assert "over the constraint" in found[3]["reason"]
    # The full trial ran in the chosen layout and measured 1.1x its probe's throughput.
    full = TrialResult(status="complete", settings=chosen.settings, curve=[[0.0, 4.9], [1.0, 3.5]],
                       metrics={"eval_loss": 3.5, "peak_memory_gb": 0.9, "train_throughput": 1100.0,
                                "train_time_s": 9.0, "latency_ms": 7.0})
    study.tell(trial, [3.5, 0.9])
    added = prober.record(study, trial, chosen, full)
    variants = [t for t in study.get_trials() if VARIANT_OF in t.user_attrs]
    assert len(added) == len(variants) == 3  # every layout but the chosen one
    assert counted(study) == (1, 0)  # variants count for no n_trials
    by_layout = {(t.params["sample_packing"], t.params["gradient_checkpointing"]): t for t in variants}
    ckpt = by_layout[(False, True)]
    assert ckpt.user_attrs[VARIANT_OF] == trial.number and ckpt.user_attrs[DIR] == "/runs/trials/0000"
    assert ckpt.values == [3.5, 0.6]  # the full trial's loss, the probe's peak memory
    m = ckpt.user_attrs[METRICS_KEY]
    assert m["train_throughput"] == pytest.approx(800.0 * 1.1) and m["train_time_s"] == pytest.approx(12.5 * 0.9)
    assert m["latency_ms"] == 7.0 and list(ckpt.constraints.values()) == [0.0, 0.0]
    over = by_layout[(True, True)]
    assert list(over.constraints.values())[1] > 0 and over.user_attrs[STATUS] == "complete"  # recorded, kept off the front
    oom = by_layout[(True, False)]  # out of memory in its probe: recorded infeasible, with penalty values
    assert oom.user_attrs[STATUS] == "oom" and list(oom.constraints.values())[0] > 0 and oom.values[0] >= 3.5
    assert "eval_loss" not in oom.user_attrs[METRICS_KEY]  # that layout never trained: no loss is claimed for it


def test_no_variant_fits_and_nothing_trains(tmp_path):
    recipe = _recipe(tmp_path)
    prober, _ = _fake_probes(recipe, {k: ("oom", {}) for k in [(a, b) for a in (False, True) for b in (False, True)]})
    study = optuna.create_study(directions=["minimize", "minimize"])
    trial = study.ask()
    assert prober.probe(study, trial, recipe.space.complete({}), tmp_path) is None
    assert prober.summary().count("oom") == 4


def test_a_search_probes_execution_variants_and_records_every_pair(tmp_path, tiny_model_path, tiny_data_path):
    from llmtune.api import search

    recipe = tiny_recipe_dict(tmp_path, search={**tiny_recipe_dict(tmp_path)["search"], "sample_packing": [False, True],
                                                "lora_r": [4, 8]},
                              study={"n_trials": 2, "trial_timeout": 300, "sampler": "random"})
    result = search(recipe_from_dict(recipe))
    trials = result.study.get_trials()
    full = [t for t in trials if VARIANT_OF not in t.user_attrs]
    variants = [t for t in trials if VARIANT_OF in t.user_attrs]
    assert len(full) == 2 and len(variants) == 2
    for t in full:
        found = t.user_attrs[PROBES]
        assert [p["settings"]["sample_packing"] for p in found] == [False, True]
        assert all(p["status"] == "complete" and p["metrics"]["peak_memory_gb"] > 0 for p in found)
        fastest = min(found, key=lambda p: p["metrics"]["train_time_s"])
        assert t.params["sample_packing"] == t.user_attrs[SETTINGS]["sample_packing"] == fastest["settings"]["sample_packing"]
        (v,) = [v for v in variants if v.user_attrs[VARIANT_OF] == t.number]
        assert v.params["sample_packing"] != t.params["sample_packing"] and v.params["lora_r"] == t.params["lora_r"]
        assert v.values[0] == t.values[0]  # the same learning: the same eval loss
        assert v.user_attrs[DIR] == t.user_attrs[DIR]
        spec = json.loads((tmp_path / "run" / "trials" / f"{t.number:04d}" / "probe-0" / "spec.json").read_text())
        assert spec["probe_steps"] == probes.PROBE_STEPS and spec["fractions"] == []
    # Every (learning, execution) pair is on the table the user gets.
    assert len(result.trials) == 4 and set(result.trials["sample_packing"]) == {False, True}
