"""What a search can optimise: the metrics the harness measures, and the recipe's objectives,
constraints and choice of the best trial, checked against them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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
    # Scored on the adapter's greedy answers to measure.generation_examples eval rows (`harness/quality.py`
    # defines each; all are shares or scores in [0, 1], averaged over the answers unless said otherwise).
    "exact_match": ("maximize", "share of answers equal to the reference after stripping, lower-casing, collapsing "
                                "whitespace and dropping trailing . , ; : ! ?"),
    "contains": ("maximize", "share of answers that contain the reference (normalised as for exact_match)"),
    "rouge_l": ("maximize", "ROUGE-L F1 (longest common subsequence of lower-cased alphanumeric words), mean"),
    "chrf": ("maximize", "chrF (character 1-6-grams without spaces, beta 2, corpus-level), 0-1"),
    "bleu": ("maximize", "BLEU-4 (corpus-level, brevity penalty, exponential smoothing of empty orders), 0-1"),
    "json_valid": ("maximize", "share of answers that parse as JSON (the whole answer, stripped)"),
    "length_ok": ("maximize", "share of answers that are not empty and at most max(2 x, +10) the reference's characters"),
    "forgetting": ("minimize", "mean per-token loss increase (nats) of the adapted model over the base on general "
                               "text (data.reference_source; default the base's own greedy answers to built-in prompts)"),
}
# Measured on generations after training, only while measure.latency is on (`harness/train.py`).
GENERATION_METRICS = ("latency_ms", "ttft_ms", "generation_memory_gb")
# Scored on the adapter's answers to eval rows after training (`harness/generate.py`); never by probes.
TASK_METRICS = ("exact_match", "contains", "rouge_l", "chrf", "bleu", "json_valid", "length_ok")
METRIC_ALIASES = {"peak_memory": "peak_memory_gb", "latency": "latency_ms", "throughput": "train_throughput",
                  "memory": "peak_memory_gb", "loss": "eval_loss"}
DIRECTIONS = ("minimize", "maximize")


def _canonical_metric(name: str) -> str:
    return METRIC_ALIASES.get(name, name)


def meaning(name: str, user_metrics: dict[str, str] | None = None) -> str:
    """What a metric means: its registry line, or the user's function that computes it."""
    if name in METRICS:
        return METRICS[name][1]
    spec = (user_metrics or {}).get(name)
    return f"user metric on generations ({spec})" if spec else ""


def needs_generations(recipe: Recipe) -> bool:
    """Whether a trial must answer eval rows after training: an objective or constraint is scored on them."""
    named = set(recipe.objectives) | set(recipe.constraints)
    return bool(named & set(TASK_METRICS) or named & set(recipe.measure.metrics))


def _user_metric(recipe: Recipe, name: str, spec: dict[str, Any], add: Callable[[str, str], None]) -> str | None:
    """``{metric: 'module:function', direction: ...}``: the user's metric goes to measure.metrics; its direction."""
    path = f"objectives.{name}"
    unknown = set(spec) - {"metric", "direction"}
    if unknown:
        add(path, f"{fmt(spec)} has {', '.join(sorted(unknown))}; a user metric is {{metric: 'module:function', "
                  "direction: maximize}}")
        return None
    target = spec.get("metric")
    if not isinstance(target, str) or ":" not in target:
        add(f"{path}.metric", f"{fmt(target)} must be 'module:function' (or 'path/to/file.py:function'), "
                              "e.g. 'mypkg.metrics:score'")
        return None
    if name in METRICS or name in METRIC_ALIASES:
        add(path, f"{name} is a built-in metric; give your metric its own name")
        return None
    direction = spec.get("direction", "maximize")
    if direction not in DIRECTIONS:
        add(f"{path}.direction", one_of(direction, list(DIRECTIONS)))
        return None
    if not isinstance(recipe.measure.metrics, dict):
        recipe.measure.metrics = {}
    recipe.measure.metrics[name] = target
    return str(direction)


def check_objectives(recipe: Recipe, add: Callable[[str, str], None]) -> None:
    """Check and normalise ``objectives``, ``constraints`` and ``select`` in place (aliases become
    metric names, a bare constraint number an upper limit, a user metric's function goes to
    ``measure.metrics``); each problem goes to ``add(path, message)``. Whether a user metric imports is the
    preflight's check (`llmtune.preflight`)."""
    raw = recipe.objectives
    objectives: dict[str, str] = {}
    if not isinstance(recipe.measure.metrics, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and ":" in v for k, v in recipe.measure.metrics.items()):
        add("measure.metrics", f"{fmt(recipe.measure.metrics)} must map names to 'module:function'")
        recipe.measure.metrics = {}
    if isinstance(raw, list):  # a list of names takes each metric's natural direction
        raw = {str(n): None for n in raw}
    if not isinstance(raw, dict) or not raw:
        add("objectives", f"{fmt(raw)} must name at least one metric, e.g. {{eval_loss: minimize}}")
        raw = {}
    for name, direction in raw.items():
        canon = _canonical_metric(str(name))
        if isinstance(direction, dict):  # a user's metric on generations
            user_direction = _user_metric(recipe, str(name), direction, add)
            if user_direction is not None:
                objectives[str(name)] = user_direction
            continue
        if canon in recipe.measure.metrics and canon not in METRICS:  # named in measure.metrics (a loaded recipe)
            direction = "maximize" if direction is None else direction
            if direction not in DIRECTIONS:
                add(f"objectives.{name}", one_of(direction, list(DIRECTIONS)))
            else:
                objectives[canon] = direction
            continue
        if canon not in METRICS:
            add(f"objectives.{name}", f"unknown metric{did_you_mean(str(name), list(METRICS) + list(METRIC_ALIASES))} (known: {', '.join(METRICS)}; "
                                        "or your own: {name}: {{metric: 'module:function', direction: maximize}})")
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
            if canon not in METRICS and canon not in recipe.measure.metrics:
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
