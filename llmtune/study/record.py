"""Telling Optuna how a trial ended: its status, metrics and curve as trial attributes, its
constraint values, and its state and objective values, each as the trial endings table says.

Out-of-memory and over-budget trials are told COMPLETE with constraint values > 0 (decision 3):
Optuna's samplers learn only from COMPLETE trials, and the constraints keep them off every front.
"""

from __future__ import annotations

import json

import optuna
from optuna.trial import TrialState

from llmtune.config.recipe import Recipe
from llmtune.study.attrs import CURVE, INFO, METRICS_KEY, REASON, STATUS
from llmtune.study.storage import retry
from llmtune.trial.endings import COMPLETE, ENDINGS, check_measured
from llmtune.trial.result import TrialResult, finite

# What of a result's info goes into the study (the rest stays in the trial's result.json).
KEPT_INFO = ("device", "gpu", "dtype", "wall_time_s", "process_wall_s", "load_s", "eval_s", "latency_s",
             "trained_tokens", "trained_examples", "padding_share", "total_params", "data_fingerprint",
             "adapter_dir", "log_tail", "truncated_examples", "peak_memory", "launch", "base_eval_loss_reused")


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


def penalty_values(study: optuna.Study, recipe: Recipe, result: TrialResult) -> list[float]:
    """Objective values for an infeasible trial: measured where known, else the worst seen so far.

    Constraint values > 0 mark these as infeasible, so the values matter little and are never shown
    as results (the Pareto front excludes them)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values and t.user_attrs.get(STATUS) == COMPLETE]
    out = []
    for i, (metric, direction) in enumerate(recipe.objectives.items()):
        v = result.metrics.get(metric)
        if metric == "eval_loss":
            v = result.base_eval_loss  # the untrained model's: what an infeasible config is known to reach
        if metric == "peak_memory_gb" and not finite(v):
            v = result.metrics.get("predicted_memory_gb")
        if not finite(v):
            seen = [t.values[i] for t in done if finite(t.values[i])]
            if seen:
                v = max(seen) if direction == "minimize" else min(seen)
            else:
                v = 0.0 if direction == "maximize" else 1e6
        out.append(float(v))  # type: ignore[arg-type]  # finite or replaced above
    return out


def tell(study: optuna.Study, trial: optuna.Trial, recipe: Recipe, result: TrialResult) -> None:
    """Record the result on the trial and finish it in the study; a retried ending queues its settings."""
    storage, tid = study._storage, trial._trial_id
    result.metrics = {k: v for k, v in result.metrics.items() if finite(v)}
    check_measured(result, list(recipe.objectives))
    row = ENDINGS[result.status]
    storage.set_trial_user_attr(tid, STATUS, result.status)
    storage.set_trial_user_attr(tid, REASON, result.reason)
    storage.set_trial_user_attr(tid, METRICS_KEY, result.metrics)
    storage.set_trial_user_attr(tid, CURVE, result.curve)
    info = {k: result.info[k] for k in KEPT_INFO if k in result.info}
    storage.set_trial_user_attr(tid, INFO, json.loads(json.dumps(info, default=str)))
    if row.optuna_state in ("COMPLETE", "PRUNED"):
        for key, value in constraint_values(recipe, result).items():
            trial.set_constraint(key, value)  # samplers read these: infeasible trials teach them
    if row.optuna_state == "COMPLETE":
        values = ([result.metrics[m] for m in recipe.objectives] if result.status == COMPLETE
                  else penalty_values(study, recipe, result))
        study.tell(trial, values, skip_if_finished=True)
    elif row.optuna_state == "PRUNED":
        study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
    else:
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    if row.retried:
        retry(study, trial, None)  # status and reason were recorded above
