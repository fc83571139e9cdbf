"""What population-based training leaves for the user: the lineage figure (members over segments, with the
edges where a member copied another) and the chosen member's schedule, exported with its adapter
(``best/schedule.json``) and replayed as one ordinary trial by ``llmtune train RECIPE --schedule FILE``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from llmtune.errors import Problem, RecipeError
from llmtune.study.attrs import LINEAGE, METRICS_KEY, SETTINGS

SCHEDULE_FORMAT = "llmtune.schedule/1"


def _segments(trials: list[FrozenTrial]) -> list[tuple[FrozenTrial, dict[str, Any]]]:
    return [(t, t.user_attrs[LINEAGE]) for t in trials
            if t.state == TrialState.COMPLETE and isinstance(t.user_attrs.get(LINEAGE), dict)
            and "stop" in t.user_attrs[LINEAGE]]


def ancestry(trials: list[FrozenTrial], trial: FrozenTrial) -> list[FrozenTrial]:
    """The trials whose states a segment's trial continued, first segment first, ending with it."""
    by_number = {t.number: t for t in trials}
    chain, seen = [trial], {trial.number}
    while True:
        parent = (chain[0].user_attrs.get(LINEAGE) or {}).get("parent")
        number = parent.get("trial") if isinstance(parent, dict) else None
        if number is None or number not in by_number or number in seen:
            return chain
        seen.add(number)
        chain.insert(0, by_number[number])


def lineage_figure(trials: list[FrozenTrial], objectives: list[str], chosen: int | None = None) -> Any:
    """A plotly figure: one marker per finished segment (x: the fraction of the budget it ended at, y: its
    member, colour: its eval loss); grey lines where a member went on with its own state, red dashed
    where it copied another member (exploit); the chosen trial's ancestry underneath, wide and pale. None without PBT."""
    import plotly.graph_objects as go

    segments = _segments(trials)
    if not segments:
        return None
    where = {t.number: (float(lin["stop"]), int(lin["member"])) for t, lin in segments}
    lines: dict[bool, tuple[list[float | None], list[float | None]]] = {False: ([], []), True: ([], [])}
    for t, lin in segments:
        parent = lin.get("parent") or {}
        if parent.get("trial") in where:
            (x0, y0), (x1, y1) = where[parent["trial"]], where[t.number]
            xs, ys = lines[bool(lin.get("exploited"))]
            xs += [x0, x1, None]
            ys += [y0, y1, None]
    traces = [go.Scatter(x=xs, y=ys, mode="lines", name="copied (exploit)" if exploited else "continued",
                         line={"color": "#d62728" if exploited else "#999999", "dash": "dash" if exploited else "solid"},
                         hoverinfo="skip") for exploited, (xs, ys) in lines.items() if xs]
    if chosen is not None and chosen in where:
        path = [where[t.number] for t in ancestry([t for t, _ in segments], next(t for t, _ in segments if t.number == chosen))]
        traces.insert(0, go.Scatter(x=[p[0] for p in path], y=[p[1] for p in path], mode="lines", opacity=0.35,
                                    name=f"chosen #{chosen}", line={"color": "#1f77b4", "width": 8}, hoverinfo="skip"))
    losses = [float((t.user_attrs.get(METRICS_KEY) or {}).get("eval_loss", math.nan)) for t, _ in segments]
    hover = []
    for (t, lin), loss in zip(segments, losses, strict=True):
        values = (lin.get("schedule") or [{}])[-1].get("values", {})
        text = "<br>".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        hover.append(f"trial #{t.number}<br>member {lin['member']}, segment {int(lin['segment']) + 1}<br>"
                     f"eval_loss={loss:.4f}<br>{text}" + ("<br>copied a better member" if lin.get("exploited") else ""))
    traces.append(go.Scatter(
        x=[where[t.number][0] for t, _ in segments], y=[where[t.number][1] for t, _ in segments], mode="markers",
        name="segment", text=hover, hoverinfo="text",
        marker={"size": 11, "color": losses, "colorscale": "Viridis_r", "colorbar": {"title": {"text": "eval loss"}}}))
    return go.Figure(data=traces, layout={
        "template": go.layout.Template(), "title": {"text": "Population-based training: lineage"},
        "xaxis": {"title": {"text": "fraction of the training budget (end of segment)"}},
        "yaxis": {"title": {"text": "member"}, "dtick": 1}, "legend": {"orientation": "h"}})


def schedule_document(trial: FrozenTrial, recipe_fingerprint: str | None) -> dict[str, Any] | None:
    """The schedule of a PBT trial (its settings per segment) as ``llmtune train --schedule`` reads it;
    None for a trial that is not a PBT member's last segment."""
    lineage = trial.user_attrs.get(LINEAGE)
    if not isinstance(lineage, dict) or not lineage.get("final"):
        return None
    settings = {k: v for k, v in (trial.user_attrs.get(SETTINGS) or {}).items() if v is not None}
    return {"format": SCHEDULE_FORMAT, "trial": trial.number, "member": lineage["member"],
            "schedule": lineage["schedule"], "settings": settings, "recipe_fingerprint": recipe_fingerprint,
            "eval_loss": (trial.user_attrs.get(METRICS_KEY) or {}).get("eval_loss")}


def read_schedule(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A schedule file, checked: every problem at once (`RecipeError`)."""
    from llmtune.harness.resume import check_schedule  # torch only when a schedule is replayed

    where = "--schedule"
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise RecipeError([Problem(where, f"cannot read {str(path)!r}: {e.strerror or e}")]) from None
    except json.JSONDecodeError as e:
        raise RecipeError([Problem(where, f"{str(path)!r} is not JSON ({e}); give the schedule.json a PBT search "
                                          "wrote next to its chosen adapter (best/schedule.json)")]) from None
    if not isinstance(doc, dict) or doc.get("format") != SCHEDULE_FORMAT:
        raise RecipeError([Problem(where, f"{str(path)!r} is not a llmtune schedule (format {SCHEDULE_FORMAT}); "
                                          "give best/schedule.json of a PBT search")])
    problems = [Problem(where, p) for p in check_schedule(doc.get("schedule"))]
    if not isinstance(doc.get("settings"), dict):
        problems.append(Problem(where, "the schedule has no settings mapping"))
    if problems:
        raise RecipeError(problems)
    return doc
