"""The HTML report and the Pareto figure, on studies built in memory (no training)."""

from __future__ import annotations

import re
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from plotly.offline import get_plotlyjs

from llmtune.config.recipe import recipe_from_dict
from llmtune.deliver.figures import pareto_figure
from llmtune.deliver.report import write_report
from llmtune.deliver.results import SearchResult

optuna.logging.set_verbosity(optuna.logging.WARNING)
DISTS = {"learning_rate": FloatDistribution(1e-4, 1e-2, log=True), "lora_r": CategoricalDistribution([4, 8, 16])}
BUNDLE = get_plotlyjs()[:80]


def recipe(tmp_path, objectives: dict[str, str] | None = None, **extra: Any):
    return recipe_from_dict({
        "name": "report-test", "model": {"name": "llmtune/tiny"}, "data": {"source": "llmtune/tiny-tasks"},
        "search": {"learning_rate": {"low": 1e-4, "high": 1e-2}, "lora_r": [4, 8, 16]},
        "objectives": objectives or {"eval_loss": "minimize", "peak_memory_gb": "minimize"},
        "output_dir": str(tmp_path), **extra})


def trial(n: int, values: list[float] | None, status: str = "complete", infeasible: float = 0.0,
          metrics: dict[str, float] | None = None, names: tuple[str, ...] = ("eval_loss", "peak_memory_gb"),
          info: dict[str, Any] | None = None) -> optuna.trial.FrozenTrial:
    params = {"learning_rate": 10 ** (-4 + (n % 5) / 2), "lora_r": [4, 8, 16][n % 3]}
    if metrics is None:
        metrics = dict(zip(names, values, strict=True)) if values is not None and status == "complete" else {}
    state = {"complete": TrialState.COMPLETE, "oom": TrialState.COMPLETE, "over_budget": TrialState.COMPLETE,
             "pruned": TrialState.PRUNED}.get(status, TrialState.FAIL)
    curve = [[0.0, 3.0], [0.5, 2.0 + n / 10]] + ([[1.0, 1.5 + n / 10]] if status == "complete" else [])
    return optuna.trial.create_trial(
        state=state, values=values if state == TrialState.COMPLETE else None, params=params, distributions=DISTS,
        user_attrs={"llmtune.status": status, "llmtune.metrics": metrics, "llmtune.settings": params,
                    "llmtune.curve": curve if status in ("complete", "pruned") else [],
                    "llmtune.reason": "" if status == "complete" else f"the trial ended {status}",
                    "llmtune.info": info or {}},
        constraints={"infeasible": infeasible} if state == TrialState.COMPLETE else None)


# Two objectives, both minimized. Non-dominated feasible trials: 0, 1, 2 (hand-computed).
# 4 and 6 would dominate / join the front if they were feasible.
TWO_OBJ = [
    trial(0, [1.0, 5.0]), trial(1, [2.0, 3.0]), trial(2, [3.0, 1.0]), trial(3, [2.5, 3.5]),
    trial(4, [0.5, 0.5], status="oom", infeasible=1.0, metrics={}),
    trial(5, None, status="pruned", metrics={"eval_loss": 4.0, "peak_memory_gb": 2.0}),
    trial(6, [1.5, 4.0], infeasible=0.5), trial(7, [3.0, 2.0]), trial(8, None, status="crashed"),
]
FRONT = {0, 1, 2}


def make_result(tmp_path, trials, objectives: dict[str, str] | None = None, **extra: Any) -> SearchResult:
    r = recipe(tmp_path, objectives, **extra)
    study = optuna.create_study(directions=list(r.objectives.values()))
    study.add_trials(trials)
    return SearchResult(study, r)


def section(html_text: str, table_id: str) -> str:
    start = html_text.index(f'id="{table_id}"')
    return html_text[start:html_text.index("</table>", start)]


def test_pareto_figure_front_holds_exactly_the_nondominated_feasible_trials(tmp_path):
    result = make_result(tmp_path, TWO_OBJ)
    fig = pareto_figure(result)
    traces = {t.name: t for t in fig.data}
    assert set(traces["Pareto front"].customdata) == FRONT
    assert "lines" in traces["Pareto front"].mode
    assert set(traces["feasible trials"].customdata) == {3, 7}
    assert set(traces["infeasible / not complete"].customdata) == {5, 6}  # 4 and 8 have no measured values
    chosen = [t for t in fig.data if t.name.startswith("chosen")]
    assert len(chosen) == 1 and list(chosen[0].customdata) == [result.best.number] == [0]
    assert "lower is better" in fig.layout.xaxis.title.text and "GiB" in fig.layout.yaxis.title.text
    hover = traces["Pareto front"].text[0]
    assert "trial 0" in hover and "learning_rate" in hover and "lora_r" in hover and "peak_memory_gb" in hover
    assert "pruned" in traces["infeasible / not complete"].text[0] + traces["infeasible / not complete"].text[1]


def test_pareto_figure_axes_can_be_swapped(tmp_path):
    fig = pareto_figure(make_result(tmp_path, TWO_OBJ), x="peak_memory_gb", y="eval_loss")
    front = next(t for t in fig.data if t.name == "Pareto front")
    assert list(front.x) == [1.0, 3.0, 5.0] and list(front.y) == [3.0, 2.0, 1.0]


def test_report_is_self_contained_and_complete(tmp_path):
    info = {"peak_memory": {"bytes": int(2.5 * 2**30), "source": "rss"}}
    extra = [trial(n, [1.0 + n / 20, 5.0 - n / 3], info=info,
                   metrics={"eval_loss": 1.0 + n / 20, "peak_memory_gb": 5.0 - n / 3, "predicted_memory_gb": 2.4 + n / 10})
             for n in range(9, 15)]
    result = make_result(tmp_path, TWO_OBJ + extra, select={"by": "peak_memory_gb"})
    path = write_report(result, tmp_path / "out" / "report.html")
    text = path.read_text()
    assert path.exists() and text.count(BUNDLE) == 1
    assert not re.search(r"<script[^>]+src=[\"']?https?://", text) and "<link" not in text
    for key in ("pareto", "parallel", "importance", "history", "curves", "memory"):
        assert f'id="plot-{key}"' in text, key
    chosen = result.best.number
    box = text[text.index('id="chosen"'):text.index("</div></div></div>", text.index('id="chosen"'))]
    assert f"#{chosen}" in box and "peak_memory_gb" in box and "learning_rate" in box
    pareto_table = section(text, "pareto-table")
    front = {t.number for t in result.pareto_front}
    assert set(map(int, re.findall(r'data-trial="(\d+)"', pareto_table))) == front
    for infeasible in (4, 5, 6, 8):
        assert f'data-trial="{infeasible}"' not in pareto_table
        assert f'data-trial="{infeasible}"' in section(text, "all-trials")
    assert "report-test" in text and "oom: 1" in text


def test_report_with_three_objectives_adds_pairwise_view(tmp_path):
    names = ("eval_loss", "peak_memory_gb", "train_throughput")
    trials = [trial(n, [1 + n % 3, 5 - n % 4, 100 + n], names=names) for n in range(6)]
    result = make_result(tmp_path, trials, {"eval_loss": "minimize", "peak_memory_gb": "minimize",
                                            "train_throughput": "maximize"}, select={"by": "knee"})
    text = write_report(result, tmp_path / "r.html").read_text()
    assert 'id="plot-objectives"' in text and 'id="plot-pareto"' in text and "knee" in text


def test_single_objective(tmp_path):
    trials = [trial(n, [2.0 - n / 10], names=("eval_loss",)) for n in range(3)]
    result = make_result(tmp_path, trials, {"eval_loss": "minimize"})
    fig = pareto_figure(result)
    assert fig.layout.xaxis.title.text == "trial number"
    assert list(next(t for t in fig.data if t.name == "Pareto front").customdata) == [2]
    text = write_report(result, tmp_path / "r.html").read_text()
    assert 'id="plot-pareto"' in text and 'id="note-importance"' in text  # too few trials: a note
    assert "#2" in text


@pytest.mark.parametrize("trials", [
    [],
    [trial(0, [1.0, 2.0])],
    [trial(0, [0.5, 0.5], status="oom", infeasible=1.0, metrics={}), trial(1, None, status="crashed"),
     trial(2, None, status="pruned", metrics={"eval_loss": 3.0})],
], ids=["no-trials", "one-trial", "all-failed"])
def test_degenerate_studies_still_write_a_report(tmp_path, trials):
    result = make_result(tmp_path, trials)
    fig = pareto_figure(result)
    assert fig.data
    text = write_report(result, tmp_path / "r.html").read_text()
    assert "report-test" in text and text.count(BUNDLE) <= 1
    if len(trials) != 1:
        assert "none was chosen" in text
    if len(trials) == 3:
        assert "Every trial failed" in text and 'id="pareto-table">No trials here' in text


def test_memory_plot_stars_the_chosen_trial_and_names_cpu_measurements(tmp_path):
    info = {"peak_memory": {"bytes": int(2.5 * 2**30), "source": "rss"}}
    trials = [trial(n, [1.0 + n / 20, 5.0 - n / 3], info=info,
                    metrics={"eval_loss": 1.0 + n / 20, "peak_memory_gb": 5.0 - n / 3, "predicted_memory_gb": 2.4 + n / 10})
              for n in range(4)]
    result = make_result(tmp_path, trials, select={"by": "peak_memory_gb"})
    text = write_report(result, tmp_path / "r.html").read_text()
    assert 'id="plot-memory"' in text and "process RSS" in text
    from llmtune.deliver.figures import memory_figure

    fig = memory_figure(result)
    chosen = next(t for t in fig.data if t.name.startswith("chosen"))
    assert list(chosen.customdata) == [result.best.number] == [3]
    assert chosen.x[0] == pytest.approx(2.7) and chosen.y[0] == pytest.approx(2.5)  # predicted vs measured (RSS) of trial 3


def test_pareto_png_and_curves_figure(tmp_path):
    from PIL import Image

    from llmtune.deliver.figures import curves_figure, pareto_png

    result = make_result(tmp_path, TWO_OBJ)
    path = pareto_png(result, tmp_path / "img" / "pareto.png", dpi=100)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (750, 480)
        assert len(set(img.convert("RGB").getdata())) > 50  # drawn, not blank
    curves = curves_figure(result)
    thick = [t for t in curves.data if t.line.width == 4]
    assert [t.name for t in thick] == ["trial 0 (complete)"] and result.best.number == 0
    assert curves_figure(make_result(tmp_path, [])) is None


def test_a_full_disk_leaves_no_partial_outputs_and_says_where(tmp_path, monkeypatch):
    """finalize writes each file whole or not at all; ENOSPC is one SearchError naming the folder."""
    import errno
    from pathlib import Path

    import llmtune
    from llmtune.deliver.finalize import finalize

    result = make_result(tmp_path, [trial(0, [1.0, 2.0]), trial(1, [0.5, 3.0])])
    out = Path(result.recipe.output_dir)
    finalize(result.study, result.recipe)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real_replace = __import__("os").replace

    def disk_full(src, dst):
        if str(dst).endswith("report.html"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr("os.replace", disk_full)
    with pytest.raises(llmtune.SearchError, match=r"cannot write the search's results into .*No space left on device"):
        finalize(result.study, result.recipe)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after.keys() == before.keys() and after["report.html"] == before["report.html"]  # the old one, whole
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file or folder left
