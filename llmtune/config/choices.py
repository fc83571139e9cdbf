"""The names the recipe may choose from where the thing named lives in a later stage: optimizers
(`llmtune.harness.optimizers`), trackers (`llmtune.harness.trackers`), samplers (`llmtune.study.samplers`),
pruners (`llmtune.study.pruners`) and strategies (`llmtune.study.pbt`).

Kept here so that checking a recipe imports neither the search nor the harness (nor optuna, nor torch);
`tests/test_config_leaf.py` holds these names to the registries, so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmtune import hardware

if TYPE_CHECKING:  # pragma: no cover
    from llmtune.config.space import SearchSpace

OPTIMIZER_NAMES = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "sgd")   # train.optimizer
TRACKER_NAMES = ("tensorboard", "mlflow", "wandb")                            # train.report_to
STRATEGIES = ("search", "pbt")                                           # study.strategy

# The settings ASHA and Hyperband take (`llmtune.config.pruner_settings`).
RUNG_SETTINGS = ("eta", "min_fraction", "min_trials_per_rung", "metric_tolerance", "pause")
PRUNER_SETTINGS: dict[str, tuple[str, ...]] = {"none": (), "asha": RUNG_SETTINGS, "hyperband": RUNG_SETTINGS}  # study.pruner


@dataclass(frozen=True)
class SamplerLimits:
    """What a sampler cannot do, checked with the recipe (`sampler_problem`)."""

    multi_objective: bool = True  # handles several objectives
    discrete_only: bool = False   # needs every searched setting to be choices or a stepped range
    needs: str | None = None      # a module it imports, with its pip name after a colon


# study.sampler's choices: these and "auto" (`llmtune.study.samplers.make_sampler`).
SAMPLER_LIMITS: dict[str, SamplerLimits] = {
    "tpe": SamplerLimits(),
    "nsga2": SamplerLimits(),
    "gp": SamplerLimits(needs="scipy"),
    "random": SamplerLimits(),
    "grid": SamplerLimits(discrete_only=True),
    "cmaes": SamplerLimits(multi_objective=False, needs="cmaes"),
}
SAMPLER_CHOICES = ("auto", *SAMPLER_LIMITS)


def sampler_problem(name: str, space: SearchSpace, n_objectives: int) -> str | None:
    """Why sampler ``name`` (one of `SAMPLER_LIMITS`) cannot run this search, with the fix; None when it can."""
    limits = SAMPLER_LIMITS[name]
    if not limits.multi_objective and n_objectives > 1:
        return f"{name!r} handles one objective only, and the recipe has {n_objectives}; use auto, tpe or nsga2"
    if limits.discrete_only and space.grid() is None:
        return (f"{name!r} needs every searched setting to be a list of choices or a range with step; "
                "give the float ranges a step, or use auto")
    if limits.needs:
        module, _, pip_name = limits.needs.partition(":")
        if not hardware.installed(module):
            return f"{name!r} needs {module}: pip install {pip_name or module}"
    return None
