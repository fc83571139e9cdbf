"""The one value coercer (`llmtune.config.values`): what each type takes and how a refusal reads."""

from __future__ import annotations

import math

import pytest
from conftest import tiny_recipe_dict

from llmtune.config.recipe import recipe_from_dict
from llmtune.config.space import PARAMS, parse_spec
from llmtune.config.values import as_number, coerce, text_number, to_bool, to_float, to_int, to_str
from llmtune.errors import RecipeError


@pytest.mark.parametrize(("text", "number"), [
    ("3", 3), (" 3 ", 3), ("-2", -2), ("3.0", 3), ("0.05", 0.05), ("1e-4", 1e-4), ("1E3", 1000), ("1/9", 1 / 9),
    ("6/3", 2), ("-1/4", -0.25), ("1_000", 1000),
])
def test_text_numbers(text, number):
    got = text_number(text)
    assert got == pytest.approx(number) and type(got) is type(number)


@pytest.mark.parametrize("text", ["", "a ninth", "1/0", "1/2/3", "1.5/3", "3 4", "0x10"])
def test_text_that_is_no_number(text):
    assert text_number(text) is None


def test_text_that_is_no_finite_number():
    assert math.isnan(text_number("nan"))
    assert text_number("inf") == text_number("1e400") == math.inf
    assert text_number("-Infinity") == -math.inf


def test_as_number_reads_finite_text_numbers_only():
    assert as_number("1/8") == 0.125 and as_number("3") == 3
    assert as_number("a ninth") == "a ninth" and as_number("nan") == "nan"  # left for the caller to name
    assert as_number(2.5) == 2.5 and as_number(None) is None and as_number(True) is True


def test_bool():
    assert to_bool(True) == (True, None) and to_bool(False) == (False, None)
    assert to_bool(" True") == (True, None) and to_bool("false") == (False, None)
    for value in ("yes", "no", "on", "1"):  # YAML 1.1's words for a bool are not taken as text
        assert to_bool(value) == (value, f"{value!r} is not true or false")
    assert to_bool(1) == (1, "1 is not true or false")
    assert to_bool("yes") == ("yes", "'yes' is not true or false")


def test_int():
    assert to_int(8) == (8, None) and to_int(8.0) == (8, None) and to_int("16") == (16, None)
    assert to_int(8.5) == (8.5, "8.5 is not a whole number")
    assert to_int("2.5") == ("2.5", "'2.5' is not a whole number")
    assert to_int(True) == (True, "true is not a whole number")
    assert to_int(math.inf) == (math.inf, "Infinity is not a whole number")
    assert to_int([1]) == ([1], "[1] is not a whole number")


def test_float():
    assert to_float(2) == (2.0, None) and type(to_float(2)[0]) is float
    assert to_float("1e-4") == (1e-4, None)  # YAML 1.1 reads 1e-4 (no dot) as text
    assert to_float("1/9")[0] == pytest.approx(1 / 9)
    assert to_float("lots") == ("lots", "'lots' is not a number")
    assert to_float(False) == (False, "false is not a number")
    assert to_float(None) == (None, "null is not a number")
    nan_why = to_float(math.nan)[1]
    assert nan_why == "NaN is not a finite number; give a number"
    assert to_float("nan", like=0.05)[1] == "'nan' is not a finite number; give a number like 0.05"
    assert to_float(10**400)[1].endswith("characters) is not a finite number; give a number")  # past a float
    assert to_float(-math.inf, like=None)[1] == "-Infinity is not a finite number; give a number"
    assert to_float(1.0, like=0.1) == (1.0, None)


def test_str():
    assert to_str("4bit") == ("4bit", None)
    assert to_str(4) == (4, "4 is not text")
    why = to_str(False)[1]
    assert why.startswith("false is not text (YAML reads an unquoted no, off or false as false)")
    assert to_str(False, meant="none")[1].endswith("; write none")


def test_coerce_dispatches_by_type():
    assert coerce("3", int) == (3, None)
    assert coerce("3", float) == (3.0, None)
    assert coerce("true", bool) == (True, None)
    assert coerce(3, str) == (3, "3 is not text")
    with pytest.raises(TypeError):
        coerce(3, list)


def test_the_recipe_and_the_search_space_read_values_alike(tmp_path):
    """One rule for a recipe field and a searchable setting: text numbers are numbers, NaN is refused."""
    spec, problems = parse_spec(PARAMS["lora_r"], "16", "search.lora_r")
    assert problems == [] and spec.value == 16
    spec, problems = parse_spec(PARAMS["learning_rate"], {"low": "1e-5", "high": "1/100"}, "search.learning_rate")
    assert problems == [] and (spec.low, spec.high) == (1e-5, 0.01)
    _, problems = parse_spec(PARAMS["learning_rate"], "nan", "search.learning_rate")
    assert [p.message for p in problems] == ["'nan' is not a finite number; give a number like 0.0002"]
    _, problems = parse_spec(PARAMS["lora_r"], 10**400, "search.lora_r")  # a whole number, too large: its check
    assert "is too large" in problems[0].message
    _, problems = parse_spec(PARAMS["learning_rate"], 10**400, "search.learning_rate")  # was an OverflowError
    assert "is not a finite number" in problems[0].message
    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path, train={"eval_points": "2", "weight_decay": "1/100"}))
    assert recipe.train.eval_points == 2 and recipe.train.weight_decay == 0.01
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(tiny_recipe_dict(tmp_path, train={"eval_points": 2.5, "weight_decay": "nan"},
                                          model={"trust_remote_code": "yes"}))
    assert {str(p) for p in err.value.problems} >= {
        "train.eval_points: 2.5 is not a whole number",
        "model.trust_remote_code: 'yes' is not true or false",
    }
    assert any(str(p).startswith("train.weight_decay: 'nan' is not a finite number; give a number like")
               for p in err.value.problems)
