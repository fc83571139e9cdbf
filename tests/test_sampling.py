"""UniqueSampler in conditional spaces: a configuration is the settings a trial actually has."""

from __future__ import annotations

from typing import Any

import optuna
import pytest

from llmtune.config.space import SearchSpace
from llmtune.study.samplers import UniqueSampler, default_sampler

# bnb_4bit_* exist only with quantization 4bit: 2 ranks x (none, 8bit, 4 kinds of 4bit) = 12 configurations,
# though the product of all choices is 24.
CONDITIONAL = {"lora_r": [4, 8], "quantization": ["none", "8bit", "4bit"],
               "bnb_4bit_quant_type": ["nf4", "fp4"], "bnb_4bit_use_double_quant": [True, False]}


def _loss(values: dict[str, Any]) -> float:
    return values["lora_r"] * (1 + ["none", "8bit", "4bit"].index(values["quantization"])) \
        + (values["bnb_4bit_quant_type"] == "fp4") + 0.5 * values["bnb_4bit_use_double_quant"]


@pytest.fixture(autouse=True)
def _quiet():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_sampler_never_reruns_the_active_settings_of_a_conditional_space(seed):
    space = SearchSpace.from_dict(CONDITIONAL)
    sampler, _ = default_sampler(space, n_objectives=1, n_trials=12, seed=seed)
    assert isinstance(sampler, UniqueSampler)
    study = optuna.create_study(sampler=sampler)
    for _ in range(12):  # 12 = every configuration: each trial still had an untried one to run
        trial = study.ask()
        study.tell(trial, _loss(space.suggest(trial)))
    ran = [frozenset(t.params.items()) for t in study.trials]
    assert len(set(ran)) == 12, sorted(map(sorted, ran))
    assert {dict(r).get("bnb_4bit_quant_type") for r in ran} == {None, "nf4", "fp4"}
    assert all(("bnb_4bit_quant_type" in dict(r)) == (dict(r)["quantization"] == "4bit") for r in ran)
    # With every configuration run, a further trial repeats one instead of failing.
    trial = study.ask()
    study.tell(trial, _loss(space.suggest(trial)))
    assert frozenset(study.trials[-1].params.items()) in set(ran)


class _Proposes(optuna.samplers.BaseSampler):
    """Proposes one fixed configuration every time, as a sampler that has narrowed in on it would."""

    def __init__(self, proposal: dict[str, Any], search_space: dict[str, optuna.distributions.BaseDistribution]):
        self.proposal, self.search_space = proposal, search_space

    def infer_relative_search_space(self, study, trial):
        return dict(self.search_space)

    def sample_relative(self, study, trial, search_space):
        return dict(self.proposal)

    def sample_independent(self, study, trial, param_name, param_distribution):
        raise AssertionError(f"{param_name} should come from the relative proposal")


def _ask(space_dict: dict[str, list[Any]], tried: list[dict[str, Any]], proposal: dict[str, Any]) -> dict[str, Any]:
    """The parameters the next trial gets when the wrapped sampler keeps proposing `proposal`."""
    space = SearchSpace.from_dict(space_dict)
    dists = {n: optuna.distributions.CategoricalDistribution(c) for n, c in space_dict.items()}
    study = optuna.create_study(sampler=UniqueSampler(_Proposes(proposal, dists), seed=0))
    for params in tried:
        study.add_trial(optuna.trial.create_trial(params=params, distributions={n: dists[n] for n in params}, value=1.0))
    study.ask()  # a trial another worker has just claimed: no parameters yet, so it repeats nothing
    trial = study.ask()
    space.suggest(trial)
    return trial.params


def test_a_proposal_that_differs_only_in_inactive_settings_is_a_repeat():
    space = {"lora_r": [4, 8], "quantization": ["none", "4bit"], "bnb_4bit_quant_type": ["nf4", "fp4"]}
    plain = {"lora_r": 4, "quantization": "none"}
    # bnb_4bit_quant_type is never asked for without 4bit, so this proposal would train `plain` again.
    got = _ask(space, [plain], {**plain, "bnb_4bit_quant_type": "fp4"})
    assert got != plain and len(got) == (3 if got["quantization"] == "4bit" else 2)
    # Differing in an active setting is new: the proposal runs as proposed.
    nf4 = {"lora_r": 4, "quantization": "4bit", "bnb_4bit_quant_type": "nf4"}
    assert _ask(space, [nf4, plain], {**nf4, "bnb_4bit_quant_type": "fp4"}) == {**nf4, "bnb_4bit_quant_type": "fp4"}
    assert _ask(space, [nf4], {**plain, "bnb_4bit_quant_type": "nf4"}) == plain


def test_untried_draws_only_configurations_that_have_not_run():
    space = {"lora_r": [4, 8], "quantization": ["none", "4bit"], "bnb_4bit_quant_type": ["nf4", "fp4"]}
    every = [{"lora_r": r, "quantization": "none"} for r in (4, 8)] + \
        [{"lora_r": r, "quantization": "4bit", "bnb_4bit_quant_type": q} for r in (4, 8) for q in ("nf4", "fp4")]
    for left in every:  # all but one configuration tried: whatever was proposed, the one left is what runs
        tried = [c for c in every if c != left]
        assert _ask(space, tried, {"bnb_4bit_quant_type": "fp4", **tried[0]}) == left
