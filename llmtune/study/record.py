"""Telling Optuna how a trial ended: its status, metrics and curve as trial attributes, its
constraint values, and its state and objective values, each as the trial endings table says.

Out-of-memory and over-budget trials are told COMPLETE with constraint values > 0 (decision 3):
Optuna's samplers learn only from COMPLETE trials, and the constraints keep them off every front.

What optuna-dashboard shows comes from here too: the constraints in the format it reads (a list),
the learning curve as intermediate values where Optuna can take them (`report_eval`), and a custom
plot of every trial's learning curve (`save_curves_plot`).
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from llmtune.config.recipe import Recipe
from llmtune.study import engine
from llmtune.study.attrs import (
    CONSTRAINTS,
    CURVE,
    DIR,
    INFO,
    METRICS_KEY,
    PAUSED,
    REASON,
    RETRY_OF,
    SETTINGS,
    STATUS,
)
from llmtune.study.promotion import carried
from llmtune.trial.endings import (
    COMPLETE,
    ENDINGS,
    ENVIRONMENT,
    INTERRUPTED,
    PRUNED,
    RUNNING,
    SURPLUS,
    SegmentEnd,
    decide,
)
from llmtune.trial.result import TrialResult, finite

# Optuna's constraints in the format every reader understands: a list under the trial system attribute
# "constraints" (what Optuna's own `constraints_func` writes). Optuna 5's FrozenTrial.constraints reads
# it as {"0": ..., "1": ...}; optuna-dashboard reads only this format, not Trial.set_constraint's
# "constraints:<name>" keys. Writing both would give Optuna every constraint twice.
_OPTUNA_CONSTRAINTS = "constraints"
_NAMED_CONSTRAINT_PREFIX = "constraints:"  # Trial.set_constraint's keys, which llmtune wrote before

# The custom plot of learning curves, stored as optuna-dashboard's `save_plotly_graph_object` stores one
# (optuna_dashboard/_custom_plot_data.py, 0.21): the figure's JSON cut into pieces of 2045 characters, each
# in the study system attribute "dashboard:plot_data:<id>:<i>" (i = 0, 1, ...); pieces left over from a
# longer earlier figure are set to "". The dashboard lists the ids found in these keys. Written here so
# that the search needs no optuna-dashboard installed.
CURVES_PLOT_ID = "llmtune-learning-curves"
_PLOT_PREFIX = "dashboard:plot_data:"
_PLOT_PIECE = 2045
_plot_lock = threading.Lock()  # the workers of one process write the pieces one figure at a time
# Across processes (several search processes on one study) one process at a time draws: the one holding
# the lease below, a study system attribute {"owner", "at"} it renews at each draw and another process
# takes over once it is older than PLOT_LEASE_S (its holder stopped). So two processes never interleave
# the pieces of two figures. The loop redraws at most every PLOT_EVERY_S, and once when it ends.
PLOT_WRITER = "llmtune.plot_writer"
PLOT_EVERY_S, PLOT_LEASE_S = 10.0, 60.0

# After an `environment` ending the worker that saw it waits before it claims another trial, twice as
# long each time the same settings failed so (up to ENVIRONMENT_WAIT_MAX_S): a full disk or a lost
# network is not fixed in seconds, and each try would cost a trial. Its retry is queued at once, for
# any worker whose surroundings work (another machine).
ENVIRONMENT_WAIT_S, ENVIRONMENT_WAIT_MAX_S = 5.0, 300.0

# What of a result's info goes into the study (the rest stays in the trial's result.json).
KEPT_INFO = ("device", "gpu", "dtype", "wall_time_s", "process_wall_s", "load_s", "eval_s", "latency_s",
             "trained_tokens", "trained_examples", "padding_share", "total_params", "data_fingerprint",
             "adapter_dir", "log_tail", "truncated_examples", "peak_memory", "launch", "base_eval_loss_reused",
             "resumed_from")


def constraint_values(recipe: Recipe, result: TrialResult) -> dict[str, float]:
    """Optuna constraint values (<= 0 feasible): "infeasible" for the endings that teach the sampler
    so, then one per recipe constraint, each scaled by its bound so violations of different units add up."""
    values = {"infeasible": 1.0 if ENDINGS[result.status].infeasible else 0.0}
    for metric, bound in recipe.constraints.items():
        v = result.metrics.get(metric)
        worst = 0.0
        if v is not None and finite(v):
            if "max" in bound:
                worst = max(worst, (v - bound["max"]) / max(abs(bound["max"]), 1e-9))
            if "min" in bound:
                worst = max(worst, (bound["min"] - v) / max(abs(bound["min"]), 1e-9))
        values[metric] = worst
    return values


def _is_feasible(trial: FrozenTrial) -> bool:
    return all(c <= 0 for c in trial.constraints.values())


def penalty_values(study: optuna.Study, recipe: Recipe, result: TrialResult) -> list[float]:
    """Objective values for an infeasible trial: measured where known, else the worst seen so far;
    never better than the worst feasible trial's.

    Constraint values > 0 mark these as infeasible, so the values matter little to llmtune and are never
    shown as its results (its Pareto front excludes them). Readers that ignore constraints, such as
    optuna-dashboard's "Best Trials", rank by values alone: once a feasible trial exists, every feasible
    trial dominates an infeasible one, whose values are each at least as bad as the worst feasible value
    (and, where they would all tie with it, the first is moved by the least float step)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values and t.user_attrs.get(STATUS) == COMPLETE]
    feasible = [t for t in done if _is_feasible(t)]
    out: list[float] = []
    worst_feasible: list[float | None] = []
    for i, (metric, direction) in enumerate(recipe.objectives.items()):
        worse = max if direction == "minimize" else min
        v = result.metrics.get(metric)
        if metric == "eval_loss":
            v = result.base_eval_loss  # the untrained model's: what an infeasible config is known to reach
        if metric == "peak_memory_gb" and not finite(v):
            v = result.metrics.get("predicted_memory_gb")
        if not finite(v):
            seen = [t.values[i] for t in done if finite(t.values[i])]
            if seen:
                v = worse(seen)
            else:
                v = 0.0 if direction == "maximize" else 1e6
        seen_feasible = [t.values[i] for t in feasible if finite(t.values[i])]
        worst = worse(seen_feasible) if seen_feasible else None
        if worst is not None:
            v = worse(v, worst)
        worst_feasible.append(worst)
        out.append(float(v))  # type: ignore[arg-type]  # finite or replaced above
    if out and all(w is not None and v == w for v, w in zip(out, worst_feasible, strict=True)):
        # ties the worst feasible values everywhere: dominated by no one; make it strictly worse
        out[0] = math.nextafter(out[0], math.inf if list(recipe.objectives.values())[0] == "minimize" else -math.inf)
    return out


def _named_constraints(study: optuna.Study) -> bool:
    """Whether the study's trials carry Trial.set_constraint's named keys (llmtune 0.1.0 wrote those).
    A resumed study of that kind keeps its format: GPSampler needs one key set on every trial."""
    first = next(iter(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))), None)
    return first is not None and any(k.startswith(_NAMED_CONSTRAINT_PREFIX) for k in first.system_attrs)


def record_constraints(study: optuna.Study, trial: optuna.Trial, recipe: Recipe, result: TrialResult) -> None:
    """The trial's constraint values, for the samplers and optuna-dashboard (see _OPTUNA_CONSTRAINTS),
    and by name as a user attribute. Every COMPLETE or PRUNED trial carries the same ones, in one order:
    "infeasible", then the recipe's constraints."""
    values = constraint_values(recipe, result)
    storage, tid = engine.storage(study), engine.trial_id(trial)
    storage.set_trial_user_attr(tid, CONSTRAINTS, values)
    if _named_constraints(study):
        for key, value in values.items():
            trial.set_constraint(key, value)
    else:
        storage.set_trial_system_attr(tid, _OPTUNA_CONSTRAINTS, [float(v) for v in values.values()])


def eval_step(fraction: float) -> int:
    """The intermediate-value step of an evaluation: per mille of the training budget."""
    return min(1000, max(0, round(fraction * 1000)))


def curve_is_objective(recipe: Recipe) -> bool:
    """Whether the learning curve may go to Optuna as intermediate values: only when eval_loss is the
    study's one objective. Optuna tells a PRUNED trial's last intermediate value as its objective value
    (right only when that objective is the loss), and TPESampler ranks pruned trials by
    `study.direction`, which raises in a multi-objective study once a pruned trial has intermediate
    values (Optuna 5.1): every later `ask` would fail. Other studies get the curves as a plot only."""
    return list(recipe.objectives) == ["eval_loss"]


def report_eval(study: optuna.Study, trial_id: int, recipe: Recipe, fraction: float, eval_loss: float) -> bool:
    """Record one evaluation of a running trial as an Optuna intermediate value at step `eval_step`
    (optuna-dashboard plots them), where `curve_is_objective` allows and the loss is finite. Returns
    whether it was written. Raises UpdateFinishedTrialError when the trial is already finished."""
    if not curve_is_objective(recipe) or not finite(eval_loss):
        return False
    engine.storage(study).set_trial_intermediate_value(trial_id, eval_step(fraction), float(eval_loss))
    return True


def dashboard_curves_figure(trials: list[FrozenTrial]) -> Any:
    """optuna-dashboard's learning-curves plot, drawn from the trials as stored while the search runs (every
    trial's eval loss against the fraction of the budget; pruned dotted). The report's figure of the same
    curves is `deliver.figures.curves_figure`, drawn from a finished search's results."""
    import plotly.graph_objects as go

    dash = {COMPLETE: None, "pruned": "dot"}
    traces = []
    for t in trials:
        points = [(f, loss) for f, loss in t.user_attrs.get(CURVE) or [] if finite(f) and finite(loss)]
        if not points:
            continue
        status = t.user_attrs.get(STATUS) or t.state.name.lower()
        traces.append(go.Scatter(
            x=[round(f, 4) for f, _ in points], y=[float(f"{loss:.6g}") for _, loss in points],
            mode="lines+markers", name=f"#{t.number} {status}", line={"dash": dash.get(status, "dash")}))
    return go.Figure(data=traces, layout={
        "template": go.layout.Template(),  # plotly's default template would add ~10 kB to every save
        "title": {"text": "Learning curves"}, "legend": {"title": {"text": "trial"}},
        "xaxis": {"title": {"text": "fraction of the training budget"}},
        "yaxis": {"title": {"text": "eval loss"}}})


def save_dashboard_plot(study: optuna.Study, plot_id: str, figure_json: str) -> None:
    """Store a plotly figure's JSON as optuna-dashboard's custom plot `plot_id` (see _PLOT_PREFIX),
    replacing the one stored before under that id."""
    storage, sid = engine.storage(study), engine.study_id(study)
    prefix = f"{_PLOT_PREFIX}{plot_id}:"
    pieces = [figure_json[i:i + _PLOT_PIECE] for i in range(0, len(figure_json), _PLOT_PIECE)]
    with _plot_lock:
        for i, piece in enumerate(pieces):
            storage.set_study_system_attr(sid, f"{prefix}{i}", piece)
        stored = sum(1 for k in storage.get_study_system_attrs(sid) if k.startswith(prefix))
        for i in range(len(pieces), stored):
            storage.set_study_system_attr(sid, f"{prefix}{i}", "")


def take_plot_lease(study: optuna.Study, owner: str, lease_s: float = PLOT_LEASE_S) -> bool:
    """Whether `owner` (a search process) may draw the study's dashboard figures now: it holds the lease,
    or the lease is free or expired, in which case it takes it. Of two processes taking an expired lease
    at the same moment, the later write wins and the earlier sees it on reading back."""
    storage, sid = engine.uncached(study), engine.study_id(study)
    held = storage.get_study_system_attrs(sid).get(PLOT_WRITER)
    now = time.time()
    if isinstance(held, dict) and held.get("owner") != owner and now - float(held.get("at", 0)) < lease_s:
        return False
    storage.set_study_system_attr(sid, PLOT_WRITER, {"owner": owner, "at": now})
    mine = storage.get_study_system_attrs(sid).get(PLOT_WRITER)
    return isinstance(mine, dict) and mine.get("owner") == owner


def save_curves_plot(study: optuna.Study) -> None:
    """Redraw the dashboard's learning-curves plot (`CURVES_PLOT_ID`) from every trial's stored curve."""
    save_dashboard_plot(study, CURVES_PLOT_ID, dashboard_curves_figure(study.get_trials(deepcopy=False)).to_json())


def store_settings(study: optuna.Study, trial: optuna.Trial, values: dict[str, Any]) -> None:
    """The settings a trial runs with (at its start; again when probes chose its execution variant)."""
    engine.storage(study).set_trial_user_attr(engine.trial_id(trial), SETTINGS,
                                              json.loads(json.dumps(values, default=str)))


def started(study: optuna.Study, trial: optuna.Trial, values: dict[str, Any], trial_dir: Path) -> None:
    """A claimed trial starts: its settings, its folder and the status `running`."""
    store_settings(study, trial, values)
    storage, tid = engine.storage(study), engine.trial_id(trial)
    storage.set_trial_user_attr(tid, DIR, str(trial_dir))
    storage.set_trial_user_attr(tid, STATUS, RUNNING)


def retries(study: optuna.Study, trial: FrozenTrial | optuna.Trial, status: str) -> int:
    """How many times the settings of `trial` ended `status` before it: counted back along the trials it
    retries (each retry names the trial it retries, RETRY_OF)."""
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    count, seen = 0, set()
    number = trial.user_attrs.get(RETRY_OF)
    while isinstance(number, int) and number in by_number and number not in seen:
        seen.add(number)
        earlier = by_number[number].user_attrs
        count += earlier.get(STATUS) == status
        number = earlier.get(RETRY_OF)
    return count


def retry(study: optuna.Study, trial: FrozenTrial | optuna.Trial) -> None:
    """Queue a trial's exact settings again (the retry counts towards no n_trials). Queued trials are the
    only WAITING ones (a surplus trial is ended, not given back: `give_up`), so the next `ask` of any
    worker runs it."""
    study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number, **carried(trial)}, skip_if_exists=False)


def tell(study: optuna.Study, trial: optuna.Trial, recipe: Recipe, result: TrialResult, *,
         segment: SegmentEnd | None = None) -> TrialResult:
    """Record how a trial ended and finish it in the study: the one recorder every finished trial passes.

    The ending is decided first (`endings.decide`: a missing objective, a PBT segment, the retry limits),
    then written: status, reason, metrics, curve, kept info, constraints, Optuna's state and values; a
    retried ending queues its settings again. Returns the decided result. It neither waits nor draws:
    back-off is the loop's, the dashboard's figures are redrawn by the loop (`save_curves_plot`)."""
    storage, tid = engine.storage(study), engine.trial_id(trial)
    result = decide(result, list(recipe.objectives), earlier=lambda status: retries(study, trial, status),
                    segment=segment)
    row = ENDINGS[result.status]
    storage.set_trial_user_attr(tid, STATUS, result.status)
    storage.set_trial_user_attr(tid, REASON, result.reason)
    storage.set_trial_user_attr(tid, METRICS_KEY, result.metrics)
    storage.set_trial_user_attr(tid, CURVE, result.curve)
    info = {k: result.info[k] for k in KEPT_INFO if k in result.info}
    storage.set_trial_user_attr(tid, INFO, json.loads(json.dumps(info, default=str)))
    paused = result.info.get("paused")
    if result.status == PRUNED and isinstance(paused, dict):  # its state was saved: it may be promoted later
        storage.set_trial_user_attr(tid, PAUSED, {"fraction": paused["fraction"], "state": paused["state"]})
    if row.optuna_state in ("COMPLETE", "PRUNED"):
        record_constraints(study, trial, recipe, result)  # samplers read these: infeasible trials teach them
    if row.optuna_state == "COMPLETE":
        values = ([result.metrics[m] for m in recipe.objectives] if not row.infeasible
                  else penalty_values(study, recipe, result))
        study.tell(trial, values, skip_if_finished=True)
    elif row.optuna_state == "PRUNED":
        study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
    else:
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    if row.retried:
        retry(study, trial)
    return result


def give_up(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    """A claimed trial that will not run here: a queued one (a retry, a prior) goes back to WAITING,
    params and all, for the next `ask`; a fresh one ends as `surplus` (FAIL, counted nowhere)."""
    if engine.is_queued(trial):
        engine.storage(study).set_trial_state_values(engine.trial_id(trial), TrialState.WAITING)
    else:
        surplus(study, trial, reason)


def surplus(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    """A claimed trial that must not run, queued or not (PBT runs only its own queued segments): `surplus`."""
    storage, tid = engine.storage(study), engine.trial_id(trial)
    storage.set_trial_user_attr(tid, STATUS, SURPLUS)
    storage.set_trial_user_attr(tid, REASON, reason)
    storage.set_trial_state_values(tid, TrialState.FAIL)


def lost(study: optuna.Study, trial_id: int, reason: str) -> bool:
    """A running trial whose worker is gone: mark it `interrupted` (while it is unfinished: Optuna freezes
    finished trials), fail it and queue its settings again. Several workers may find it at once: the
    change to FAIL succeeds for exactly one of them (the storage locks the row and refuses to update a
    finished trial), and only that one queues the retry. Returns whether this call did."""
    storage = engine.storage(study)
    try:
        storage.set_trial_user_attr(trial_id, STATUS, INTERRUPTED)
        storage.set_trial_user_attr(trial_id, REASON, reason)
        if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # another worker failed it first and queued the retry
    retry(study, storage.get_trial(trial_id))
    return True


def add_variant(study: optuna.Study, recipe: Recipe, params: dict[str, Any],
                distributions: dict[str, Any], result: TrialResult, extra: dict[str, Any]) -> int:
    """An execution variant of a full trial (study/probes.py) as a finished trial of its own; returns its number."""
    measured = all(finite(result.metrics.get(m)) for m in recipe.objectives)
    values = ([result.metrics[m] for m in recipe.objectives] if result.status == COMPLETE and measured
              else penalty_values(study, recipe, result))
    constraints = constraint_values(recipe, result)
    if result.status == COMPLETE and not measured:
        constraints["infeasible"] = 1.0  # an objective could not be measured for this layout
    frozen = optuna.trial.create_trial(
        params=params, distributions=distributions, values=values,
        user_attrs={STATUS: result.status, REASON: result.reason, METRICS_KEY: result.metrics,
                    INFO: json.loads(json.dumps(result.info, default=str)), CONSTRAINTS: constraints, **extra},
        system_attrs={_OPTUNA_CONSTRAINTS: [float(v) for v in constraints.values()]})
    # Study.add_trial does this, but returns nothing: the number comes with the id, not from re-reading the study
    storage = engine.storage(study)
    trial_id = storage.create_new_trial(engine.study_id(study), template_trial=frozen)
    return storage.get_trial_number_from_id(trial_id)


def environment_wait(study: optuna.Study, trial: optuna.Trial) -> float:
    """Seconds the worker that saw an `environment` ending waits before its next trial: twice as long each
    time the same settings failed so (up to ENVIRONMENT_WAIT_MAX_S)."""
    return float(min(ENVIRONMENT_WAIT_MAX_S, ENVIRONMENT_WAIT_S * 2 ** retries(study, trial, ENVIRONMENT)))
