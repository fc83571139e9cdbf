"""config/ is a leaf: checking a recipe imports neither the search nor the harness. The names config keeps of
what later stages register (`llmtune.config.choices`) are held here to those registries, so they cannot drift."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
from conftest import tiny_recipe_dict

from llmtune.config import choices
from llmtune.config.pruner_settings import check_pruner_settings, check_rung_settings
from llmtune.config.recipe import CHOICES, recipe_from_dict
from llmtune.errors import RecipeError
from llmtune.harness.optimizers import OPTIMIZERS
from llmtune.harness.trackers import TRACKERS
from llmtune.study import samplers
from llmtune.study.pruners import PRUNERS, HyperbandPruner, make_pruner


def test_importing_the_recipe_loads_no_later_stage():
    code = ("import sys, llmtune.config.recipe, llmtune.config.space, llmtune.config.sections, "
            "llmtune.config.objectives, llmtune.config.problems\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('optuna', 'torch', 'numpy', 'transformers') "
            "or m.startswith(('llmtune.study', 'llmtune.harness', 'llmtune.trial', 'llmtune.deliver'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_the_recipe_is_checked_without_a_later_stage(tmp_path):
    """Validation itself (choices, pruner and PBT settings, the sampler's limits) stays within config."""
    bad = tiny_recipe_dict(tmp_path, study={"sampler": "grid", "pruner": "asha", "pruner_settings": {"eta": 1}},
                           search={"learning_rate": {"low": 1e-4, "high": 1e-2}})
    code = ("import sys, json\nfrom llmtune.config.recipe import recipe_from_dict\nfrom llmtune.errors import RecipeError\n"
            f"try:\n    recipe_from_dict(json.loads({repr(__import__('json').dumps(bad))}))\n"
            "except RecipeError as e:\n    print(len(e.problems))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('optuna', 'torch') "
            "or m.startswith(('llmtune.study', 'llmtune.harness'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["2", "[]"]


def test_optimizer_and_tracker_names_are_the_registries():
    assert choices.OPTIMIZER_NAMES == tuple(OPTIMIZERS)
    assert choices.TRACKER_NAMES == tuple(TRACKERS)
    assert CHOICES["train.optimizer"] == tuple(OPTIMIZERS)


def test_sampler_names_are_the_registry():
    assert tuple(choices.SAMPLER_LIMITS) == tuple(samplers.SAMPLERS)
    assert choices.SAMPLER_CHOICES == samplers.SAMPLER_CHOICES == ("auto", *samplers.SAMPLERS)
    assert CHOICES["study.sampler"] == ("auto", *samplers.SAMPLERS)


def test_a_sampler_limit_holds_for_the_registry_and_the_recipe(tmp_path):
    """The registry asks config's limits, so a recipe refused for one is refused by `make_sampler` too."""
    from llmtune.config.space import SearchSpace
    from llmtune.errors import SearchError

    continuous = SearchSpace.from_dict({"learning_rate": {"low": 1e-4, "high": 1e-2}})
    for name, limits in choices.SAMPLER_LIMITS.items():
        assert samplers.SAMPLERS[name].problem(continuous, 2) == choices.sampler_problem(name, continuous, 2)
        if limits.discrete_only or not limits.multi_objective:
            with pytest.raises(SearchError, match=f"study.sampler: '{name}'"):
                samplers.make_sampler(name, continuous, 2, 10, 0, False)
    with pytest.raises(RecipeError, match="'grid' needs every searched setting .* \\(here: search.learning_rate"):
        recipe_from_dict(tiny_recipe_dict(tmp_path, study={"sampler": "grid"},
                                          search={"learning_rate": {"low": 1e-4, "high": 1e-2}}))


def test_pruner_names_and_settings_are_the_registry():
    assert tuple(choices.PRUNER_SETTINGS) == tuple(PRUNERS)
    assert CHOICES["study.pruner"] == tuple(PRUNERS)
    for name, kind in PRUNERS.items():
        assert kind.settings == choices.PRUNER_SETTINGS[name]
        # the settings are exactly what the pruner's constructor takes (besides the study's objectives)
        init = kind.cls.__init__
        taken = [] if init is object.__init__ else [
            p for p in inspect.signature(init).parameters if p not in ("self", "objectives")]
        assert tuple(taken) == kind.settings, name
    rules = [p for p in inspect.signature(check_rung_settings).parameters]
    assert tuple(rules) == choices.RUNG_SETTINGS


def test_strategy_names_are_the_strategies(tmp_path):
    from llmtune.study.pbt import PBTStrategy
    from llmtune.study.strategy import make_strategy

    assert choices.STRATEGIES == ("search", "pbt")
    assert CHOICES["study.strategy"] == choices.STRATEGIES
    made = {}
    for name in choices.STRATEGIES:
        recipe = recipe_from_dict(tiny_recipe_dict(
            tmp_path, study={"strategy": name, "pruner": "none"},
            search={"learning_rate": {"low": 5e-4, "high": 5e-3, "log": True}, "lora_r": 8, "sequence_len": 128,
                    "micro_batch_size": 8}))
        made[name] = type(make_strategy(recipe))
    assert made["pbt"] is PBTStrategy and not issubclass(made["search"], PBTStrategy)


def test_pruner_settings_problems_come_all_at_once_in_the_words_of_make_pruner(tmp_path):
    settings = {"eta": 1, "min_fraction": "2", "reduction_factor": 3, "pause": "maybe"}
    problems = check_pruner_settings("asha", settings)
    assert problems == [
        "pruner 'asha' has no setting 'reduction_factor' (given 3); allowed settings: eta, min_fraction, "
        "min_trials_per_rung, metric_tolerance, pause",
        "pruner 'asha': setting 'eta'=1 is invalid: use an integer >= 2 (e.g. eta=3)",
        "pruner 'asha': setting 'min_fraction'=2 is invalid: use a number in (0, 1), e.g. min_fraction=1/9 "
        "(1 would never prune: use pruner 'none' for that)",
        "pruner 'asha': setting 'pause'='maybe' is invalid: use true (a stopped trial keeps its state and may be "
        "promoted later) or false (stopped trials are killed, nothing kept)",
    ]
    with pytest.raises(ValueError) as info:  # a direct caller gets the same lines
        make_pruner("asha", **settings)
    assert str(info.value).splitlines() == problems
    with pytest.raises(RecipeError) as err:  # and so does the recipe, each on its own line
        recipe_from_dict(tiny_recipe_dict(tmp_path, study={"pruner": "asha", "pruner_settings": settings}))
    assert [p.message for p in err.value.problems if p.path == "study.pruner_settings"] == problems
    assert check_pruner_settings("none", {"eta": 3}) == [
        "pruner 'none' has no setting 'eta' (given 3); it takes no settings"]
    assert check_pruner_settings("hyperband", {"eta": "4", "min_fraction": "1/27", "pause": "false"}) == []


def test_rung_settings_read_text_and_fill_in_defaults():
    values, problems = check_rung_settings(eta="4", min_fraction="1/8", pause="False")
    assert problems == []
    assert values == {"eta": 4, "min_fraction": 0.125, "min_trials_per_rung": 4, "metric_tolerance": 0.0,
                      "pause": False}
    assert check_rung_settings(eta=3.0)[0]["eta"] == 3
    # direct callers of a pruner class get the lines without the pruner's name, as before
    with pytest.raises(ValueError, match=r"^setting 'min_trials_per_rung'=0 is invalid: .*defaults to eta=3\)$"):
        HyperbandPruner(min_trials_per_rung=0)
