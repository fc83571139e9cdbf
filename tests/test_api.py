"""The API is the only door: the CLI and notebooks get the same checks, through the same functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_recipe_dict

import llmtune
from llmtune.cli import main

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "recipes" / "tiny-cpu.yaml")


def test_train_checks_values_like_the_cli(tmp_path):
    """A typo and a bad value in train()'s values are refused before anything runs, each named."""
    with pytest.raises(llmtune.RecipeError) as err:
        llmtune.train(tiny_recipe_dict(tmp_path), {"lora_rr": 8, "lora_r": "abc"})
    text = str(err.value)
    assert "search.lora_rr: unknown setting; did you mean 'lora_r'?" in text
    assert "search.lora_r: 'abc'" in text
    assert not (tmp_path / "run" / "train").exists()


def test_train_values_replace_their_rival_settings(tmp_path):
    recipe = tiny_recipe_dict(tmp_path, search={"lora_r": 8, "lora_alpha_ratio": [1, 2], "warmup_ratio": 0.1})
    settings = llmtune.api.trial_settings_for(recipe, {"lora_alpha": 32, "warmup_steps": 3})
    assert settings["lora_alpha"] == 32 and settings["warmup_steps"] == 3
    assert llmtune.api.trial_settings_for(recipe)["lora_alpha_ratio"] == 1  # first choice otherwise


def test_train_never_writes_the_storage_password(tmp_path, monkeypatch, tiny_model_path, tiny_data_path):
    monkeypatch.setenv("LLMTUNE_TEST_DB_PASSWORD", "s3cr3t-pw")
    monkeypatch.setenv("LLMTUNE_FAULT", "crash")  # the trial ends at once: only what it was handed matters
    recipe = tiny_recipe_dict(tmp_path, study={"storage": "postgresql://u:${LLMTUNE_TEST_DB_PASSWORD}@db:5432/x"})
    result = llmtune.train(recipe, output_dir=tmp_path / "t")
    assert result.status == "crashed"
    spec = (tmp_path / "t" / "spec.json").read_text()
    assert "s3cr3t-pw" not in spec and "postgresql://u:***@db:5432/x" in spec


class _Captured(Exception):
    pass


@pytest.fixture
def captured_search(monkeypatch):
    """Replaces the search loop: records what the API handed it, runs nothing."""
    seen: dict = {}

    class FakeSearch:
        def __init__(self, recipe, **kwargs):
            seen.update(kwargs, recipe=recipe)

        def run(self):
            raise _Captured

    monkeypatch.setattr("llmtune.study.loop.Search", FakeSearch)
    return seen


def test_search_expands_gpus_all_and_refuses_bad_entries(tmp_path, monkeypatch, captured_search):
    recipe = tiny_recipe_dict(tmp_path)
    monkeypatch.setattr("llmtune.hardware.gpu_count", lambda: 2)
    with pytest.raises(_Captured):
        llmtune.search(recipe, gpus=["all"])
    assert captured_search["gpus"] == ["0", "1"]
    with pytest.raises(_Captured):
        llmtune.search(recipe, gpus="0+1,2")
    assert captured_search["gpus"] == ["0+1", "2"]
    monkeypatch.undo()  # the real Search now: it checks each entry before anything runs
    for bad in ("gpu0", "0,,1", "cuda:1"):
        with pytest.raises(llmtune.SearchError, match="--gpus"):
            llmtune.search(recipe, gpus=bad)


def test_search_gpus_all_without_a_gpu_says_so(tmp_path, monkeypatch, captured_search):
    monkeypatch.setattr("llmtune.hardware.gpu_count", lambda: 0)
    with pytest.raises(llmtune.SearchError, match="--gpus all: no NVIDIA GPU is visible"):
        llmtune.search(tiny_recipe_dict(tmp_path), gpus="all")


@pytest.mark.parametrize("argv, problem", [
    (["--n-trials", "0"], "n_trials (--n-trials): 0 must be at least 1"),
    (["--n-trials", "-1"], "n_trials (--n-trials): -1 must be at least 1"),
    (["--workers", "0"], "workers (--workers): 0 must be at least 1"),
])
def test_search_refuses_counts_below_one(tmp_path, capfd, captured_search, argv, problem):
    assert main(["search", RECIPE, "--output-dir", str(tmp_path), *argv]) == 2
    err = capfd.readouterr().err
    assert problem in err and "Traceback" not in err
    assert "recipe" not in captured_search


@pytest.mark.parametrize("command", ["validate", "estimate", "search", "train"])
def test_set_fixes_a_searched_setting_on_every_recipe_command(tmp_path, capfd, monkeypatch, captured_search, command):
    """--set lora_r=8 means search.lora_r=8 on every command that takes a recipe."""
    handed: dict = {}

    def fake_train(recipe, values=None, **kwargs):
        handed["recipe"] = recipe
        raise _Captured

    monkeypatch.setattr("llmtune.api.train", fake_train)
    argv = [command, RECIPE, "--set", "lora_r=8", "--set", "search.sequence_len=64"]
    if command in ("search", "train"):
        argv += ["--output-dir", str(tmp_path)]
    if command in ("search", "train"):
        with pytest.raises(_Captured):
            main(argv)
        recipe = (captured_search if command == "search" else handed)["recipe"]
        assert recipe.space.complete({})["lora_r"] == 8 and "lora_r" not in recipe.space.searched
        assert recipe.space.complete({})["sequence_len"] == 64
        return
    assert main(argv) == 0
    out = capfd.readouterr().out
    if command == "validate":
        assert "searched:" in out and "lora_r" not in out.split("searched:")[1]
    else:  # the memory corners no longer vary the rank
        assert "lora_r" not in out.splitlines()[1] if len(out.splitlines()) > 1 else True
        assert main([*argv, "--json"]) == 0
        rows = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
        assert rows and all("lora_r" not in row for row in rows)


def test_set_with_an_unknown_bare_key_names_the_fix(capfd):
    assert main(["validate", RECIPE, "--set", "lora_rank=8"]) == 2
    err = capfd.readouterr().err
    assert "lora_rank: is neither a searchable setting nor a recipe section; did you mean 'lora_r'?" in err


def test_every_user_error_is_an_llmtune_error_and_bugs_keep_their_traceback(monkeypatch, capfd):
    for cls in (llmtune.RecipeError, llmtune.DataError, llmtune.SearchError, llmtune.HubError,
                llmtune.MissingDependency):
        assert issubclass(cls, llmtune.LlmtuneError)

    def broken(recipe, overrides=None):
        raise ValueError("a bug deep inside")

    monkeypatch.setattr("llmtune.api.validate", broken)
    with pytest.raises(ValueError, match="a bug deep inside"):
        main(["validate", RECIPE])
