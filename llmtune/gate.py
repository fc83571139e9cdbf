"""The memory feasibility gate: predict a trial's peak GPU memory from its settings, before it runs.

Built on `llmtune.memory` (config only, no weights). Predictions are corrected by a calibration
fitted to the study's own measured GPU peaks once a few trials have run.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from llmtune.memory import GIB, MemoryCalibration, MemoryEstimate, estimate_memory
from llmtune.recipe import Recipe
from llmtune.space import Choice, Fixed, Range, resolve_target_modules, trial_settings

# Settings that change memory; the others (learning rate, dropout, warmup...) do not.
MEMORY_SETTINGS = ("quantization", "bnb_4bit_use_double_quant", "lora_r", "lora_target_modules", "micro_batch_size",
                   "sequence_len", "sample_packing", "gradient_checkpointing")


def _config_source(recipe: Recipe) -> str:
    from llmtune.tiny import resolve_model_name

    return resolve_model_name(recipe.model.name, log=None)


def estimate_for(recipe: Recipe, values: dict[str, Any], device: str = "cuda") -> MemoryEstimate:
    """The estimator's prediction for one trial of this recipe."""
    s = trial_settings(values)
    dtype = recipe.model.dtype if recipe.model.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return estimate_memory(
        _config_source(recipe), quantization=s["quantization"], bnb_4bit_quant_type=s["bnb_4bit_quant_type"],
        bnb_4bit_use_double_quant=bool(s["bnb_4bit_use_double_quant"]), dtype=dtype, lora_r=int(s["lora_r"]),
        lora_target_modules=resolve_target_modules(s["lora_target_modules"]), micro_batch_size=int(s["micro_batch_size"]),
        sequence_len=int(s["sequence_len"]), sample_packing=bool(s["sample_packing"]),
        gradient_checkpointing=bool(s["gradient_checkpointing"]), optimizer=recipe.train.optimizer, device=device,
        lora_dropout=float(s["lora_dropout"]),
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
