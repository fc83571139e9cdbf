"""The search report: the Pareto figure and one self-contained, offline HTML file (report.html)."""

from __future__ import annotations

import html
import math
import textwrap
import warnings
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import optuna
import plotly.graph_objects as go
import plotly.io as pio
from optuna.trial import FrozenTrial, TrialState

from llmtune.config.recipe import METRICS
from llmtune.deliver.front import feasible
from llmtune.study.attrs import INFO, METRICS_KEY, REASON, SETTINGS, STATUS

if TYPE_CHECKING:
    from llmtune.deliver.results import SearchResult

GREY, BLUE, RED, GOLD = "#b8bec8", "#4a78c2", "#d1495b", "#f2a900"
TEMPLATE = "plotly_white"
MIN_IMPORTANCE_TRIALS = 5


def _num(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any) -> str:
    if isinstance(v, float) and v.is_integer() and 1e4 <= abs(v) < 1e15:
        return f"{int(v):,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return "—" if v is None else str(v)


def _status(t: FrozenTrial) -> str:
    return str(t.user_attrs.get(STATUS, t.state.name.lower()))


def _settings(t: FrozenTrial) -> dict[str, Any]:
    return t.user_attrs.get(SETTINGS) or dict(t.params)


def _metric(result: SearchResult, t: FrozenTrial, name: str) -> float | None:
    """A trial's measured metric; an objective's told value only for feasible trials (never a penalty)."""
    v = (t.user_attrs.get(METRICS_KEY) or {}).get(name)
    if not _num(v) and name in result.objectives and feasible(t) and t.values:
        v = t.values[list(result.objectives).index(name)]
    return float(v) if _num(v) else None


def _axis_title(name: str, direction: str | None = None) -> str:
    desc = METRICS.get(name, ("", ""))[1]
    better = {"minimize": " (lower is better)", "maximize": " (higher is better)"}.get(direction or "", "")
    return f"{name}: {desc}{better}" if desc else f"{name}{better}"


def _hover(result: SearchResult, t: FrozenTrial) -> str:
    """Trial number, status, searched settings and all metrics, as plotly hover HTML."""
    lines = [f"<b>trial {t.number}</b> ({html.escape(_status(t))})"]
    settings = _settings(t)
    lines += [f"{html.escape(k)} = {html.escape(_fmt(settings.get(k)))}" for k in result.recipe.space.searched]
    lines += [f"{html.escape(k)}: {html.escape(_fmt(v))}" for k, v in _ordered(result, t).items()]
    if t.user_attrs.get(REASON):
        lines.append(html.escape(str(t.user_attrs[REASON])[:120]))
    return "<br>".join(lines)


def pareto_figure(result: SearchResult, x: str | None = None, y: str | None = None) -> go.Figure:
    """All trials with measured values in two objectives (single objective: value vs trial number);
    infeasible / unfinished trials grey, the Pareto front connected, the chosen trial starred."""
    names = list(result.objectives)
    by_trial = y is None and x is None and len(names) == 1
    if by_trial:
        y = names[0]
    x = x or names[0]
    y = y or (names[1] if len(names) > 1 else names[0])
    front = {t.number for t in result.pareto_front}
    best = result.best
    groups: dict[str, list[tuple[float, float, FrozenTrial]]] = {"other": [], "feasible": [], "front": []}
    hidden = 0
    for t in result.all_trials:
        xv = float(t.number) if by_trial else _metric(result, t, x)
        yv = _metric(result, t, y)
        if xv is None or yv is None:
            hidden += t.state != TrialState.RUNNING
            continue
        key = "front" if t.number in front else "feasible" if feasible(t) else "other"
        groups[key].append((xv, yv, t))
    fig = go.Figure()
    styles = {"other": ("infeasible / not complete", dict(color=GREY, size=8, symbol="x"), "markers"),
              "feasible": ("feasible trials", dict(color=BLUE, size=9, opacity=0.7), "markers"),
              "front": ("Pareto front", dict(color=RED, size=11, line=dict(color="white", width=1)),
                        "lines+markers" if len(names) == 2 and {x, y} == set(names) else "markers")}
    for key, (label, marker, mode) in styles.items():
        pts = sorted(groups[key], key=lambda p: (p[0], p[1]))
        fig.add_trace(go.Scatter(
            x=[p[0] for p in pts], y=[p[1] for p in pts], mode=mode, name=label, marker=marker,
            line=dict(color=RED, width=2),
            customdata=[p[2].number for p in pts], text=[_hover(result, p[2]) for p in pts],
            hovertemplate="%{text}<extra></extra>"))
    chosen = [p for p in groups["front"] if best is not None and p[2].number == best.number]
    if chosen:
        cx, cy, ct = chosen[0]
        fig.add_trace(go.Scatter(
            x=[cx], y=[cy], mode="markers+text", name=f"chosen (trial {ct.number})", customdata=[ct.number],
            marker=dict(color=GOLD, size=20, symbol="star", line=dict(color="black", width=1)),
            text=[f"chosen #{ct.number}"], textposition="top right", hovertext=[_hover(result, ct)],
            hovertemplate="%{hovertext}<extra></extra>"))
    title = "Pareto front" if len(names) > 1 else f"{names[0]} by trial"
    if hidden:
        title += f" <span style='font-size:12px'>({hidden} trial(s) without these measurements not shown)</span>"
    if not any(groups.values()):
        fig.add_annotation(text="no trial with measured values yet", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_layout(title=title, template=TEMPLATE, height=520, legend=dict(orientation="h", y=-0.18),
                      xaxis_title="trial number" if by_trial else _axis_title(x, result.objectives.get(x)),
                      yaxis_title=_axis_title(y, result.objectives.get(y)))
    return fig


def _feasible_trials(result: SearchResult) -> list[FrozenTrial]:
    return [t for t in result.all_trials if feasible(t) and t.values and all(_num(v) for v in t.values)]


def _splom(result: SearchResult) -> go.Figure | str:
    trials, front = _feasible_trials(result), {t.number for t in result.pareto_front}
    if not trials:
        return "No feasible trials to compare."
    dims = [dict(label=n, values=[t.values[i] for t in trials]) for i, n in enumerate(result.objectives)]
    fig = go.Figure(go.Splom(dimensions=dims, text=[_hover(result, t) for t in trials], hovertemplate="%{text}<extra></extra>",
                             marker=dict(size=7, color=[RED if t.number in front else BLUE for t in trials]),
                             diagonal_visible=False, showupperhalf=False))
    return fig.update_layout(title="Objectives pairwise (red: Pareto front)", template=TEMPLATE, height=620)


def _parallel(result: SearchResult) -> go.Figure | str:
    name, searched = next(iter(result.objectives)), result.recipe.space.searched
    trials = _feasible_trials(result)
    if not trials or not searched:
        return "Needs completed feasible trials and at least one searched setting."
    dims = []
    for s in searched:
        vals = [_settings(t).get(s) for t in trials]
        nums = [float(v) for v in vals if _num(v)]
        if len(nums) == len(vals):
            log = min(nums) > 0 and max(nums) / min(nums) > 50
            dims.append(dict(label=f"log10 {s}" if log else s, values=[math.log10(v) if log else v for v in nums]))
        else:
            cats = sorted({str(v) for v in vals})
            dims.append(dict(label=s, values=[cats.index(str(v)) for v in vals], tickvals=list(range(len(cats))), ticktext=cats))
    objective = [_metric(result, t, name) for t in trials]
    dims.append(dict(label=name, values=objective))
    fig = go.Figure(go.Parcoords(dimensions=dims, line=dict(color=objective, colorscale="Viridis", showscale=True,
                                                            reversescale=result.objectives[name] == "maximize")))
    return fig.update_layout(title=f"Searched settings vs {name} (feasible trials)", template=TEMPLATE, height=460)


def _objective(i: int, sign: float) -> Callable[[FrozenTrial], float]:
    return lambda t: sign * t.values[i]


def _importances(result: SearchResult) -> go.Figure | str:
    trials = _feasible_trials(result)
    if len(trials) < MIN_IMPORTANCE_TRIALS:
        return f"Parameter importances need at least {MIN_IMPORTANCE_TRIALS} completed feasible trials (have {len(trials)})."
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fig = go.Figure()
    try:
        study = optuna.create_study(directions=result.study.directions)  # feasible trials only: no penalty values
        study.add_trials(trials)
        for i, (name, direction) in enumerate(result.objectives.items()):
            sign = -1.0 if direction == "maximize" else 1.0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(study, target=_objective(i, sign))
            fig.add_trace(go.Bar(x=list(imp), y=list(imp.values()), name=name))
    except Exception as e:  # missing optional packages, empty common search space, ...
        return f"Parameter importances could not be computed: {str(e)[:300]}"
    finally:
        optuna.logging.set_verbosity(verbosity)
    return fig.update_layout(title="Parameter importances (PED-ANOVA, feasible trials)", barmode="group",
                             template=TEMPLATE, height=420, yaxis_title="importance (share)")


def _history(result: SearchResult) -> go.Figure | str:
    trials = _feasible_trials(result)
    if not trials:
        return "No feasible trials yet."
    from plotly.subplots import make_subplots

    names = list(result.objectives)
    fig = make_subplots(rows=len(names), cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[_axis_title(n, d) for n, d in result.objectives.items()])
    for i, (name, direction) in enumerate(result.objectives.items()):
        xs, ys = [t.number for t in trials], [t.values[i] for t in trials]
        best, running = [], None
        for v in ys:
            running = v if running is None else (min(running, v) if direction == "minimize" else max(running, v))
            best.append(running)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name=name, marker=dict(color=BLUE),
                                 text=[_hover(result, t) for t in trials], hovertemplate="%{text}<extra></extra>"), i + 1, 1)
        fig.add_trace(go.Scatter(x=xs, y=best, mode="lines", name=f"best {name} so far",
                                 line=dict(color=RED, shape="hv")), i + 1, 1)
    fig.update_xaxes(title_text="trial number", row=len(names), col=1)
    return fig.update_layout(title="Optimization history", template=TEMPLATE, height=260 + 220 * len(names))


def _curves(result: SearchResult) -> go.Figure | str:
    curves, best = result.curves(), result.best
    if not curves:
        return "No learning curves recorded."
    trials = {t.number: t for t in result.all_trials}
    fig = go.Figure()
    for number, points in sorted(curves.items()):
        t, chosen = trials[number], best is not None and number == best.number
        status = _status(t)
        fig.add_trace(go.Scatter(
            x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers", name=f"trial {number} ({status})",
            line=dict(dash="dash" if status == "pruned" else "solid", width=4 if chosen else 1.5,
                      color=GOLD if chosen else (GREY if status != "complete" else None)),
            marker=dict(size=4), hovertemplate=f"trial {number} ({html.escape(status)})<br>%{{x:.3f}} of budget: %{{y:.4g}}<extra></extra>"))
    return fig.update_layout(title="Learning curves (dashed: pruned; thick gold: chosen)", template=TEMPLATE, height=460,
                             xaxis_title="fraction of the training budget", yaxis_title=_axis_title("eval_loss"))


def _memory(result: SearchResult) -> go.Figure | None:
    """Predicted (gate) vs measured peak memory per trial, the chosen one starred; None when nothing pairs up."""
    pts: list[tuple[float, float, FrozenTrial]] = []
    sources = set()
    for t in result.all_trials:
        predicted = (t.user_attrs.get(METRICS_KEY) or {}).get("predicted_memory_gb")
        peak = (t.user_attrs.get(INFO) or {}).get("peak_memory")
        measured = peak.get("bytes", 0) / 2**30 if isinstance(peak, dict) and _num(peak.get("bytes")) else None
        measured = measured or _metric(result, t, "peak_memory_gb")
        if _num(predicted) and measured:
            pts.append((float(predicted), measured, t))
            sources.add(peak.get("source", "") if isinstance(peak, dict) else "")
    if not pts:
        return None
    best = result.best
    top = max(max(p[0], p[1]) for p in pts) * 1.05
    fig = go.Figure([
        go.Scatter(x=[0, top], y=[0, top], mode="lines", name="predicted = measured", line=dict(color=GREY, dash="dot")),
        go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers", name="trials", marker=dict(color=BLUE, size=9),
                   customdata=[p[2].number for p in pts], text=[_hover(result, p[2]) for p in pts],
                   hovertemplate="%{text}<extra></extra>")])
    chosen = [p for p in pts if best is not None and p[2].number == best.number]
    if chosen and best is not None:
        fig.add_trace(go.Scatter(x=[chosen[0][0]], y=[chosen[0][1]], mode="markers", name=f"chosen (trial {best.number})",
                                 customdata=[best.number], marker=dict(color=GOLD, size=18, symbol="star", line=dict(color="black", width=1))))
    title = "Predicted vs measured peak memory"
    if "rss" in sources:  # a CPU run: process RSS against a GPU estimate, only loosely comparable
        title += " <span style='font-size:12px'>(measured on CPU as process RSS; the prediction is for a GPU)</span>"
    return fig.update_layout(title=title, template=TEMPLATE, height=460,
                             xaxis_title="predicted peak memory, GiB", yaxis_title="measured peak memory, GiB")


def curves_figure(result: SearchResult) -> go.Figure | None:
    """Learning curves (eval loss over the training budget) of every trial, the chosen one thick gold."""
    fig = _curves(result)
    return fig if isinstance(fig, go.Figure) else None


def pareto_png(result: SearchResult, path: str | Path, x: str | None = None, y: str | None = None, dpi: int = 150) -> Path:
    """The Pareto figure as a static PNG (matplotlib, drawn from the plotly figure's own traces), for READMEs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = pareto_figure(result, x, y)
    mfig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=dpi)
    marks = {"x": "x", "star": "*"}
    for tr in fig.data:
        if not len(tr.x or []):
            continue
        m = tr.marker
        size = (m.size or 9) ** 2 * (1.6 if m.symbol == "star" else 0.8)
        if "lines" in (tr.mode or ""):
            ax.plot(tr.x, tr.y, color=tr.line.color or m.color, linewidth=1.8, zorder=2)
        ax.scatter(tr.x, tr.y, s=size, c=m.color, marker=marks.get(m.symbol or "", "o"), label=tr.name, zorder=3,
                   edgecolors={"star": "black", "x": None}.get(m.symbol or "", "white"), linewidths=0.8,
                   alpha=m.opacity or 1.0)
        if m.symbol == "star":
            for xv, yv, label in zip(tr.x, tr.y, tr.text or [], strict=False):
                ax.annotate(label, (xv, yv), textcoords="offset points", xytext=(8, 6), fontsize=9)
    title = str(fig.layout.title.text or "").split(" <span")[0]
    ax.set_title(f"{title}: {result.recipe.name} ({len(result.all_trials)} trials)", fontsize=12)
    ax.set_xlabel(textwrap.fill(str(fig.layout.xaxis.title.text), 70), fontsize=9)
    ax.set_ylabel(textwrap.fill(str(fig.layout.yaxis.title.text), 45), fontsize=9)
    ax.grid(alpha=0.3)
    legend = ax.legend(fontsize=8, frameon=False)
    for handle in legend.legend_handles:  # same-size legend marks, whatever the plot sizes
        handle.set_sizes([60])  # type: ignore[union-attr]  # scatter legend handles are collections
    mfig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mfig.savefig(path)
    plt.close(mfig)
    return path


def _table(rows: list[dict[str, Any]], chosen: int | None, table_id: str) -> str:
    if not rows:
        return f'<p class="note" id="{table_id}">No trials here.</p>'
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        f'<tr data-trial="{r.get("trial")}"{" class=chosen" if r.get("trial") == chosen else ""}>'
        + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _ordered(result: SearchResult, t: FrozenTrial) -> dict[str, Any]:
    """A trial's metrics, objectives first."""
    metrics = t.user_attrs.get(METRICS_KEY) or {}
    return {**{k: metrics[k] for k in result.objectives if k in metrics}, **metrics}


def _chosen_box(result: SearchResult) -> str:
    best, by = result.best, result.recipe.select.by
    if best is None:
        return ('<div class="box empty"><h2>Chosen trial</h2><p>No trial completed feasibly, so none was chosen. '
                'See the trial list below for what happened.</p></div>')
    how = ("the knee of the front, closest to the ideal point with each objective scaled to [0, 1] over the front"
           if by == "knee" else f"best {by} on the Pareto front")
    if by == "knee" and result.recipe.select.weights:
        how += f" (weights {result.recipe.select.weights})"
    settings = _settings(best)
    items = "".join(f"<li><b>{html.escape(k)}</b> = {html.escape(_fmt(settings.get(k)))}</li>" for k in result.recipe.space.searched)
    metrics = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(_fmt(v))}</li>" for k, v in _ordered(result, best).items())
    return (f'<div class="box" id="chosen"><h2>Chosen trial: #{best.number}</h2><p>Chosen by <code>{html.escape(by)}</code>: '
            f'{html.escape(how)}.</p><div class="cols"><div><h3>Settings</h3><ul>{items or "<li>(nothing searched)</li>"}</ul></div>'
            f'<div><h3>Metrics</h3><ul>{metrics}</ul></div></div></div>')


CSS = """body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f5f6f8;color:#1f2933}
main{max-width:1150px;margin:auto;padding:24px}h1{margin:0 0 4px}h2{margin:28px 0 8px;font-size:20px}
.meta{color:#5f6b7a}.pill{display:inline-block;background:#e4e8ee;border-radius:10px;padding:1px 9px;margin:2px;font-size:13px}
.box{background:#fff;border-left:5px solid #f2a900;padding:8px 20px 12px;border-radius:6px;box-shadow:0 1px 3px #0002}
.box.empty{border-color:#d1495b}.cols{display:flex;gap:40px;flex-wrap:wrap}ul{margin:4px 0;padding-left:18px}
table{border-collapse:collapse;background:#fff;font-size:13px;width:100%;box-shadow:0 1px 3px #0002}
th,td{padding:4px 8px;border-bottom:1px solid #e4e8ee;text-align:right}th{background:#eef1f5;position:sticky;top:0}
tr.chosen td{background:#fff4d6;font-weight:600}.plot{background:#fff;border-radius:6px;margin:12px 0;padding:4px;box-shadow:0 1px 3px #0002}
.note{color:#5f6b7a;font-style:italic}details{margin:12px 0}summary{cursor:pointer;font-weight:600}"""


def write_report(result: SearchResult, path: str | Path) -> Path:
    """Write one self-contained HTML report (plotly.js inlined once; opens offline). Returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recipe, trials, best = result.recipe, result.all_trials, result.best
    chosen = best.number if best is not None else None
    counts = Counter(_status(t) for t in trials)
    n_obj = len(result.objectives)
    measured = any(_metric(result, t, n) is not None for t in trials for n in result.objectives)
    sections: list[tuple[str, str, go.Figure | str]] = [
        ("pareto", "Pareto front" if n_obj > 1 else "Objective by trial",
         pareto_figure(result) if measured else "No trial has measured objective values yet.")]
    if n_obj >= 3:
        sections.append(("objectives", "Objectives pairwise", _splom(result)))
    sections += [("parallel", "Settings vs objective", _parallel(result)), ("importance", "Parameter importances", _importances(result)),
                 ("history", "Optimization history", _history(result)), ("curves", "Learning curves", _curves(result))]
    memory = _memory(result)
    if memory is not None:
        sections.append(("memory", "Memory: predicted vs measured", memory))
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
    if trials and not _feasible_trials(result):
        warning = '<p class="box empty">Every trial failed or was infeasible: there is no Pareto front yet. Reasons are in the trial list.</p>'
    all_rows = [{"trial": t.number, "status": _status(t), "feasible": feasible(t), **{n: _metric(result, t, n) for n in result.objectives},
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
{''.join(parts)}
<details><summary>All trials ({len(trials)})</summary>{_table(all_rows, chosen, "all-trials")}</details>
</main></body></html>
"""
    path.write_text(doc, encoding="utf-8")
    return path


__all__ = ["pareto_figure", "curves_figure", "pareto_png", "write_report"]
