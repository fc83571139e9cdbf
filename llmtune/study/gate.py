"""The memory feasibility gate: predict a trial's peak GPU memory from its settings, before it runs,
and decide whether it may run (`MemoryGate`).

Built on `llmtune.study.memory` (config only, no weights). Predictions are corrected by a calibration
(`llmtune.study.calibration`) fitted to the study's own measured GPU peaks once a few trials have run.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from llmtune import hardware
from llmtune.config.recipe import Recipe
from llmtune.config.settings import TrialSettings
from llmtune.config.space import Choice, Fixed, Range, resolve_target_modules
from llmtune.study.attrs import INFO, METRICS_KEY, STATUS
from llmtune.study.calibration import MemoryCalibration
from llmtune.study.memory import GIB, MemoryEstimate, estimate_memory
from llmtune.trial.endings import COMPLETE

# Settings that change memory; the others (learning rate, dropout, warmup...) do not.
MEMORY_SETTINGS = ("quantization", "bnb_4bit_use_double_quant", "lora_r", "lora_target_modules", "micro_batch_size",
                   "sequence_len", "sample_packing", "gradient_checkpointing")


def _config_source(recipe: Recipe) -> str:
    from llmtune.builtin.names import resolve_model_name

    return resolve_model_name(recipe.model.name, log=None)


def estimate_for(recipe: Recipe, values: dict[str, Any], device: str = "cuda") -> MemoryEstimate:
    """The estimator's prediction for one trial of this recipe."""
    s = TrialSettings.of(values)
    dtype = recipe.model.dtype if recipe.model.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return estimate_memory(
        _config_source(recipe), quantization=s.quantization, bnb_4bit_quant_type=s.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=s.bnb_4bit_use_double_quant, dtype=dtype, lora_r=s.lora_r,
        lora_target_modules=resolve_target_modules(s.lora_target_modules), micro_batch_size=s.micro_batch_size,
        sequence_len=s.sequence_len, sample_packing=s.sample_packing,
        gradient_checkpointing=s.gradient_checkpointing, optimizer=recipe.train.optimizer, device=device,
        lora_dropout=s.lora_dropout,
    )


def predicted_peak_gb(recipe: Recipe, values: dict[str, Any], calibration: MemoryCalibration | None = None) -> float:
    est = estimate_for(recipe, values)
    total = calibration.apply(est.total) if calibration else est.total
    return total / GIB


def calibration_from_trials(pairs: list[tuple[float, float]]) -> MemoryCalibration:
    """Fit on (predicted GB, measured GB) of completed GPU trials."""
    return MemoryCalibration.fit([(int(p * GIB), int(m * GIB)) for p, m in pairs if p > 0 and m > 0])


def representative_points(recipe: Recipe, limit: int = 64) -> list[dict[str, Any]]:
    """Memory-relevant corners of the space: every choice, and both ends of each range."""
    space = recipe.space
    options: dict[str, list[Any]] = {}
    for name in MEMORY_SETTINGS:
        spec = space.specs[name]
        if isinstance(spec, Fixed):
            continue
        if isinstance(spec, Choice):
            options[name] = list(spec.options)
        elif isinstance(spec, Range):
            ends = [spec.low, spec.high]
            options[name] = [int(v) for v in ends] if spec.is_int else ends
    names = list(options)
    combos = list(itertools.product(*(options[n] for n in names))) or [()]
    if len(combos) > limit:  # keep the spread: evenly spaced picks through the full product
        step = len(combos) / limit
        combos = [combos[math.floor(i * step)] for i in range(limit)]
    return [space.complete(dict(zip(names, combo, strict=True))) for combo in combos]


class MemoryGate:
    """Decides, before a trial runs, whether its predicted peak GPU memory is over the recipe's budget
    (``constraints.peak_memory_gb.max``). Active on GPUs (``study.memory_gate: auto``), or always with ``on``."""

    def __init__(self, recipe: Recipe, log: Callable[[str], None]):
        self.recipe, self.log = recipe, log
        mode = recipe.study.memory_gate
        self.active = mode == "on" or (mode == "auto" and recipe.train.device != "cpu" and hardware.gpu_count() > 0)
        self.limit = recipe.constraints.get("peak_memory_gb", {}).get("max")

    def check(self, study: optuna.Study, values: dict[str, Any]) -> tuple[str | None, float | None]:
        """(why the config must not run, or None; its predicted peak GPU GB, or None when unknown)."""
        pairs = [(t.user_attrs[METRICS_KEY]["predicted_memory_gb"], t.user_attrs[METRICS_KEY]["peak_memory_gb"])
                 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if t.user_attrs.get(STATUS) == COMPLETE and t.user_attrs.get(INFO, {}).get("device") == "cuda"
                 and {"predicted_memory_gb", "peak_memory_gb"} <= set(t.user_attrs.get(METRICS_KEY, {}))]
        try:
            predicted = predicted_peak_gb(self.recipe, values, calibration_from_trials(pairs) if pairs else None)
        except Exception as e:  # an architecture the estimator cannot read must never block a search
            self.log(f"memory estimate unavailable: {type(e).__name__}: {e}")
            return None, None
        if self.limit is not None and self.active and predicted > self.limit:
            return f"predicted peak memory {predicted:.2f} GB is over the budget of {self.limit:g} GB; not run", predicted
        return None, predicted
