"""The architectures users bring, through llmtune's own validate and harness: for every random-init tiny
config, each LoRA target preset with packing on and off either trains (eval loss goes down) or is refused
by validate, naming the setting and what the model has."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_recipe_dict
from test_targets import CONFIGS

import llmtune
from llmtune.harness.train import run_trial

PRESETS = ("qv", "attention", "mlp", "all-linear")
# Each architecture trains every preset with packing on and off; to keep the suite short, the full
# preset x packing cross runs on a representative set and every other architecture runs its presets once,
# packing alternating, so that every (architecture, preset) and every (architecture, packing) is covered.
FULL = ("llama", "gpt2", "mixtral", "opt", "bloom")


def _cases() -> list[tuple[str, str, bool]]:
    cases = []
    for arch in CONFIGS:
        for i, preset in enumerate(PRESETS):
            if arch in FULL:
                cases += [(arch, preset, False), (arch, preset, True)]
            else:
                cases.append((arch, preset, i % 2 == 1))
    return cases


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_model_path):
    """Each architecture as a local model folder: random weights, the tiny model's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    root = tmp_path_factory.mktemp("archs")
    dirs = {}
    for arch, cfg in CONFIGS.items():
        # No dropout in the base (GPT-2's and OPT's configs default to 0.1): with it, an 8-step curve depends on
        # which tokens each mask hits, and so on the layout of a step (longest first since 2026-12-07); this
        # test asks whether each preset trains, not how that luck falls.
        no_dropout = {k: 0.0 for k, v in cfg.to_dict().items() if "drop" in k and isinstance(v, float)}
        cfg = cfg.__class__.from_dict({**cfg.to_dict(), **no_dropout, "vocab_size": len(tokenizer)})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(root / arch)
        tokenizer.save_pretrained(root / arch)
        dirs[arch] = str(root / arch)
    return dirs


def _recipe(tmp_path, model_dir: str, preset: str, packing: bool, dropout: float = 0.0) -> dict:
    return tiny_recipe_dict(
        tmp_path, model={"name": model_dir},
        data={"source": "llmtune/tiny-tasks", "eval_max_length": 64, "max_eval_examples": 16, "max_train_examples": 64},
        train={"budget": {"examples": 64}, "eval_points": 1, "eval_batch_size": 16},
        measure={"latency": False},
        search={"learning_rate": 3e-2, "lora_r": 4, "sequence_len": 64, "micro_batch_size": 8,
                "lora_target_modules": preset, "lora_dropout": dropout, "sample_packing": packing})


@pytest.mark.parametrize("arch, preset, packing", _cases())
def test_preset_trains_or_is_refused_at_validate(model_dirs, tmp_path, arch, preset, packing):
    recipe = _recipe(tmp_path, model_dirs[arch], preset, packing)
    try:
        validated = llmtune.validate(recipe)
    except llmtune.RecipeError as e:
        text = str(e)
        # only BLOOM may refuse, and only packing: it cannot keep packed examples apart
        assert (arch, packing) == ("bloom", True), text
        assert "search.sample_packing: true, but bloom cannot keep packed examples apart" in text
        return
    settings = validated.space.complete({})
    result = run_trial(validated, settings, tmp_path / "trial")
    assert result.status == "complete", result.reason
    assert result.metrics["eval_loss"] < result.base_eval_loss - 1e-3, (result.base_eval_loss, result.metrics)
    if packing:
        assert result.info["packing_mode"] == ("mask" if arch == "opt" else "position_ids")


def test_moe_expert_targets_with_dropout_are_refused_at_validate(model_dirs, tmp_path):
    with pytest.raises(llmtune.RecipeError) as err:
        llmtune.validate(_recipe(tmp_path, model_dirs["mixtral"], "mlp", False, dropout=0.05))
    assert "search.lora_dropout: [0.05] with lora_target_modules 'mlp'" in str(err.value)
    assert "experts.down_proj" in str(err.value) and "set lora_dropout: 0" in str(err.value)


def test_a_module_name_the_model_lacks_is_refused_with_what_it_has(model_dirs, tmp_path):
    with pytest.raises(llmtune.RecipeError) as err:
        llmtune.validate(_recipe(tmp_path, model_dirs["gpt2"], "q_proj,v_proj", False))
    text = str(err.value)
    assert "search.lora_target_modules: q_proj, v_proj match no linear module of gpt2" in text
    assert "c_attn" in text and "c_fc" in text
