"""Recipe validation: every problem at once, each with the field, the bad value and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmtune.config.recipe import RecipeError, load_recipe, recipe_from_dict
from llmtune.config.space import Choice, Fixed, Range, SearchSpace

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"model": {"name": "llmtune/tiny"}, "data": {"source": "llmtune/tiny-tasks"}}


def problems_of(data) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data)
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.objectives, "a shipped recipe names its objectives"
    assert recipe.space.searched, "a shipped recipe searches something"


def test_minimal_recipe_gets_defaults():
    r = recipe_from_dict(GOOD)
    assert r.objectives == {"eval_loss": "minimize"}
    assert r.select.by == "eval_loss"
    assert r.train.budget.kind == "examples"
    assert r.space.searched == []


@pytest.mark.parametrize("data, expected", [
    ({**GOOD, "modle": {}}, "modle: unknown setting; did you mean 'model'?"),
    ({**GOOD, "data": {"source": "x", "formt": "chat"}}, "data.formt: unknown setting; did you mean 'format'?"),
    ({**GOOD, "search": {"lora_rank": 8}}, "search.lora_rank: unknown setting; did you mean 'lora_r'?"),
    ({**GOOD, "search": {"quantization": "4bits"}}, "search.quantization: '4bits' is not one of none, 8bit, 4bit; did you mean '4bit'?"),
    ({**GOOD, "search": {"lora_r": {"low": 32, "high": 8}}}, "search.lora_r: low 32 must be below high 8"),
    ({**GOOD, "search": {"lora_r": 0}}, "search.lora_r: 0 must be at least 1"),
    ({**GOOD, "search": {"lora_r": 8.5}}, "search.lora_r: 8.5 is not a whole number"),
    ({**GOOD, "search": {"learning_rate": {"low": 0, "high": 1e-3}}}, "a log range needs low > 0"),
    ({**GOOD, "search": {"learning_rate": {"low": 1e-5, "hi": 1e-3}}}, "did you mean 'high'?"),
    ({**GOOD, "search": {"sample_packing": "yes"}}, "search.sample_packing: 'yes' is not true or false"),
    ({**GOOD, "search": {"sample_packing": {"low": 0, "high": 1}}}, "takes a value or a list of choices, not a range"),
    ({**GOOD, "search": {"lora_r": []}}, "search.lora_r: an empty list of choices"),
    ({**GOOD, "search": {"lora_dropout": [0.0, 1.5]}}, "search.lora_dropout[1]: 1.5 must be in [0, 1)"),
    ({**GOOD, "search": {"lora_target_modules": "atention"}}, "did you mean 'attention'?"),
    ({**GOOD, "search": {"lora_alpha": 16, "lora_alpha_ratio": 2}}, "give lora_alpha or lora_alpha_ratio, not both"),
    ({**GOOD, "train": {"budget": {"tokens": 10, "epochs": 1}}}, "set exactly one of tokens, examples, epochs (got tokens, epochs)"),
    ({**GOOD, "train": {"budget": {"examples": -5}}}, "train.budget.examples: -5 must be positive"),
    ({**GOOD, "train": {"lr_scheduler": "cosin"}}, "did you mean 'cosine'?"),
    ({**GOOD, "train": {"report_to": ["tensorbord"]}}, "train.report_to[0]: 'tensorbord' is not one of tensorboard, mlflow, wandb; did you mean 'tensorboard'?"),
    ({**GOOD, "objectives": {"eval_los": "minimize"}}, "objectives.eval_los: unknown metric; did you mean 'eval_loss'?"),
    ({**GOOD, "objectives": {"eval_loss": "lowest"}}, "objectives.eval_loss: 'lowest' is not one of minimize, maximize"),
    ({**GOOD, "constraints": {"peak_memory_gb": {"maxi": 3}}}, "constraints.peak_memory_gb: {\"maxi\": 3} must be {max: x} and/or {min: y}"),
    ({**GOOD, "study": {"sampler": "nsga"}}, "study.sampler: 'nsga' is not one of auto, tpe, nsga2"),
    ({**GOOD, "study": {"n_trials": 0}}, "study.n_trials: 0 must be at least 1"),
    ({**GOOD, "study": {"n_trials": None}}, "set n_trials or timeout"),
    ({**GOOD, "select": {"by": "latency_ms"}}, "select.by: 'latency_ms' is not an objective of this recipe"),
    ({**GOOD, "data": {"source": "x", "eval_fraction": 1.5}}, "data.eval_fraction: 1.5 must be between 0 and 1"),
    ({**GOOD, "model": {"name": "x", "dtype": "fp16"}}, "model.dtype: 'fp16' is not one of auto, bfloat16, float16, float32"),
    ({**GOOD, "model": {"name": "x", "trust_remote_code": "no"}}, "model.trust_remote_code: 'no' is not true or false"),
    ({"data": {"source": "x"}}, "model.name: is required"),
    ({**GOOD, "study": {"pruner": "asha", "pruner_settings": {"eta": 1}}}, "study.pruner_settings: pruner 'asha': setting 'eta'=1 is invalid"),
    ({**GOOD, "train": "fast"}, "train: expected a mapping of settings, got 'fast'"),
])
def test_bad_recipe_names_field_value_and_fix(data, expected):
    problems = problems_of(data)
    assert any(expected in p for p in problems), problems


def test_all_problems_reported_at_once():
    bad = {"model": {"name": "x", "dtype": "fp8"}, "data": {"source": "x", "train_on": "answers"},
           "train": {"budget": {"tokens": -1}}, "search": {"lora_r": "big", "quantization": ["nf3"]},
           "objectives": {"loss": "minimize", "speed": "maximize"}}
    problems = problems_of(bad)
    joined = "\n".join(problems)
    for field in ("model.dtype", "data.train_on", "train.budget.tokens", "search.lora_r", "search.quantization[0]", "objectives.speed"):
        assert field in joined
    assert len(problems) == 6


def test_search_values_parse_to_specs():
    r = recipe_from_dict({**GOOD, "search": {
        "learning_rate": {"low": "1e-5", "high": 1e-3},  # YAML reads 1e-5 (no dot) as text
        "lora_r": [8, 16], "sequence_len": {"low": 128, "high": 512, "step": 128},
        "lora_target_modules": {"choices": [["q_proj", "v_proj"], "all-linear"]}}})
    specs = r.space.specs
    assert specs["learning_rate"] == Range(1e-5, 1e-3, True, None, False)
    assert specs["lora_r"] == Choice((8, 16))
    assert specs["sequence_len"] == Range(128, 512, False, 128, True)
    assert specs["lora_target_modules"] == Choice(("q_proj,v_proj", "all-linear"))
    assert specs["lora_dropout"] == Fixed(0.05)
    assert r.space.grid() is None  # a float range: no grid
    assert SearchSpace.from_dict({"lora_r": [4, 8], "sequence_len": {"low": 128, "high": 512, "step": 128}}).grid_size() == 8


def test_conditional_settings_are_sampled_only_when_active():
    import optuna

    space = SearchSpace.from_dict({"quantization": ["none", "4bit"], "bnb_4bit_quant_type": ["nf4", "fp4"]})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        t = study.ask()
        v = space.suggest(t)
        seen.add(v["quantization"])
        assert ("bnb_4bit_quant_type" in t.params) == (v["quantization"] == "4bit")
        study.tell(t, 0.0)
    assert seen == {"none", "4bit"}


def test_overrides_and_env_storage(tmp_path, monkeypatch):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "study": {"storage": "postgresql://u:${PGPASS}@h/db"}}))
    monkeypatch.setenv("PGPASS", "s3cret")
    r = load_recipe(path, ["search.lora_r=[4, 8]", "train.budget.examples=50"])
    assert r.space.specs["lora_r"] == Choice((4, 8))
    assert r.train.budget.examples == 50
    assert r.study.storage == "postgresql://u:s3cret@h/db"
    assert r.name == "r"


def test_cli_validate_exit_codes_and_no_traceback(tmp_path):
    good = subprocess.run([sys.executable, "-m", "llmtune.cli", "validate", str(ROOT / "recipes" / "tiny-cpu.yaml")],
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "ok" in good.stdout and "lora_r" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: x}\ndata: {source: y}\nsearch: {quantisation: 4bit}\n")
    out = subprocess.run([sys.executable, "-m", "llmtune.cli", "validate", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "search.quantisation: unknown setting; did you mean 'quantization'?" in out.stderr
    assert "Traceback" not in out.stderr
    missing = subprocess.run([sys.executable, "-m", "llmtune.cli", "validate", str(tmp_path / "nope.yaml")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    out = subprocess.run([sys.executable, "-m", "llmtune.cli", "validate", str(broken)], capture_output=True, text=True)
    assert out.returncode == 2 and "not valid YAML" in out.stderr
