"""Execution settings change how a step's work is laid out, never what the model learns.

With the global batch (``batch_size``, examples per optimizer step) fixed, sample packing, the micro
batch size, gradient checkpointing and the attention implementation must give the same learning curve
(eval loss at every point) within float tolerance: that is what lets a search measure them with short
probes instead of searching them with full trials (`llmtune.study.probes`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe_dict

from llmtune.config.recipe import recipe_from_dict
from llmtune.config.space import EXECUTION, PARAMS
from llmtune.harness import data as D
from llmtune.harness.train import run_trial

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness_layout_ab import in_stream_order  # noqa: E402  (the layout before 2026-12-07)

FRACTIONS = [0.0, 0.25, 0.5, 0.75, 1.0]
VARIANTS = [
    ({"sample_packing": False, "micro_batch_size": 8, "gradient_checkpointing": False}, "sdpa"),
    ({"sample_packing": True, "micro_batch_size": 2, "gradient_checkpointing": False}, "sdpa"),
    ({"sample_packing": False, "micro_batch_size": 3, "gradient_checkpointing": True}, "sdpa"),
    ({"sample_packing": True, "micro_batch_size": 1, "gradient_checkpointing": True}, "eager"),
]


def test_the_recipe_says_which_settings_are_execution_settings():
    assert set(EXECUTION) == {"sample_packing", "micro_batch_size", "gradient_checkpointing", "liger_kernels"}
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


def test_a_probe_runs_a_few_steps_and_the_largest_and_predicts_the_full_runs_cost(tmp_path, tiny_model_path,
                                                                                  tiny_data_path):
    recipe = recipe_from_dict(tiny_recipe_dict(
        tmp_path, train={"budget": {"examples": 96}, "eval_points": 1, "threads": 1},
        search={"learning_rate": 3e-3, "lora_r": 8, "sequence_len": 192, "batch_size": 8, "micro_batch_size": 8,
                "lora_target_modules": "all-linear", "lora_dropout": 0.0, "sample_packing": False}))
    values = recipe.space.complete({})
    probe = run_trial(recipe, values, tmp_path / "probe", probe_steps=2)
    full = run_trial(recipe, values, tmp_path / "full", fractions=[1.0], save_adapter=False)
    assert probe.status == full.status == "complete", (probe.reason, full.reason)
    steps = probe.info["probe_steps"]
    assert steps[:2] == [0, 1] and len(steps) <= 3 and full.info["steps_done"] == 12
    assert not probe.curve and not (tmp_path / "probe" / "adapter").exists()  # no eval, no adapter
    # The largest step is in the probe, so its peak is the full run's (CPU: the process's resident peak).
    assert probe.metrics["peak_memory_gb"] == pytest.approx(full.metrics["peak_memory_gb"], rel=0.1)
    # Seconds are projected from a few steps: the right size, not exact (timing on a shared machine).
    ratio = probe.metrics["train_time_s"] / full.metrics["train_time_s"]
    assert 0.4 < ratio < 2.5, ratio


@pytest.mark.parametrize("packing", [False, True])
def test_laying_a_step_out_longest_first_changes_only_the_padding(tmp_path, monkeypatch, tiny_model_path,
                                                                   tiny_data_path, packing):
    """Each step's micro batches are laid out longest first (`data._lay_out`): fewer padded slots, the same
    learning as the stream's order (the same examples a step, a loss summed over the same label tokens)."""
    from safetensors.torch import load_file

    runs = []
    for name, layout in (("in-order", in_stream_order), ("longest-first", D._lay_out)):
        monkeypatch.setattr(D, "_lay_out", layout)
        recipe = recipe_from_dict(tiny_recipe_dict(
            tmp_path, train={"budget": {"examples": 64}, "eval_points": 2, "eval_batch_size": 16, "seed": 7},
            measure={"latency": False},
            search={"learning_rate": 3e-3, "lora_r": 8, "sequence_len": 128, "batch_size": 16, "micro_batch_size": 4,
                    "sample_packing": packing, "lora_target_modules": "all-linear", "lora_dropout": 0.0}))
        res = run_trial(recipe, recipe.space.complete({}), tmp_path / name, fractions=[0.0, 0.5, 1.0])
        assert res.status == "complete", res.reason
        runs.append((res, load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))))
    (before, adapter_before), (after, adapter_after) = runs
    for key in ("steps", "examples", "real_tokens", "label_tokens"):
        assert after.info["plan"][key] == before.info["plan"][key]
    assert after.info["plan"]["slots"] < 0.9 * before.info["plan"]["slots"]  # less padding
    assert after.curve[-1][1] < after.curve[0][1] - 0.05  # it learned
    for (_, a), (_, b) in zip(before.curve, after.curve, strict=True):
        assert b == pytest.approx(a, rel=1e-5)  # float rounding: measured ~3e-8
    assert adapter_after.keys() == adapter_before.keys()
    for k, v in adapter_before.items():
        assert torch.allclose(adapter_after[k], v, rtol=1e-3, atol=1e-5), k  # measured: <= 3e-6 of 0.09


def _fake_liger(monkeypatch, calls: list) -> None:
    """A stand-in for liger-kernel (Triton, CUDA only) that patches as Liger does (a bound forward on each RMSNorm,
    the modeling module's RoPE function), records how llmtune calls it, and computes what the real kernels
    compute: tests/test_gpu.py runs the real ones."""
    import types

    from transformers.models.llama import modeling_llama

    def apply(model, **flags):
        calls.append(("apply", model.config.model_type, flags))
        for module in model.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.forward = types.MethodType(type(module).forward, module)
        rope = modeling_llama.apply_rotary_pos_emb

        def counted_rope(*args, **kwargs):
            calls.append(("rope",))
            return rope(*args, **kwargs)

        monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", counted_rope)

    class FusedLinearCrossEntropy:
        def __init__(self, reduction: str):
            self.reduction = reduction

        def __call__(self, weight, hidden, target, bias=None):
            calls.append(("loss", tuple(hidden.shape), weight.requires_grad))
            logits = torch.nn.functional.linear(hidden, weight, bias)
            return torch.nn.functional.cross_entropy(logits.float(), target, reduction=self.reduction)

    modules = {name: types.ModuleType(name) for name in (
        "liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.monkey_patch",
        "liger_kernel.transformers.fused_linear_cross_entropy")}
    modules["liger_kernel.transformers.monkey_patch"]._apply_liger_kernel_to_instance = apply
    modules["liger_kernel.transformers.fused_linear_cross_entropy"].LigerFusedLinearCrossEntropyLoss = FusedLinearCrossEntropy
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def test_liger_kernels_patch_the_base_and_fuse_the_training_loss(tmp_path, monkeypatch, tiny_model_path, tiny_data_path):
    """`liger_kernels: true` asks Liger for its RMSNorm, SwiGLU and RoPE kernels (never its loss patches: the loss
    is llmtune's) and trains with the output layer fused into the loss, on the label positions only; evaluations
    keep the plain loss, and latency is measured with the model's own kernels again. With kernels that compute
    the same, the curve is the same."""
    from transformers.models.llama import modeling_llama

    from llmtune.harness import train as T

    own_rope = modeling_llama.apply_rotary_pos_emb
    calls: list = []
    _fake_liger(monkeypatch, calls)
    measured_plain: list[bool] = []

    def latency_with_own_kernels(model, *args, **kwargs):
        norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
        measured_plain.append(modeling_llama.apply_rotary_pos_emb is own_rope
                              and bool(norms) and not any("forward" in vars(m) for m in norms))
        return measure_latency(model, *args, **kwargs)

    measure_latency = T.measure_latency
    monkeypatch.setattr(T, "measure_latency", latency_with_own_kernels)
    runs = {}
    for liger in (False, True):
        recipe = recipe_from_dict(tiny_recipe_dict(
            tmp_path, train={"budget": {"examples": 32}, "eval_points": 2, "eval_batch_size": 16, "seed": 7},
            measure={"latency_prompts": 1, "max_new_tokens": 2},
            search={"learning_rate": 3e-3, "lora_r": 8, "sequence_len": 128, "batch_size": 8, "micro_batch_size": 4,
                    "lora_target_modules": "all-linear", "lora_dropout": 0.0, "liger_kernels": liger}))
        runs[liger] = run_trial(recipe, recipe.space.complete({}), tmp_path / f"liger-{liger}", fractions=[0.0, 0.5, 1.0],
                                save_adapter=False)
        assert runs[liger].status == "complete", runs[liger].reason
    applied = [c for c in calls if c[0] == "apply"]
    assert applied == [("apply", "llama", {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                                           "fused_linear_cross_entropy": False})]
    assert runs[True].info["liger_patched"] > 4 and "liger_patched" not in runs[False].info
    assert ("rope",) in calls and measured_plain == [True, True]  # trained with the patches, measured without
    losses = [c for c in calls if c[0] == "loss"]
    plan = runs[True].info["plan"]
    assert len(losses) == plan["micro_batches"]  # every training micro batch, no evaluation
    assert sum(shape[0] for _, shape, _ in losses) == plan["label_tokens"]  # the label positions only
    assert not any(grad for *_, grad in losses)  # the frozen output layer
    assert runs[True].curve[-1][1] < runs[True].curve[0][1] - 0.05  # it learned
    for (_, a), (_, b) in zip(runs[False].curve, runs[True].curve, strict=True):
        assert b == pytest.approx(a, rel=1e-6)
