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
