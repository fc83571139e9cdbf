"""`llmtune init`: a commented recipe that validates, its format guessed, its space from the priors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmtune.cli import main
from llmtune.config.init import guess_format, recipe_text
from llmtune.config.recipe import load_recipe
from llmtune.errors import RecipeError


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_init_writes_a_commented_recipe_that_validates(tiny_model_path, tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)}
                                              for i in range(40)])
    out = tmp_path / "r.yaml"
    assert main(["init", "llmtune/tiny", "--data", str(data), "--output", str(out)]) == 0
    text = out.read_text()
    assert text.count("#") >= 8 and "3e-3 diverges" in text
    assert main(["validate", str(out)]) == 0
    recipe = load_recipe(out)
    assert recipe.data.format == "instruction"
    space = recipe.space
    lr = space.specs["learning_rate"]
    assert lr.log and 1e-4 <= lr.low < lr.high < 3e-3  # type: ignore[union-attr]
    assert set(space.specs["lora_target_modules"].options) == {"attention", "all-linear"}  # type: ignore[union-attr]
    assert space.specs["lora_alpha"].value == 32  # type: ignore[union-attr]
    assert main(["init", "llmtune/tiny", "--data", str(data), "--output", str(out)]) == 2  # exists: not overwritten
    assert "--force" in capsys.readouterr().err


def test_quantization_choices_fit_the_gpu_memory(tiny_model_path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world " * 20}] * 10)
    text = recipe_text("llmtune/tiny", data, gpu_memory_gb=24)
    assert 'quantization: ["none", "8bit", "4bit"]' in text and "format: text" in text


@pytest.mark.parametrize("row, fmt", [
    ({"text": "x"}, "text"),
    ({"instruction": "a", "output": "b"}, "instruction"),
    ({"prompt": "a", "completion": "b"}, "instruction"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "chat"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "chat"),
    ({"body": "x"}, "text"),
])
def test_the_format_is_guessed_from_the_first_row(row: dict, fmt: str) -> None:
    assert guess_format(row)[0] == fmt
    if "prompt" in row:
        assert guess_format(row)[1] == {"instruction_field": "prompt", "output_field": "completion"}


def test_unreadable_data_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not a file"):
        recipe_text("llmtune/tiny", tmp_path / "missing.jsonl")
    with pytest.raises(RecipeError, match="cannot tell the format"):
        guess_format({"n": 1})
