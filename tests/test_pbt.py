"""Population-based training: segments of a run resume bit for bit, exploit copies state exactly, explore
changes only the settings it may, the study keeps each segment's lineage, kill + resume, two workers."""

from __future__ import annotations

import torch
from conftest import tiny_recipe_dict

from llmtune.config.recipe import recipe_from_dict
from llmtune.harness.resume import STATE_FILE
from llmtune.harness.train import run_trial

SCHEDULE = [{"until": 0.5, "values": {"learning_rate": 2e-3, "lora_dropout": 0.1}},
            {"until": 1.0, "values": {"learning_rate": 8e-4, "lora_dropout": 0.3}}]


def _recipe(tmp_path, **sections):
    base = {"train": {"budget": {"examples": 96}, "eval_points": 1, "threads": 1},
            "measure": {"latency": False}, "search": {"learning_rate": 2e-3, "lora_r": 8, "sequence_len": 128,
                                                       "micro_batch_size": 8, "lora_dropout": 0.1}}
    base.update(sections)
    return recipe_from_dict(tiny_recipe_dict(tmp_path, **base))


def _state(path):
    return torch.load(path / STATE_FILE, weights_only=True)


def _same_state(a, b) -> bool:
    if a["lora"].keys() != b["lora"].keys() or not all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"]):
        return False
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k])


def test_segments_resume_bit_for_bit_and_a_copy_continues_like_the_original(tmp_path, tiny_model_path, tiny_data_path):
    """One run with a schedule == the same schedule cut into two trial runs (state saved, then resumed);
    a second member resumed from the same state (exploit's copy) continues on exactly the same curve."""
    recipe = _recipe(tmp_path)
    values = recipe.space.complete({})
    later = {**values, **SCHEDULE[1]["values"]}
    whole = run_trial(recipe, values, tmp_path / "whole", fractions=[0.5, 1.0],
                      segment={"schedule": SCHEDULE, "save": str(tmp_path / "state-whole")})
    first = run_trial(recipe, values, tmp_path / "first", fractions=[0.5],
                      segment={"schedule": SCHEDULE, "stop": 0.5, "save": str(tmp_path / "s0")})
    second = run_trial(recipe, later, tmp_path / "second", fractions=[1.0],
                       segment={"schedule": SCHEDULE, "start": 0.5, "resume": str(tmp_path / "s0"),
                                "save": str(tmp_path / "s1")})
    copy = run_trial(recipe, later, tmp_path / "copy", fractions=[1.0],
                     segment={"schedule": SCHEDULE, "start": 0.5, "resume": str(tmp_path / "s0"),
                              "save": str(tmp_path / "s1-copy")})
    for r in (whole, first, second, copy):
        assert r.status == "complete", r.reason
    n = len(whole.info["step_losses"])
    assert n == 12 and len(first.info["step_losses"]) == 6
    assert whole.info["step_losses"] == first.info["step_losses"] + second.info["step_losses"]
    assert second.info["step_losses"] == copy.info["step_losses"]
    assert whole.curve == first.curve + second.curve  # eval at 0.5 and at the end, exactly
    assert copy.curve == second.curve
    assert _same_state(_state(tmp_path / "state-whole"), _state(tmp_path / "s1"))
    assert _same_state(_state(tmp_path / "s1"), _state(tmp_path / "s1-copy"))
    assert not (tmp_path / "first" / "adapter").exists() and (tmp_path / "second" / "adapter").is_dir()


def test_a_constant_schedule_is_a_plain_trial(tmp_path, tiny_model_path, tiny_data_path):
    """lr(step) = peak x the scheduler's factor, as torch's LambdaLR computes it: one entry == no schedule."""
    recipe = _recipe(tmp_path)
    values = recipe.space.complete({})
    plain = run_trial(recipe, values, tmp_path / "plain", fractions=[1.0], save_adapter=False)
    one = run_trial(recipe, values, tmp_path / "one", fractions=[1.0], save_adapter=False,
                    segment={"schedule": [{"until": 1.0, "values": {}}]})
    assert plain.status == one.status == "complete"
    assert plain.curve == one.curve


def _pbt_dict(tmp_path, population=3, **study):
    return tiny_recipe_dict(
        tmp_path, train={"budget": {"examples": 96}, "eval_points": 1, "threads": 1}, measure={"latency": False},
        search={"learning_rate": {"low": 5e-4, "high": 5e-3, "log": True}, "lora_r": [4, 8], "sequence_len": 128,
                "micro_batch_size": 8, "lora_dropout": {"low": 0.0, "high": 0.2}},
        study={"strategy": "pbt", "pbt_settings": {"population": population, "interval": 0.5, "quantile": 0.34},
               "trial_timeout": 300, **study})
