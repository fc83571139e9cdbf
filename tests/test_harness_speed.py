"""The harness speed benchmark compares like with like: the Trainer baseline trains on llmtune's tokens."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("harness_speed", ROOT / "benchmarks" / "harness_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trainer_baseline_trains_on_the_same_real_tokens_as_llmtune(bench, tmp_path, tiny_model_path, tiny_data_path):
    import argparse

    from llmtune.config.recipe import recipe_from_dict

    args = argparse.Namespace(device="cpu", examples=16, lora_r=4, sequence_len=256, micro_batch=4, batch_size=4)
    recipe = recipe_from_dict(bench.bench_recipe(args, str(tiny_model_path), tmp_path))
    ours = bench.run_llmtune(recipe, False, tmp_path)
    packed = bench.run_llmtune(recipe, True, tmp_path)
    theirs = bench.run_trainer(recipe, "cpu", tmp_path)
    flat = bench.run_trainer(recipe, "cpu", tmp_path, "trainer_flat")
    assert ours["examples"] == packed["examples"] == theirs["examples"] == flat["examples"] == 16
    assert ours["tokens"] == packed["tokens"] == theirs["tokens"] == flat["tokens"] > 16 * 20
    assert theirs["steps"] == flat["steps"] == ours["steps"] == packed["steps"] == 4  # the same examples per step
    # the same training, so the same eval loss (on llmtune's eval batches) to float error: the comparison is fair
    # by construction, packed against transformers' packing collator as unpacked against the padded Trainer
    assert flat["eval_loss"] == pytest.approx(packed["eval_loss"], rel=1e-5)
    assert theirs["eval_loss"] == pytest.approx(ours["eval_loss"], rel=1e-5)
    assert packed["eval_loss"] == pytest.approx(ours["eval_loss"], rel=1e-5)
    assert packed["padding_share"] < ours["padding_share"]
    assert all(r["step_tokens_per_cpu_s"] > 0 and r["tokens_per_s"] > 0 for r in (ours, packed, theirs, flat))
    assert theirs["flops_model"]["n_lora"] > 0 and theirs["flops_model"]["n_linear"] > theirs["flops_model"]["n_lora"]


def test_trl_baseline_packs_the_same_tokens_into_the_same_number_of_steps(bench, tmp_path, tiny_model_path):
    pytest.importorskip("trl")
    import argparse

    from llmtune.config.recipe import recipe_from_dict

    args = argparse.Namespace(device="cpu", examples=16, lora_r=4, sequence_len=256, micro_batch=4, batch_size=8)
    recipe = recipe_from_dict(bench.bench_recipe(args, str(tiny_model_path), tmp_path))
    ours = bench.run_llmtune(recipe, True, tmp_path)
    trl = bench.run_trainer(recipe, "cpu", tmp_path, "trl_packed")
    assert trl["tokens"] == ours["tokens"] and trl["steps"] == ours["steps"] == 2
    # its own example order (best-fit decreasing): close, not equal
    assert trl["eval_loss"] == pytest.approx(ours["eval_loss"], rel=0.05)


def test_mfu_counts_lora_training_flops_against_the_peak(bench):
    # 1e4 tokens/s on 1e9 linear weights (1e7 of them LoRA): (4e9 + 2e7) FLOPs a token; 6N would be 6e9.
    m = bench.mfu({"llmtune": 1e4}, {"n_linear": 10**9, "n_lora": 10**7}, 989.0)
    assert m["llmtune_lora_formula"] == pytest.approx(1e4 * 4.02e9 / 989e12)
    assert m["llmtune_6N"] == pytest.approx(1e4 * 6e9 / 989e12)
