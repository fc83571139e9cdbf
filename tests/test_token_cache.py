"""Tokenized data cached across a search's trials: the same examples as encoding anew, or no cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import tiny_recipe_dict

from llmtune.config.recipe import recipe_from_dict
from llmtune.harness import data as D
from llmtune.harness import model as M
from llmtune.harness import token_cache as T
from llmtune.harness.data_sources import load_splits


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_path, tiny_data_path):
    recipe = recipe_from_dict(tiny_recipe_dict(Path(tmp_path_factory.mktemp("tokens"))))
    return recipe, M.load_tokenizer(recipe.model), load_splits(recipe.data)


def cached(setup, cache_dir, max_len=128, cfg=None):
    recipe, tokenizer, splits = setup
    return T.encode_cached(splits.train, cfg or recipe.data, tokenizer, max_len, cache_dir=cache_dir,
                           data_fingerprint=splits.fingerprint, split="train")


def test_a_second_trial_reads_the_first_ones_examples_unchanged(setup, tmp_path, monkeypatch):
    recipe, tokenizer, splits = setup
    fresh = D.encode_all(splits.train, recipe.data, tokenizer, 128)
    assert fresh[0] and any(e.truncated for e in fresh[0])  # the cut to max_len is part of what is cached
    assert cached(setup, tmp_path) == fresh
    assert len(list(tmp_path.glob("train-128-*.npz"))) == 1

    def no_encoding(*a, **k):
        raise AssertionError("encoded again instead of reading the cache")

    monkeypatch.setattr(T, "encode_all", no_encoding)
    assert cached(setup, tmp_path) == fresh


def test_anything_the_encoding_depends_on_gives_a_new_entry(setup, tmp_path):
    recipe, tokenizer, splits = setup
    cached(setup, tmp_path)
    longer = cached(setup, tmp_path, max_len=256)
    assert longer == D.encode_all(splits.train, recipe.data, tokenizer, 256)
    all_tokens = dataclasses.replace(recipe.data, train_on="all")
    assert cached(setup, tmp_path, cfg=all_tokens) == D.encode_all(splits.train, all_tokens, tokenizer, 128)
    assert len(list(tmp_path.glob("*.npz"))) == 3


def test_a_damaged_or_unwritable_cache_costs_time_not_the_trial(setup, tmp_path):
    recipe, tokenizer, splits = setup
    fresh = D.encode_all(splits.train, recipe.data, tokenizer, 128)
    cached(setup, tmp_path)
    (entry,) = tmp_path.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])  # cut short, as by a crash mid-write on another machine
    assert cached(setup, tmp_path) == fresh
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert cached(setup, blocked / "tokens") == fresh


def test_a_tokenizer_without_a_complete_fingerprint_is_not_cached(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "tokenizer_fingerprint", lambda tokenizer: None)
    cached(setup, tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_new_rendering_version_is_a_new_entry(setup, tmp_path, monkeypatch):
    cached(setup, tmp_path)
    monkeypatch.setattr(T, "RENDER_VERSION", T.RENDER_VERSION + 1)  # formats.py bumps it when rendering changes
    cached(setup, tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2
