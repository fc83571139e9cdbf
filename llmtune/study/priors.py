"""Known-good starting points for a new search: published LoRA settings, snapped into the recipe's space.

A new study with `sampler: auto` runs these first (queued by the search loop), instead of uniform random
start-up trials.
"""

from __future__ import annotations

import math
from typing import Any

from llmtune.config.space import PARAMS, Choice, Fixed, SearchSpace
from llmtune.study.samplers import active_params

# Known-good starting points, from published LoRA results: the best LoRA learning rate is about 10x a
# full fine-tune's and nearly independent of the rank at a fixed alpha (e.g. 32) or with rsLoRA; adapters
# on all linear layers beat attention-only ones at equal parameters; QLoRA's recipe is lr 2e-4, r 64,
# alpha 16 on all linear layers; 3e-3 diverges for most models. Each prior is snapped into the recipe's
# space; the first ones are tried first (`prior_configs`).
PRIORS: tuple[dict[str, Any], ...] = (
    {"learning_rate": 2e-4, "lora_target_modules": "all-linear", "lora_alpha": 32.0},
    {"learning_rate": 1e-3, "lora_target_modules": "all-linear", "lora_alpha": 32.0},
    {"learning_rate": 5e-4, "lora_target_modules": "all-linear", "lora_alpha": 16.0},
)


def _snap(spec: Choice | Any, value: Any, log: bool) -> Any:
    """The value of `spec` (a Choice or a Range) nearest `value`: clipped into a range and onto its step;
    the nearest numeric option (on a log scale for a log setting), else the value if it is an option."""
    if isinstance(spec, Choice):
        options = list(spec.options)
        if value in options:
            return value
        numeric = [o for o in options if isinstance(o, int | float) and not isinstance(o, bool)]
        if isinstance(value, int | float) and not isinstance(value, bool) and numeric:
            if log and value > 0 and all(o > 0 for o in numeric):
                return min(numeric, key=lambda o: abs(math.log(o / value)))
            return min(numeric, key=lambda o: abs(o - value))
        return options[0]
    v = min(max(float(value), spec.low), spec.high)
    if spec.step:
        v = min(spec.high, spec.low + round((v - spec.low) / spec.step) * spec.step)
    return int(round(v)) if spec.is_int else v


def _middle(spec: Choice | Any) -> Any:
    """The middle of a setting: the middle option in order, or the (geometric, for log) midpoint."""
    if isinstance(spec, Choice):
        try:
            options = sorted(spec.options)
        except TypeError:
            options = list(spec.options)
        return options[(len(options) - 1) // 2]
    return _snap(spec, math.sqrt(spec.low * spec.high) if spec.log else (spec.low + spec.high) / 2, False)


def prior_configs(space: SearchSpace, n: int) -> list[dict[str, Any]]:
    """Up to `n` distinct configurations of `space` from `PRIORS`, each a value for every searched setting
    it activates: the prior's value snapped into the space, a middle rank, and the setting's default
    (snapped) or the middle of its range for the rest. What a new study runs first (`Search.prepare`)."""
    out: list[dict[str, Any]] = []
    for prior in PRIORS:
        if len(out) >= max(0, n):
            break
        values = {name: spec.value for name, spec in space.specs.items() if isinstance(spec, Fixed)}
        for name in space.searched:
            spec, param = space.specs[name], PARAMS[name]
            if name in prior:
                values[name] = _snap(spec, prior[name], param.log)
            elif name == "lora_r" or param.default is None:
                values[name] = _middle(spec)
            else:
                values[name] = _snap(spec, param.default, param.log)
        config = active_params(space, {name: values[name] for name in space.searched})
        if config not in out:
            out.append(config)
    return out
