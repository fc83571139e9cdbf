"""The search's figures (plotly): the Pareto front, objectives pairwise, settings vs objective, parameter
importances, optimization history, learning curves, predicted vs measured memory; and the Pareto figure as a PNG.

A ``*_panel`` builder returns its figure, or a note saying why there is nothing to draw (the report shows it).
"""

from __future__ import annotations

import html
import math
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState

from llmtune.config.objectives import METRICS
from llmtune.deliver.front import feasible
from llmtune.deliver.trial_view import (
    feasible_trials,
    fmt_value,
    is_number,
    metric_of,
    metrics_of,
    settings_of,
    status_of,
)
from llmtune.study.attrs import INFO, METRICS_KEY, REASON

if TYPE_CHECKING:
    from llmtune.deliver.results import SearchResult

GREY, BLUE, RED, GOLD = "#b8bec8", "#4a78c2", "#d1495b", "#f2a900"
TEMPLATE = "plotly_white"
MIN_IMPORTANCE_TRIALS = 5


def _axis_title(name: str, direction: str | None = None) -> str:
    desc = METRICS.get(name, ("", ""))[1]
    better = {"minimize": " (lower is better)", "maximize": " (higher is better)"}.get(direction or "", "")
    return f"{name}: {desc}{better}" if desc else f"{name}{better}"


def _hover(result: SearchResult, t: FrozenTrial) -> str:
    """Trial number, status, searched settings and all metrics, as plotly hover HTML."""
    lines = [f"<b>trial {t.number}</b> ({html.escape(status_of(t))})"]
    settings = settings_of(t)
    lines += [f"{html.escape(k)} = {html.escape(fmt_value(settings.get(k)))}" for k in result.recipe.space.searched]
    lines += [f"{html.escape(k)}: {html.escape(fmt_value(v))}" for k, v in metrics_of(result, t).items()]
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
        xv = float(t.number) if by_trial else metric_of(result, t, x)
        yv = metric_of(result, t, y)
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


def splom_panel(result: SearchResult) -> go.Figure | str:
    """Every pair of objectives over the feasible trials, the Pareto front in red."""
    trials, front = feasible_trials(result), {t.number for t in result.pareto_front}
    if not trials:
        return "No feasible trials to compare."
    dims = [dict(label=n, values=[t.values[i] for t in trials]) for i, n in enumerate(result.objectives)]
    fig = go.Figure(go.Splom(dimensions=dims, text=[_hover(result, t) for t in trials], hovertemplate="%{text}<extra></extra>",
                             marker=dict(size=7, color=[RED if t.number in front else BLUE for t in trials]),
                             diagonal_visible=False, showupperhalf=False))
    return fig.update_layout(title="Objectives pairwise (red: Pareto front)", template=TEMPLATE, height=620)


def parallel_panel(result: SearchResult) -> go.Figure | str:
    """Searched settings against the first objective (parallel coordinates, feasible trials)."""
    name, searched = next(iter(result.objectives)), result.recipe.space.searched
    trials = feasible_trials(result)
    if not trials or not searched:
        return "Needs completed feasible trials and at least one searched setting."
    dims = []
    for s in searched:
        vals = [settings_of(t).get(s) for t in trials]
        nums = [float(v) for v in vals if is_number(v)]
        if len(nums) == len(vals):
            log = min(nums) > 0 and max(nums) / min(nums) > 50
            dims.append(dict(label=f"log10 {s}" if log else s, values=[math.log10(v) if log else v for v in nums]))
        else:
            cats = sorted({str(v) for v in vals})
            dims.append(dict(label=s, values=[cats.index(str(v)) for v in vals], tickvals=list(range(len(cats))), ticktext=cats))
    objective = [metric_of(result, t, name) for t in trials]
    dims.append(dict(label=name, values=objective))
    fig = go.Figure(go.Parcoords(dimensions=dims, line=dict(color=objective, colorscale="Viridis", showscale=True,
                                                            reversescale=result.objectives[name] == "maximize")))
    return fig.update_layout(title=f"Searched settings vs {name} (feasible trials)", template=TEMPLATE, height=460)


def _objective(i: int, sign: float) -> Callable[[FrozenTrial], float]:
    return lambda t: sign * t.values[i]


def importances_panel(result: SearchResult) -> go.Figure | str:
    """How much each searched setting matters to each objective (PED-ANOVA over the feasible trials)."""
    trials = feasible_trials(result)
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


def history_panel(result: SearchResult) -> go.Figure | str:
    """Each objective by trial number, with the best value so far."""
    trials = feasible_trials(result)
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


def curves_panel(result: SearchResult) -> go.Figure | str:
    """Every trial's eval loss over its training budget: pruned ones dashed, the chosen one thick gold."""
    curves, best = result.curves(), result.best
    if not curves:
        return "No learning curves recorded."
    trials = {t.number: t for t in result.all_trials}
    fig = go.Figure()
    for number, points in sorted(curves.items()):
        t, chosen = trials[number], best is not None and number == best.number
        status = status_of(t)
        fig.add_trace(go.Scatter(
            x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers", name=f"trial {number} ({status})",
            line=dict(dash="dash" if status == "pruned" else "solid", width=4 if chosen else 1.5,
                      color=GOLD if chosen else (GREY if status != "complete" else None)),
            marker=dict(size=4), hovertemplate=f"trial {number} ({html.escape(status)})<br>%{{x:.3f}} of budget: %{{y:.4g}}<extra></extra>"))
    return fig.update_layout(title="Learning curves (dashed: pruned; thick gold: chosen)", template=TEMPLATE, height=460,
                             xaxis_title="fraction of the training budget", yaxis_title=_axis_title("eval_loss"))


def memory_figure(result: SearchResult) -> go.Figure | None:
    """Predicted (gate) vs measured peak memory per trial, the chosen one starred; None when nothing pairs up."""
    pts: list[tuple[float, float, FrozenTrial]] = []
    sources = set()
    for t in result.all_trials:
        predicted = (t.user_attrs.get(METRICS_KEY) or {}).get("predicted_memory_gb")
        peak = (t.user_attrs.get(INFO) or {}).get("peak_memory")
        measured = peak.get("bytes", 0) / 2**30 if isinstance(peak, dict) and is_number(peak.get("bytes")) else None
        measured = measured or metric_of(result, t, "peak_memory_gb")
        if is_number(predicted) and measured:
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
    fig = curves_panel(result)
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
    ax.set_title(f"{title}: {result.recipe.name} ({result.counted_trials} trials)", fontsize=12)
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


__all__ = ["pareto_figure", "curves_figure", "pareto_png"]
