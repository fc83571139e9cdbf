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
    assert text.count("#") >= 8 and "diverges" in text and "width 128" in text
    assert main(["validate", str(out)]) == 0
    recipe = load_recipe(out)
    assert recipe.data.format == "instruction"
    space = recipe.space
    lr = space.specs["learning_rate"]
    # the tiny model (width 128, 2 steps): the rule's first start 4.8e-3, the range a quarter of it to 6x
    assert lr.log and lr.low == pytest.approx(1e-3) and lr.high == pytest.approx(3e-2)  # type: ignore[union-attr]
    assert space.specs["lora_r"].options == (8, 16, 32, 64)  # type: ignore[union-attr]
    assert set(space.specs["lora_target_modules"].options) == {"attention", "all-linear"}  # type: ignore[union-attr]
    assert space.specs["lora_alpha"].value == 32  # type: ignore[union-attr]
    assert main(["init", "llmtune/tiny", "--data", str(data), "--output", str(out)]) == 2  # exists: not overwritten
    assert "--force" in capsys.readouterr().err


def test_quantization_choices_fit_the_gpu_memory(tiny_model_path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world " * 20}] * 10)
    text = recipe_text("llmtune/tiny", data, gpu_memory_gb=24)
    assert 'quantization: ["none", "8bit", "4bit"]' in text and "format: text" in text


@pytest.mark.parametrize("installed", [False, True])
def test_liger_kernels_are_offered_for_a_gpu_where_the_package_is_installed(tiny_model_path, tmp_path: Path,
                                                                            monkeypatch, installed: bool) -> None:
    from llmtune import hardware

    monkeypatch.setattr(hardware, "liger_model_types", lambda: frozenset({"llama"}) if installed else "not installed")
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world " * 20}] * 10)
    assert ("liger_kernels: [false, true]" in recipe_text("llmtune/tiny", data, gpu_memory_gb=24)) == installed
    monkeypatch.setattr(hardware, "cuda_available", lambda: False)
    assert "liger_kernels: [" not in recipe_text("llmtune/tiny", data)  # no GPU: never
    monkeypatch.setattr(hardware, "liger_model_types", lambda: frozenset({"mistral"}))  # not for this architecture
    assert "liger_kernels: [" not in recipe_text("llmtune/tiny", data, gpu_memory_gb=24)


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


def test_the_learning_rate_range_follows_the_model(tmp_path: Path) -> None:
    """A wider, larger model gets a lower learning-rate range and a higher rank (study/priors.py's rule)."""
    from transformers import LlamaConfig

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world " * 20}] * 2000)
    big = tmp_path / "llama-8b-config"
    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, vocab_size=128256).save_pretrained(big)
    load_recipe_text = recipe_text(str(big), data, gpu_memory_gb=80)
    out = tmp_path / "big.yaml"
    out.write_text(load_recipe_text)
    space = load_recipe(out).space
    lr = space.specs["learning_rate"]
    # lr x alpha 3.2e-3 at width 4096, alpha 32, 112 steps (short: x1.5): first start 1.5e-4
    assert lr.low == pytest.approx(4e-5) and lr.high == pytest.approx(9e-4)  # type: ignore[union-attr]
    assert space.specs["lora_r"].options == (16, 32, 64, 128)  # type: ignore[union-attr]
    assert "width 4096" in load_recipe_text


def test_init_takes_parquet_folders_and_the_built_in_data(tiny_model_path, tiny_data_path, tmp_path: Path) -> None:
    """Recipes accept parquet files, folders of split files and llmtune/tiny-tasks as data.source: so does init."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(40)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    folder = tmp_path / "splits"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows)
    for data, source in ((tmp_path / "d.parquet", str(tmp_path / "d.parquet")), (folder, str(folder)),
                         ("llmtune/tiny-tasks", "llmtune/tiny-tasks")):
        out = tmp_path / "r.yaml"
        assert main(["init", "llmtune/tiny", "--data", str(data), "--output", str(out), "--force"]) == 0
        recipe = load_recipe(out)
        assert recipe.data.source == source and recipe.data.format == "instruction"
        assert main(["validate", str(out)]) == 0


def test_init_on_a_cpu_sizes_the_budget_and_says_what_a_search_costs(tmp_path: Path, monkeypatch, capsys) -> None:
    from transformers import LlamaConfig

    monkeypatch.setattr("llmtune.hardware.cuda_available", lambda: False)
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Say hello " * 10, "output": "hello " * 20}] * 3000)
    model = tmp_path / "llama-1b-config"
    LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, vocab_size=128256).save_pretrained(model)
    out = tmp_path / "r.yaml"
    assert main(["init", str(model), "--data", str(data), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "no GPU here: a trial of" in err and "CPU thread" in err and "16 trials about" in err, err
    assert "lowered from 2000 examples" in err, err
    examples = load_recipe(out).train.budget.examples
    assert examples is not None and 64 <= examples < 2000
    assert "sized for this CPU" in out.read_text()


def test_init_says_where_a_relative_data_path_was_looked_for(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match=f"looked for '{tmp_path}/nope.jsonl'"):
        recipe_text("llmtune/tiny", "nope.jsonl")
