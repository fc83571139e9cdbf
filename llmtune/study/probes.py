"""Execution settings measured by short probes instead of searched with full trials.

Execution settings (`llmtune.config.space` PARAMS with ``execution=True``: sample packing, micro batch
size, gradient checkpointing, Liger's kernels) change how a step's examples are laid out or which kernels
compute them, never what the model learns (tests/test_execution.py; Liger's: tests/test_gpu.py). So under
``study.execution: probe`` (the default) the sampler searches the learning settings only, and for each
learning configuration the search

1. probes every execution variant (each choice of the searched execution settings) in its own trial
   process: a few optimizer steps plus the plan's largest step (`harness.train.probe_indices`), so the
   probe's peak memory is the full run's, and its seconds project the full run's; a variant over the
   memory budget (the gate's estimate, or its probe's measured peak against a constraint) or out of
   memory is found here, in seconds;
2. trains the learning configuration once, fully, in the fastest feasible variant (the Optuna trial);
3. records every other variant as a trial of its own (`VARIANT_OF` the full trial, counted against no
   n_trials) with the full trial's eval loss, curve-independent metrics (latency, trainable parameters)
   and adapter, and its probe's memory and speed, the speed scaled by how the full trial's own probe
   compared with the full trial. The Pareto front thus holds every (learning, execution) pair.

A variant's adapter is the full trial's (the same learning), so exporting it exports that adapter.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution

from llmtune.config.recipe import Recipe
from llmtune.config.space import EXECUTION, Choice, Fixed, SearchSpace
from llmtune.study import engine
from llmtune.study.attrs import DIR, PROBES, SETTINGS, VARIANT_OF
from llmtune.study.record import KEPT_INFO, add_variant, constraint_values
from llmtune.trial.endings import COMPLETE, ENDINGS, OVER_BUDGET, not_run
from llmtune.trial.result import TrialResult, finite

PROBE_STEPS = 2  # timed steps after the warm-up step; the largest step comes on top
# What a variant takes from the full trial: measured after training, the same in every layout (a trial
# measures them with the model's own kernels, Liger's taken out: `harness.model.apply_liger`).
FROM_FULL = ("eval_loss", "latency_ms", "ttft_ms", "generation_memory_gb", "trainable_params")
SCALED = ("train_throughput", "train_time_s")  # probe value x (full trial / its own probe)


def probed_settings(space: SearchSpace) -> list[str]:
    """The execution settings searched as a list of choices: the ones probes measure."""
    return [n for n in EXECUTION if isinstance(space.specs.get(n), Choice)]


def variants(space: SearchSpace) -> list[dict[str, Any]]:
    """Every combination of the probed settings' choices, in the recipe's order."""
    names = probed_settings(space)
    options = [space.specs[n].options for n in names]  # type: ignore[union-attr]  # Choice, checked above
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*options)]


def distributions(space: SearchSpace) -> dict[str, CategoricalDistribution]:
    """The probed settings as Optuna parameters: how a trial's chosen variant is recorded on it."""
    return {n: CategoricalDistribution(list(space.specs[n].options)) for n in probed_settings(space)}  # type: ignore[union-attr]


def learning_space(space: SearchSpace) -> SearchSpace:
    """The space the sampler sees under probes: the probed settings fixed at their first choice (a
    placeholder; each trial's variant replaces it)."""
    specs = dict(space.specs)
    for n in probed_settings(space):
        specs[n] = Fixed(specs[n].options[0])  # type: ignore[union-attr]
    return SearchSpace(specs)


def enabled(recipe: Recipe) -> bool:
    return recipe.study.execution == "probe" and len(variants(recipe.space)) > 1


@dataclass
class Probed:
    """One execution variant of a learning configuration: its settings and what its probe found."""

    settings: dict[str, Any]
    result: TrialResult
    feasible: bool = False
    why: str = ""

    def as_record(self) -> dict[str, Any]:
        return {"settings": self.settings, "status": self.result.status, "reason": self.result.reason or self.why,
                "feasible": self.feasible, "metrics": {k: v for k, v in self.result.metrics.items() if finite(v)},
                "wall_s": self.result.info.get("process_wall_s") or self.result.info.get("wall_time_s")}


@dataclass
class Probes:
    """Probing one learning configuration's execution variants and recording them."""

    recipe: Recipe
    run_probe: Callable[[dict[str, Any], Path], TrialResult]  # (settings, folder) -> the probe's result
    gate: Callable[[dict[str, Any]], tuple[str | None, float | None]]  # the memory gate's verdict
    found: list[Probed] = field(default_factory=list)

    def probe(self, study: optuna.Study, trial: optuna.Trial, values: dict[str, Any], folder: Path) -> Probed | None:
        """Probe every variant of ``values``; the fastest feasible one (None: none fits)."""
        self.found = []
        for i, variant in enumerate(variants(self.recipe.space)):
            settings = {**values, **variant}
            reason, predicted = self.gate(settings)
            if reason:
                probed = Probed(settings, not_run(OVER_BUDGET, reason, settings, predicted))
            else:
                probed = Probed(settings, self.run_probe(settings, folder / f"probe-{i}"))
                violated = {k: v for k, v in constraint_values(self.recipe, probed.result).items()
                            if k != "infeasible" and v > 0}
                probed.feasible = probed.result.status == COMPLETE and not violated
                if probed.result.status == COMPLETE and violated:
                    probed.why = "its probe measured " + ", ".join(
                        f"{k} {probed.result.metrics[k]:.4g}" for k in violated) + " (over the constraint)"
            self.found.append(probed)
        fits = [p for p in self.found if p.feasible]
        engine.storage(study).set_trial_user_attr(engine.trial_id(trial), PROBES, [p.as_record() for p in self.found])
        return min(fits, key=lambda p: p.result.metrics.get("train_time_s", float("inf"))) if fits else None

    @classmethod
    def restored(cls, recipe: Recipe, records: Any) -> Probes:
        """The probes a paused trial stored (`PROBES`), for its continuation to record the variants when it
        completes; nothing is probed or gated again."""
        def never(*args: Any) -> Any:
            raise RuntimeError("restored probes do not probe again")

        found = [Probed(dict(r["settings"]), TrialResult(status=r["status"], reason=r.get("reason") or "",
                                                         settings=dict(r["settings"]), metrics=dict(r["metrics"])),
                        bool(r.get("feasible")), r.get("reason") or "")
                 for r in records or [] if isinstance(r, dict) and "settings" in r]
        return cls(recipe, never, never, found)

    def variant(self, settings: dict[str, Any]) -> Probed | None:
        """The probed variant whose execution settings are ``settings``' (None if none was probed)."""
        names = probed_settings(self.recipe.space)
        return next((p for p in self.found if all(p.settings.get(n) == settings.get(n) for n in names)), None)

    def summary(self) -> str:
        """Why no variant could run, in one line."""
        return "; ".join(f"{_describe(p.settings)}: {p.result.status} ({p.why or p.result.reason})"
                         for p in self.found)

    def record(self, study: optuna.Study, trial: optuna.Trial, chosen: Probed, full: TrialResult) -> list[int]:
        """Record every variant but ``chosen`` as a trial of its own; returns their numbers."""
        parent = engine.storage(study).get_trial(engine.trial_id(trial))
        if full.status != COMPLETE:
            return []  # pruned, diverged or failed: its variants learned the same and would end the same
        numbers = []
        for p in self.found:
            if p is chosen or ENDINGS[p.result.status].optuna_state != "COMPLETE":
                continue  # a crashed probe says nothing of the layout: it stays in the full trial's PROBES
            result = self._variant_result(p, chosen, full)
            numbers.append(_add_variant(study, self.recipe, parent, p.settings, result))
        return numbers

    def _variant_result(self, p: Probed, chosen: Probed, full: TrialResult) -> TrialResult:
        if p.result.status != COMPLETE:  # this layout never trained: only what does not depend on it
            known = {"trainable_params": full.metrics.get("trainable_params", float("nan")), **p.result.metrics}
            metrics = {k: float(v) for k, v in known.items() if finite(v)}
        else:
            metrics = {k: full.metrics[k] for k in FROM_FULL if k in full.metrics}
            metrics["peak_memory_gb"] = p.result.metrics["peak_memory_gb"]
            for k in SCALED:
                mine, theirs, measured = (float(r.metrics.get(k, float("nan"))) for r in (p.result, chosen.result, full))
                if finite(mine) and finite(theirs) and finite(measured) and theirs:
                    metrics[k] = mine * measured / theirs
        status = p.result.status
        reason = (f"execution variant of trial {{parent}}: its eval loss and adapter, this layout's memory and speed "
                  f"from a probe of {PROBE_STEPS} steps and the largest step") if status == COMPLETE else \
            (p.result.reason or p.why)
        return TrialResult(status=status, reason=reason, settings=p.settings, metrics=metrics,
                           curve=[pt for pt in full.curve if pt[0] == 0.0],  # the untrained loss, for penalties
                           info={k: v for k, v in {**full.info, "probe": p.as_record()}.items()
                                 if k in (*KEPT_INFO, "probe")})


def _describe(settings: dict[str, Any]) -> str:
    return ", ".join(f"{n}={settings[n]}" for n in EXECUTION if n in settings)


def _add_variant(study: optuna.Study, recipe: Recipe, parent: optuna.trial.FrozenTrial, settings: dict[str, Any],
                 result: TrialResult) -> int:
    """One variant as a finished trial (`record.add_variant`): the parent's learning params plus its
    execution settings."""
    result.reason = result.reason.replace("{parent}", str(parent.number))
    probed = distributions(recipe.space)
    params = {**{k: v for k, v in parent.params.items() if k not in probed}, **{n: settings[n] for n in probed}}
    dists = {**{k: v for k, v in parent.distributions.items() if k not in probed}, **probed}
    extra = {SETTINGS: json.loads(json.dumps(settings, default=str)), DIR: parent.user_attrs.get(DIR),
             VARIANT_OF: parent.number}
    return add_variant(study, recipe, params, dists, result, extra)
