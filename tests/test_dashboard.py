"""What optuna-dashboard shows of an llmtune study, read through the real dashboard's HTTP API.

No training: trials are asked and told the way the search loop does it (`check_resume`, `report_eval`
for each evaluation, `record.tell` at the end), on an SQLite storage that the dashboard serves on
loopback.
"""

from __future__ import annotations

import json
import math
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna
import pytest
from conftest import tiny_recipe_dict
from optuna.trial import TrialState

from llmtune.config.recipe import Recipe, recipe_from_dict
from llmtune.study import attrs, record
from llmtune.study.attrs import CURVE, STATUS
from llmtune.study.loop import check_resume
from llmtune.trial.result import TrialResult

optuna_dashboard = pytest.importorskip("optuna_dashboard")

optuna.logging.set_verbosity(optuna.logging.WARNING)

CURVE_DONE = [[0.0, 2.5], [1 / 3, 2.3], [2 / 3, 2.1], [1.0, 2.0]]
CURVE_PRUNED = [[0.0, 2.5], [1 / 3, 2.6]]


def make_recipe(tmp_path: Path, objectives: dict[str, str]) -> Recipe:
    data = tiny_recipe_dict(tmp_path, constraints={"trainable_params": {"max": 20000}})
    data["objectives"] = objectives  # tiny_recipe_dict would merge them into its own
    return recipe_from_dict(data)


def run_trial(study: optuna.Study, recipe: Recipe, status: str, curve: list[list[float]],
              metrics: dict[str, float]) -> int:
    """One trial as the loop runs it: evaluations stored as they come, then told."""
    trial = study.ask()
    trial.suggest_int("lora_r", 2, 16)
    storage, tid = study._storage, trial._trial_id
    storage.set_trial_user_attr(tid, STATUS, "running")
    for i, (fraction, loss) in enumerate(curve):  # Search._run_one's on_event
        storage.set_trial_user_attr(tid, CURVE, curve[:i + 1])
        record.report_eval(study, tid, recipe, fraction, loss)
    record.tell(study, trial, recipe, TrialResult(status=status, reason=status, metrics=metrics, curve=curve))
    return trial.number


def build_study(url: str, name: str, recipe: Recipe) -> dict[str, int]:
    study = optuna.create_study(storage=url, study_name=name, directions=list(recipe.objectives.values()),
                                sampler=optuna.samplers.TPESampler(n_startup_trials=1, seed=0))
    check_resume(study, recipe, recipe.space, "fingerprint")
    numbers = {
        "complete": run_trial(study, recipe, "complete", CURVE_DONE,
                              {"eval_loss": 2.0, "peak_memory_gb": 1.5, "trainable_params": 1000.0}),
        "oom": run_trial(study, recipe, "oom", [[0.0, 2.5]], {"trainable_params": 3000.0}),
        "pruned": run_trial(study, recipe, "pruned", CURVE_PRUNED, {"trainable_params": 2000.0}),
    }
    # The sampler still works with these trials in the study (TPE reads pruned trials' intermediate values).
    study.ask().suggest_int("lora_r", 2, 16)
    record.save_curves_plot(study)  # as the search loop redraws it (Search.redraw)
    return numbers


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """(storage URL, get(path) -> JSON) of an optuna-dashboard served on loopback."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.storages.RDBStorage(url)  # creates the schema before the dashboard opens it
    server = make_server("127.0.0.1", 0, optuna_dashboard.wsgi(url), handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def get(path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}{path}", timeout=10) as response:
            return json.loads(response.read())

    try:
        yield url, get
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def study_detail(get: Any, name: str) -> dict[str, Any]:
    study_id = next(s["study_id"] for s in get("/api/studies")["study_summaries"] if s["study_name"] == name)
    return get(f"/api/studies/{study_id}")  # type: ignore[no-any-return]


def user_attr(trial: dict[str, Any], key: str) -> Any:
    return json.loads(next(a["value"] for a in trial["user_attrs"] if a["key"] == key))


def test_dashboard_shows_objectives_constraints_curves_and_the_curves_plot(tmp_path: Path, dashboard: Any) -> None:
    url, get = dashboard
    multi = make_recipe(tmp_path, {"eval_loss": "minimize", "peak_memory_gb": "minimize"})
    single = make_recipe(tmp_path, {"eval_loss": "minimize"})
    n_multi = build_study(url, "multi", multi)
    n_single = build_study(url, "single", single)

    for name, recipe, numbers in [("multi", multi, n_multi), ("single", single, n_single)]:
        detail = study_detail(get, name)
        assert detail["objective_names"] == list(recipe.objectives)
        trials = {t["number"]: t for t in detail["trials"]}
        done, oom, pruned = (trials[numbers[k]] for k in ("complete", "oom", "pruned"))
        assert [t["state"] for t in (done, oom, pruned)] == ["Complete", "Complete", "Pruned"]

        # Constraints: one list, in one order ("infeasible", then the recipe's), on every told trial.
        assert oom["constraints"][0] > 0 and len(oom["constraints"]) == 2
        assert done["constraints"] == [0.0, 0.0] and pruned["constraints"] == [0.0, 0.0]
        assert user_attr(oom, attrs.CONSTRAINTS) == {"infeasible": 1.0, "trainable_params": 0.0}
        best = [t["number"] for t in detail["best_trials"]]
        assert numbers["oom"] not in best and numbers["complete"] in best
        # dominated by the feasible trial: no better in any objective, worse in one
        assert all(o >= d for o, d in zip(oom["values"], done["values"], strict=True)) and oom["values"] != done["values"]

        # The custom plot: every trial's curve.
        plots = {p["id"]: json.loads(p["graph_object"]) for p in detail["plotly_graph_objects"]}
        figure = plots[record.CURVES_PLOT_ID]
        lines = {t["name"]: t for t in figure["data"]}
        assert set(lines) == {f"#{numbers['complete']} complete", f"#{numbers['oom']} oom",
                              f"#{numbers['pruned']} pruned"}
        line = lines[f"#{numbers['complete']} complete"]
        assert line["y"] == [loss for _, loss in CURVE_DONE]
        assert line["x"] == pytest.approx([f for f, _ in CURVE_DONE], abs=1e-4)

        # Intermediate values: the curve at per-mille steps, where the loss is the one objective.
        if list(recipe.objectives) == ["eval_loss"]:
            assert detail["has_intermediate_values"]
            assert done["intermediate_values"] == [{"step": s, "value": v}
                                                   for s, v in [(0, 2.5), (333, 2.3), (667, 2.1), (1000, 2.0)]]
            assert [v["step"] for v in pruned["intermediate_values"]] == [0, 333]
        else:  # Optuna's TPE fails on pruned trials with intermediate values in multi-objective studies
            assert not done["intermediate_values"] and not pruned["intermediate_values"]

    print(json.dumps({name: [{k: t.get(k) for k in ("number", "state", "values", "constraints", "intermediate_values")}
                             for t in study_detail(get, name)["trials"]] for name in ("multi", "single")}))


def test_eval_step_and_non_finite_losses(tmp_path: Path) -> None:
    assert [record.eval_step(f) for f in (0.0, 1 / 9, 1 / 3, 0.5, 1.0, 1.0004, -0.1)] == [0, 111, 333, 500, 1000, 1000, 0]
    recipe = make_recipe(tmp_path, {"eval_loss": "minimize"})
    study = optuna.create_study()
    trial = study.ask()
    assert not record.report_eval(study, trial._trial_id, recipe, 0.5, math.nan)
    assert not record.report_eval(study, trial._trial_id, recipe, 0.5, math.inf)
    assert record.report_eval(study, trial._trial_id, recipe, 0.5, 2.0)
    assert study.trials[0].intermediate_values == {500: 2.0}


def test_infeasible_values_that_would_tie_are_made_strictly_worse(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, {"eval_loss": "minimize", "peak_memory_gb": "minimize"})
    study = optuna.create_study(directions=["minimize", "minimize"])
    done = study.ask()
    record.tell(study, done, recipe, TrialResult(status="complete", curve=[[1.0, 2.0]],
                                                 metrics={"eval_loss": 2.0, "peak_memory_gb": 1.5}))
    values = record.penalty_values(study, recipe, TrialResult(status="oom"))  # nothing measured
    assert values[0] > 2.0 and values[1] == 1.5 and values[0] == math.nextafter(2.0, math.inf)
    # measured better than the worst feasible: told the worst feasible instead
    values = record.penalty_values(study, recipe, TrialResult(status="oom", curve=[[0.0, 3.0]],
                                                               metrics={"peak_memory_gb": 0.5}))
    assert values == [3.0, 1.5]


def test_constraints_keep_the_named_format_of_a_resumed_older_study(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, {"eval_loss": "minimize"})
    study = optuna.create_study()
    old = study.ask()
    old.set_constraint("infeasible", 0.0)  # what llmtune 0.1.0 wrote
    old.set_constraint("trainable_params", 0.0)
    study.tell(old, 2.0)
    trial = study.ask()
    record.tell(study, trial, recipe, TrialResult(status="oom", metrics={"trainable_params": 1.0}))
    new = study.trials[-1]
    assert new.state == TrialState.COMPLETE
    assert new.constraints == {"infeasible": 1.0, "trainable_params": 0.0} == study.trials[0].constraints | {"infeasible": 1.0}
    assert "constraints" not in new.system_attrs


def test_dashboard_plot_pieces_shrink_with_the_figure() -> None:
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    study = optuna.create_study()
    record.save_dashboard_plot(study, "p", "x" * 5000)
    record.save_dashboard_plot(study, "p", "y" * 10)
    assert get_plotly_graph_objects(study._storage.get_study_system_attrs(study._study_id)) == {"p": "y" * 10}
