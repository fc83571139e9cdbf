"""Population-based training's rules: how a generation's members are ranked, which of them copy another
(exploit) and how the copy's settings change (explore). Pure functions over plain data; the settings
(``study.pbt_settings``, checked with the recipe) are `llmtune.config.pbt_settings`, the search that runs
them is `llmtune.study.pbt`.

Ranking is the pruner's multi-objective rule (`llmtune.study.rungs`): non-dominated sorting on the eval
loss and the objectives known before the end of training (`PARTIAL_METRICS`: throughput, peak memory,
projected training seconds, trainable parameters), ties broken by the loss; with eval_loss the only such
objective it is a ranking by loss.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmtune.config.pbt_settings import PBTSettings
from llmtune.config.space import Choice, Range, SearchSpace
from llmtune.study.rungs import PARTIAL_METRICS, _pareto_ranks

# ---------------------------------------------------------------------------------------------- decisions


@dataclass
class Member:
    """A member after one segment, as the study recorded it."""

    member: int
    trial: int                     # the segment's trial number
    alive: bool                    # trained and evaluated with a finite loss (not crashed, diverged, oom)
    loss: float
    metrics: dict[str, float]
    params: dict[str, Any]         # its searched settings (the Optuna params)
    schedule: list[dict[str, Any]]
    state: str                     # folder of its saved state


@dataclass
class Next:
    """What a member does in the next segment."""

    member: int
    source: int                    # the member whose state it resumes: itself, or the one it copies
    source_trial: int
    exploited: bool
    params: dict[str, Any]
    resume: str
    schedule: list[dict[str, Any]] = field(default_factory=list)  # up to the previous segment


def rank(members: list[Member], objectives: dict[str, str]) -> list[Member]:
    """Living members, best first: the pruner's non-dominated sorting on loss and the partial objectives
    every member measured, then loss, then member number (a stable order every worker agrees on)."""
    alive = [m for m in members if m.alive and math.isfinite(m.loss)]
    if not alive:
        return []
    extra = [k for k, d in objectives.items() if k in PARTIAL_METRICS
             and all(math.isfinite(m.metrics.get(k, math.nan)) for m in alive)]
    signs = [1.0 if objectives[k] == "minimize" else -1.0 for k in extra]
    points = np.array([[m.loss, *(s * m.metrics[k] for s, k in zip(signs, extra, strict=True))] for m in alive])
    ranks = _pareto_ranks(points)
    order = sorted(range(len(alive)), key=lambda i: (int(ranks[i]), alive[i].loss, alive[i].member))
    return [alive[i] for i in order]


def explore(params: dict[str, Any], settings: PBTSettings, space: SearchSpace, rng: random.Random) -> dict[str, Any]:
    """A copy's settings: each perturbed setting multiplied by a factor (a choice moves one step), or drawn
    afresh with `resample_probability`; kept inside its range. Nothing else changes."""
    out = dict(params)
    for name in settings.perturb:
        spec = space.specs.get(name)
        if name not in out or spec is None:
            continue
        fresh = rng.random() < settings.resample_probability
        if isinstance(spec, Choice):
            options = list(spec.options)
            i = options.index(out[name]) if out[name] in options else 0
            out[name] = rng.choice(options) if fresh else options[min(len(options) - 1, max(0, i + rng.choice((-1, 1))))]
        elif isinstance(spec, Range):
            if fresh:
                value = (math.exp(rng.uniform(math.log(spec.low), math.log(spec.high))) if spec.log
                         else rng.uniform(spec.low, spec.high))
            else:
                value = float(out[name]) * rng.choice(settings.factors)
            value = min(spec.high, max(spec.low, value))
            if spec.step:
                value = min(spec.high, spec.low + round((value - spec.low) / spec.step) * spec.step)
            out[name] = int(round(value)) if spec.is_int else float(value)
    return out


def next_generation(members: list[Member], settings: PBTSettings, space: SearchSpace, objectives: dict[str, str],
                    rng: random.Random) -> list[Next]:
    """Each member's next segment: the worst `cut` living members and every dead one copy one of the best
    `cut` (state and settings: exploit) and perturb the copy (explore); the others continue as they are.
    Empty when no member is alive."""
    ranked = rank(members, objectives)
    if not ranked:
        return []
    cut = min(settings.cut, max(1, len(ranked) // 2)) if len(ranked) > 1 else 1
    top = ranked[:cut]
    replaced = {m.member for m in ranked[max(cut, len(ranked) - cut):]} | {m.member for m in members if m not in ranked}
    out = []
    for m in sorted(members, key=lambda m: m.member):
        if m.member in replaced:
            src = top[rng.randrange(len(top))]
            out.append(Next(m.member, src.member, src.trial, True, explore(src.params, settings, space, rng),
                            src.state, list(src.schedule)))
        else:
            out.append(Next(m.member, m.member, m.trial, False, dict(m.params), m.state, list(m.schedule)))
    return out
