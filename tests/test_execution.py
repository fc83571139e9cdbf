"""Execution settings change how a step's work is laid out, never what the model learns.

With the global batch (``batch_size``, examples per optimizer step) fixed, sample packing, the micro
batch size, gradient checkpointing and the attention implementation must give the same learning curve
(eval loss at every point) within float tolerance: that is what lets a search measure them with short
probes instead of searching them with full trials (`llmtune.study.probes`).
"""

from __future__ import annotations

import pytest
from conftest import tiny_recipe_dict

from llmtune.config.recipe import recipe_from_dict
from llmtune.config.space import EXECUTION, PARAMS
from llmtune.harness.train import run_trial

FRACTIONS = [0.0, 0.25, 0.5, 0.75, 1.0]
VARIANTS = [
    ({"sample_packing": False, "micro_batch_size": 8, "gradient_checkpointing": False}, "sdpa"),
    ({"sample_packing": True, "micro_batch_size": 2, "gradient_checkpointing": False}, "sdpa"),
    ({"sample_packing": False, "micro_batch_size": 3, "gradient_checkpointing": True}, "sdpa"),
    ({"sample_packing": True, "micro_batch_size": 1, "gradient_checkpointing": True}, "eager"),
]


def test_the_recipe_says_which_settings_are_execution_settings():
    assert set(EXECUTION) == {"sample_packing", "micro_batch_size", "gradient_checkpointing"}
    assert not PARAMS["batch_size"].execution and not PARAMS["learning_rate"].execution


@pytest.mark.parametrize("budget", [{"examples": 64}, {"tokens": 4000}])
def test_same_curve_under_every_execution_variant(tmp_path, tiny_model_path, tiny_data_path, budget):
    curves, steps, layouts = [], set(), set()
    for i, (execution, attn) in enumerate(VARIANTS):
        recipe = recipe_from_dict(tiny_recipe_dict(
            tmp_path, model={"name": "llmtune/tiny", "attn_implementation": attn},
            train={"budget": budget, "eval_points": 4, "eval_batch_size": 16, "seed": 7},
            search={"learning_rate": 3e-3, "lora_r": 8, "sequence_len": 128, "batch_size": 8,
                    "lora_target_modules": "all-linear", "lora_dropout": 0.0, "warmup_ratio": 0.1, **execution}))
        res = run_trial(recipe, recipe.space.complete({}), tmp_path / f"v{i}", fractions=FRACTIONS, save_adapter=False)
        assert res.status == "complete", res.reason
        assert res.info["batch_size"] == 8
        curves.append(res.curve)
        steps.add(res.info["plan"]["steps"])
        layouts.add((res.info["plan"]["micro_batches"], res.info["gradient_checkpointing"]))
    assert len(steps) == 1 and len(layouts) == len(VARIANTS)  # same steps, laid out differently
    first = curves[0]
    assert [f for f, _ in first] == FRACTIONS
    assert first[-1][1] < first[0][1] - 0.05  # it learned: the test would see a change in what it learned
    for curve in curves[1:]:
        assert [f for f, _ in curve] == FRACTIONS
        for (_, a), (_, b) in zip(first, curve, strict=True):
            assert b == pytest.approx(a, rel=2e-4, abs=1e-5)
