"""CUDA paths of the harness: bf16, 8-bit and 4-bit bases, 8-bit paged optimizer, NVML/torch peak memory.

Marked ``gpu``: skipped where torch sees no CUDA GPU (CI), run on a GPU machine with
``CUDA_VISIBLE_DEVICES=0 python -m pytest -m gpu``.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_recipe_dict

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize(("quantization", "optimizer"), [("none", "adamw_torch"), ("8bit", "adamw_torch"),
                                                         ("4bit", "paged_adamw_8bit")])
def test_trial_on_cuda(tmp_path, tiny_model_path, tiny_data_path, quantization, optimizer):
    import llmtune

    recipe = tiny_recipe_dict(tmp_path, train={"device": "cuda", "optimizer": optimizer},
                              model={"name": "llmtune/tiny", "dtype": "bfloat16"},
                              search={"quantization": quantization, "gradient_checkpointing": True})
    res = llmtune.train(recipe, {})
    assert res.status == "complete", res.reason
    assert res.info["device"] == "cuda" and res.info["dtype"] == "bfloat16"
    assert math.isfinite(res.metrics["eval_loss"])
    assert res.metrics["eval_loss"] < res.curve[0][1]  # training on the GPU lowers the loss
    peak = res.info["peak_memory"]
    assert peak["torch_reserved"] > 0 and peak["nvml"] and peak["nvml"] > peak["torch_reserved"]  # nvml adds the context
    assert res.metrics["peak_memory_gb"] * 2**30 >= peak["torch_reserved"]
    layers = res.info["quantized_layers"]
    if quantization == "none":
        assert layers == {}
    else:
        assert layers.get("Linear8bitLt" if quantization == "8bit" else "Linear4bit", 0) >= 4 * 7
    assert res.metrics["latency_ms"] > 0 and res.metrics["ttft_ms"] > 0


def test_liger_kernels_learn_the_same_curve(tmp_path, tiny_model_path, tiny_data_path):
    """The execution-equivalence test for `liger_kernels` (tests/test_execution.py runs the same for the
    layout settings on CPU): Liger's RMSNorm, SwiGLU, RoPE and fused loss give the plain curve within float
    rounding, in float32 so that rounding stays small."""
    pytest.importorskip("liger_kernel")
    from llmtune.config.recipe import recipe_from_dict
    from llmtune.harness.train import run_trial

    curves = {}
    for liger in (False, True):
        recipe = recipe_from_dict(tiny_recipe_dict(
            tmp_path, model={"name": "llmtune/tiny", "dtype": "float32"}, measure={"latency": False},
            train={"device": "cuda", "budget": {"examples": 64}, "eval_points": 4, "eval_batch_size": 16, "seed": 7},
            search={"learning_rate": 3e-3, "lora_r": 8, "sequence_len": 128, "batch_size": 8, "micro_batch_size": 4,
                    "lora_target_modules": "all-linear", "lora_dropout": 0.0, "liger_kernels": liger}))
        res = run_trial(recipe, recipe.space.complete({}), tmp_path / f"liger-{liger}",
                        fractions=[0.0, 0.25, 0.5, 0.75, 1.0], save_adapter=False)
        assert res.status == "complete", res.reason
        assert (res.info.get("liger_patched", 0) > 0) == liger  # Liger's kernels ran (it only logs for a model it lacks)
        curves[liger] = res.curve
    assert curves[False][-1][1] < curves[False][0][1] - 0.05  # it learned
    for (_, a), (_, b) in zip(curves[False], curves[True], strict=True):
        assert b == pytest.approx(a, rel=2e-3)
