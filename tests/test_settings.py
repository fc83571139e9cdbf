"""`TrialSettings`: the typed settings the harness trains with, kept in step with `PARAMS`."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from llmtune.config.settings import TrialSettings
from llmtune.config.space import PARAMS, SearchSpace


def test_fields_are_params_in_order_with_their_types():
    hints = typing.get_type_hints(TrialSettings)
    assert [f.name for f in dataclasses.fields(TrialSettings)] == list(PARAMS)
    for name, param in PARAMS.items():
        unset = param.default is None and name != "lora_alpha"  # alpha is resolved from the ratio: never None
        want = param.type | None if unset else param.type
        assert hints[name] == want, name


def test_of_types_values_and_resolves_alpha():
    s = TrialSettings.of({"learning_rate": 1, "lora_r": 8.0, "lora_alpha_ratio": 1.5, "sample_packing": True})
    assert s.learning_rate == 1.0 and isinstance(s.learning_rate, float)
    assert s.lora_r == 8 and isinstance(s.lora_r, int)
    assert s.lora_alpha == 12.0  # ratio x rank when alpha is unset
    assert s.sample_packing is True and s.quantization == "none"  # the rest: PARAMS' defaults
    assert TrialSettings.of({"lora_r": 8, "lora_alpha": 32}).lora_alpha == 32.0  # an absolute alpha wins
    assert TrialSettings.of(s.as_dict()) == s


def test_of_refuses_a_name_that_is_not_a_setting():
    with pytest.raises(TypeError, match="learnig_rate"):
        TrialSettings.of({"learnig_rate": 1e-4})


def test_a_space_assignment_becomes_settings():
    space = SearchSpace.from_dict({"learning_rate": {"low": 1e-5, "high": 1e-3}, "lora_r": [4, 64]})
    s = TrialSettings.of(space.complete({"lora_r": 64}))
    assert s.lora_r == 64 and 1e-5 < s.learning_rate < 1e-3 and s.lora_alpha == 128.0


def test_global_batch_and_warmup():
    assert TrialSettings.of({"micro_batch_size": 4}).global_batch(3) == 12
    assert TrialSettings.of({"micro_batch_size": 4, "batch_size": 32}).global_batch(3) == 32
    assert TrialSettings.of({"warmup_ratio": 0.05}).warmup(100) == 5
    assert TrialSettings.of({"warmup_ratio": 0.05}).warmup(101) == 6  # rounded up
    assert TrialSettings.of({"warmup_steps": 7, "warmup_ratio": 0.5}).warmup(100) == 7
