"""The search report: one self-contained, offline HTML file (report.html) with the chosen trial, the
Pareto table, the figures of `llmtune.deliver.figures` and every trial."""

from __future__ import annotations

import html
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go
import plotly.io as pio

from llmtune.deliver.figures import (
    curves_panel,
    history_panel,
    importances_panel,
    memory_figure,
    parallel_panel,
    pareto_figure,
    splom_panel,
)
from llmtune.deliver.front import feasible
from llmtune.deliver.lineage import lineage_figure
from llmtune.deliver.trial_view import (
    feasible_trials,
    fmt_value,
    metric_of,
    metrics_of,
    settings_of,
    status_of,
)
from llmtune.files import write_atomic
from llmtune.study.attrs import REASON

if TYPE_CHECKING:
    from llmtune.deliver.results import SearchResult


def _table(rows: list[dict[str, Any]], chosen: int | None, table_id: str) -> str:
    if not rows:
        return f'<p class="note" id="{table_id}">No trials here.</p>'
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        f'<tr data-trial="{r.get("trial")}"{" class=chosen" if r.get("trial") == chosen else ""}>'
        + "".join(f"<td>{html.escape(fmt_value(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _chosen_box(result: SearchResult) -> str:
    best, by = result.best, result.recipe.select.by
    if best is None:
        return ('<div class="box empty"><h2>Chosen trial</h2><p>No trial completed feasibly, so none was chosen. '
                'See the trial list below for what happened.</p></div>')
    how = ("the knee of the front, closest to the ideal point with each objective scaled to [0, 1] over the front"
           if by == "knee" else f"best {by} on the Pareto front")
    if by == "knee" and result.recipe.select.weights:
        how += f" (weights {result.recipe.select.weights})"
    settings = settings_of(best)
    items = "".join(f"<li><b>{html.escape(k)}</b> = {html.escape(fmt_value(settings.get(k)))}</li>" for k in result.recipe.space.searched)
    metrics = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(fmt_value(v))}</li>" for k, v in metrics_of(result, best).items())
    return (f'<div class="box" id="chosen"><h2>Chosen trial: #{best.number}</h2><p>Chosen by <code>{html.escape(by)}</code>: '
            f'{html.escape(how)}.</p><div class="cols"><div><h3>Settings</h3><ul>{items or "<li>(nothing searched)</li>"}</ul></div>'
            f'<div><h3>Metrics</h3><ul>{metrics}</ul></div></div></div>')


SHOWN_GENERATIONS = 8  # answers of the chosen trial shown beside their references


def _generations_box(result: SearchResult) -> str:
    """A few of the chosen trial's answers beside the references (its generations.jsonl), when it has one."""
    import json

    from llmtune.study.attrs import DIR
    from llmtune.trial.result import GENERATIONS_FILE

    best = result.best
    folder = best.user_attrs.get(DIR) if best is not None else None
    path = Path(folder) / GENERATIONS_FILE if folder else None
    if path is None or not path.is_file():
        return ""
    rows: list[dict[str, Any]] = []
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if len(rows) == SHOWN_GENERATIONS:
                    break
                rows.append(json.loads(line))
    except (OSError, ValueError):
        return ""
    cells = "".join(f"<tr><td class=gen>{html.escape(str(r.get('prompt', ''))[-300:])}</td><td class=gen>"
                    f"{html.escape(str(r.get('prediction', '')))}</td><td class=gen>{html.escape(str(r.get('reference', '')))}"
                    "</td></tr>" for r in rows)
    return (f'<h2>What the chosen trial answers (first {len(rows)} of its generations)</h2><p class="note">Greedy, '
            f'with the adapter; every answer is in <code>{html.escape(str(path))}</code>.</p><table id="generations">'
            f"<thead><tr><th>prompt (end)</th><th>answer</th><th>reference</th></tr></thead><tbody>{cells}</tbody></table>")


CSS = """body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f5f6f8;color:#1f2933}
main{max-width:1150px;margin:auto;padding:24px}h1{margin:0 0 4px}h2{margin:28px 0 8px;font-size:20px}
.meta{color:#5f6b7a}.pill{display:inline-block;background:#e4e8ee;border-radius:10px;padding:1px 9px;margin:2px;font-size:13px}
.box{background:#fff;border-left:5px solid #f2a900;padding:8px 20px 12px;border-radius:6px;box-shadow:0 1px 3px #0002}
.box.empty{border-color:#d1495b}.cols{display:flex;gap:40px;flex-wrap:wrap}ul{margin:4px 0;padding-left:18px}
table{border-collapse:collapse;background:#fff;font-size:13px;width:100%;box-shadow:0 1px 3px #0002}
th,td{padding:4px 8px;border-bottom:1px solid #e4e8ee;text-align:right}th{background:#eef1f5;position:sticky;top:0}
tr.chosen td{background:#fff4d6;font-weight:600}.plot{background:#fff;border-radius:6px;margin:12px 0;padding:4px;box-shadow:0 1px 3px #0002}
.note{color:#5f6b7a;font-style:italic}td.gen{text-align:left;white-space:pre-wrap;vertical-align:top}details{margin:12px 0}summary{cursor:pointer;font-weight:600}"""


def write_report(result: SearchResult, path: str | Path) -> Path:
    """Write one self-contained HTML report (plotly.js inlined once; opens offline). Returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recipe, trials, best = result.recipe, result.all_trials, result.best
    chosen = best.number if best is not None else None
    counts = Counter(status_of(t) for t in trials)
    n_obj = len(result.objectives)
    measured = any(metric_of(result, t, n) is not None for t in trials for n in result.objectives)
    sections: list[tuple[str, str, go.Figure | str]] = [
        ("pareto", "Pareto front" if n_obj > 1 else "Objective by trial",
         pareto_figure(result) if measured else "No trial has measured objective values yet.")]
    if n_obj >= 3:
        sections.append(("objectives", "Objectives pairwise", splom_panel(result)))
    sections += [("parallel", "Settings vs objective", parallel_panel(result)), ("importance", "Parameter importances", importances_panel(result)),
                 ("history", "Optimization history", history_panel(result)), ("curves", "Learning curves", curves_panel(result))]
    memory = memory_figure(result)
    if memory is not None:
        sections.append(("memory", "Memory: predicted vs measured", memory))
    lineage = lineage_figure(trials, list(result.objectives), chosen)  # population-based training only
    if lineage is not None:
        sections.append(("lineage", "Population-based training: lineage", lineage))
    figures = [s for s in sections if isinstance(s[2], go.Figure)]
    parts = []
    for key, heading, content in sections:
        if isinstance(content, go.Figure):
            div = pio.to_html(content, include_plotlyjs=False, full_html=False, div_id=f"plot-{key}",
                              config={"displaylogo": False, "responsive": True})
            parts.append(f'<section><h2>{html.escape(heading)}</h2><div class="plot">{div}</div></section>')
        else:
            parts.append(f'<section><h2>{html.escape(heading)}</h2><p class="note" id="note-{key}">{html.escape(str(content))}</p></section>')
    plotly_js = ""
    if figures:
        from plotly.offline import get_plotlyjs

        plotly_js = f"<script>window.PlotlyConfig = {{MathJaxConfig: 'local'}};</script>\n<script>{get_plotlyjs()}</script>"
    status_line = " ".join(f'<span class="pill">{html.escape(s)}: {n}</span>' for s, n in sorted(counts.items())) or "no trials yet"
    objectives = ", ".join(f"{html.escape(n)} ({d})" for n, d in result.objectives.items())
    constraints = ", ".join(f"{html.escape(k)} {html.escape(str(v))}" for k, v in recipe.constraints.items())
    warning = ""
    if trials and not feasible_trials(result):
        warning = '<p class="box empty">Every trial failed or was infeasible: there is no Pareto front yet. Reasons are in the trial list.</p>'
    all_rows = [{"trial": t.number, "status": status_of(t), "feasible": feasible(t), **{n: metric_of(result, t, n) for n in result.objectives},
                 "reason": str(t.user_attrs.get(REASON, ""))[:160]} for t in trials]
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>llmtune report: {html.escape(recipe.name)}</title><style>{CSS}</style>{plotly_js}</head>
<body><main>
<h1>llmtune report: {html.escape(recipe.name)}</h1>
<p class="meta">{datetime.now():%Y-%m-%d %H:%M} &middot; study <code>{html.escape(result.study.study_name)}</code> &middot;
{len(trials)} trial(s) &middot; output <code>{html.escape(str(recipe.output_dir))}</code><br>
objectives: {objectives}{' &middot; constraints: ' + constraints if constraints else ''}</p>
<p>{status_line}</p>{warning}
{_chosen_box(result)}
<h2>Pareto front ({len(result.pareto_front)} trial(s))</h2>
{_table(result.summary_rows(), chosen, "pareto-table")}
{_generations_box(result)}
{''.join(parts)}
<details><summary>All trials ({len(trials)})</summary>{_table(all_rows, chosen, "all-trials")}</details>
</main></body></html>
"""
    write_atomic(path, doc)
    return path


__all__ = ["write_report"]
