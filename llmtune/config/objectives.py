"""What a search can optimise: the metrics the harness measures, and the recipe's objectives,
constraints and choice of the best trial, checked against them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from llmtune.config.problems import did_you_mean, fmt, one_of

if TYPE_CHECKING:  # pragma: no cover
    from llmtune.config.recipe import Recipe

# Objective names, their direction and unit. The harness measures each of these itself.
METRICS: dict[str, tuple[str, str]] = {
    "eval_loss": ("minimize", "mean token cross-entropy on the fixed eval set"),
    "peak_memory_gb": ("minimize", "peak training memory, GiB (CUDA reserved / NVML on GPU, RSS on CPU)"),
    "train_throughput": ("maximize", "real (non-padding) training tokens per second"),
    "latency_ms": ("minimize", "ms per generated token (greedy, with the adapter)"),
    "ttft_ms": ("minimize", "time to first token, ms"),
    "generation_memory_gb": ("minimize", "peak memory during generation, GiB"),
    "trainable_params": ("minimize", "LoRA parameter count"),
    "train_time_s": ("minimize", "seconds spent in training steps"),
}
# Measured on generations after training, only while measure.latency is on (`harness/train.py`).
GENERATION_METRICS = ("latency_ms", "ttft_ms", "generation_memory_gb")
METRIC_ALIASES = {"peak_memory": "peak_memory_gb", "latency": "latency_ms", "throughput": "train_throughput",
                  "memory": "peak_memory_gb", "loss": "eval_loss"}
DIRECTIONS = ("minimize", "maximize")


def _canonical_metric(name: str) -> str:
    return METRIC_ALIASES.get(name, name)


def check_objectives(recipe: Recipe, add: Callable[[str, str], None]) -> None:
    """Check and normalise ``objectives``, ``constraints`` and ``select`` in place (aliases become
    metric names, a bare constraint number an upper limit); each problem goes to ``add(path, message)``."""
    raw = recipe.objectives
    objectives: dict[str, str] = {}
    if isinstance(raw, list):  # a list of names takes each metric's natural direction
        raw = {str(n): None for n in raw}
    if not isinstance(raw, dict) or not raw:
        add("objectives", f"{fmt(raw)} must name at least one metric, e.g. {{eval_loss: minimize}}")
        raw = {}
    for name, direction in raw.items():
        canon = _canonical_metric(str(name))
        if canon not in METRICS:
            add(f"objectives.{name}", f"unknown metric{did_you_mean(str(name), list(METRICS) + list(METRIC_ALIASES))} (known: {', '.join(METRICS)})")
            continue
        natural = METRICS[canon][0]
        direction = natural if direction is None else direction
        if direction not in DIRECTIONS:
            add(f"objectives.{name}", one_of(direction, list(DIRECTIONS)))
            continue
        if canon in GENERATION_METRICS and not recipe.measure.latency:
            add(f"objectives.{name}", f"{canon} is not measured: measure.latency is false, so no trial would report it; "
                                      "set measure.latency: true, or drop this objective")
        if canon in objectives:
            alias = f"means {canon} (an alias), which" if canon != name else f"names {canon}, which"
            add(f"objectives.{name}", f"{alias} objectives already names; give each metric once")
        objectives[canon] = direction
    recipe.objectives = objectives

    constraints: dict[str, dict[str, float]] = {}
    if not isinstance(recipe.constraints, dict):
        add("constraints", f"{fmt(recipe.constraints)} must be a mapping like {{peak_memory_gb: {{max: 22}}}}")
    else:
        for name, bound in recipe.constraints.items():
            canon = _canonical_metric(str(name))
            path = f"constraints.{name}"
            if canon not in METRICS:
                add(path, f"unknown metric{did_you_mean(str(name), list(METRICS))} (known: {', '.join(METRICS)})")
                continue
            if canon in GENERATION_METRICS and not recipe.measure.latency:
                add(path, f"{canon} is not measured: measure.latency is false, so no trial would have it and every "
                          "one would be infeasible; set measure.latency: true, or drop the constraint")
                continue
            if isinstance(bound, (int, float)) and not isinstance(bound, bool):
                bound = {"max": bound}  # a bare number reads as an upper limit, the common case
            if not isinstance(bound, dict) or not bound or set(bound) - {"min", "max"}:
                add(path, f"{fmt(bound)} must be {{max: x}} and/or {{min: y}}")
                continue
            clean: dict[str, float] = {}
            for k, v in bound.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    add(f"{path}.{k}", f"{fmt(v)} is not a number")
                else:
                    clean[k] = float(v)
            if "min" in clean and "max" in clean and clean["min"] > clean["max"]:
                add(path, f"min {clean['min']} is above max {clean['max']}")
            constraints[canon] = clean
    recipe.constraints = constraints

    by = recipe.select.by or (next(iter(objectives)) if objectives else "")
    if by and by != "knee":
        by = _canonical_metric(by)
        if by not in objectives:
            add("select.by", f"{fmt(recipe.select.by)} is not an objective of this recipe; use one of {', '.join(objectives)} or knee")
    recipe.select.by = by
    for name, weight in recipe.select.weights.items():
        if _canonical_metric(name) not in objectives:
            add(f"select.weights.{name}", f"is not an objective; use one of {', '.join(objectives)}")
        elif isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            add(f"select.weights.{name}", f"{fmt(weight)} must be a finite number >= 0 (how much that objective counts "
                                          "in the knee's distance; 1 by default, 0 leaves it out)")
    weights = recipe.select.weights
    if weights and len(objectives) > 0 and all(
            weights.get(n, 1.0) == 0 for n in objectives if isinstance(weights.get(n, 1.0), (int, float))):
        add("select.weights", f"{fmt(weights)} leaves every objective out (all 0); give one a weight above 0")
