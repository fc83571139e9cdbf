"""The search: an Optuna study driven by ask/tell, one child process per trial.

What llmtune adds to Optuna (ARCHITECTURE decisions 1-3): trials run isolated in processes;
out-of-memory and over-budget trials are told as *infeasible* (constraint values > 0) so samplers
steer away from them; a killed or interrupted search resumes where it stopped and retries the
trial it lost; pruning works with several objectives through the recorded learning curves.

Scale-out (ARCHITECTURE decision 7) is Optuna's own distributed mode (storage and heartbeats:
`llmtune.storage`): any number of search processes,
on any number of machines, share one study in one storage (PostgreSQL). Each process counts the
study's n_trials from the storage (see `Search._claim`), and a process that dies mid-trial is found by
its missing heartbeats; its trial is failed as interrupted and retried by whichever process sees it
first (`fail_stale`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from llmtune import __version__, zygote
from llmtune.pruning import make_pruner
from llmtune.recipe import Recipe
from llmtune.result import (
    COMPLETE,
    CRASHED,
    INFEASIBLE,
    INTERRUPTED,
    OVER_BUDGET,
    PRUNED,
    SURPLUS,
    TrialResult,
    finite,
)
from llmtune.runner import TrialJob, run_trial_process
from llmtune.sampling import default_sampler
from llmtune.space import SearchSpace
from llmtune.storage import (  # noqa: F401  (SearchError, mask_url, open_storage, RETRY_OF: re-exported)
    CURVE,
    DIR,
    INFO,
    METRICS_KEY,
    OWNER,
    REASON,
    RETRY_OF,
    RUNG_METRICS,
    SETTINGS,
    STATUS,
    SearchError,
    _Heartbeat,
    _retry,
    counted,
    fail_stale,
    heartbeat_settings,
    mask_url,
    open_storage,
    open_study,
    recover_lost_trials,
    storage_url,
    worker_id,
)


def make_sampler(recipe: Recipe, space: SearchSpace, parallel: bool) -> tuple[optuna.samplers.BaseSampler, str]:
    """The sampler the recipe names; ``auto`` picks by objectives, space and budget and says why."""
    name, seed = recipe.study.sampler, recipe.study.seed
    n_obj = len(recipe.objectives)
    n_trials = recipe.study.n_trials or 100
    if name == "auto":
        grid = space.grid_size()
        if grid is not None and grid <= n_trials:
            name, why = "grid", f"the space has {grid} points, within n_trials={n_trials}: try them all"
        elif n_obj > 1 and n_trials > 200:
            name, why = "nsga2", f"{n_obj} objectives and a large budget ({n_trials} trials)"
        else:  # multivariate TPE that never repeats a configuration (benchmarks/replay.py measures the choice)
            default, why = default_sampler(space, n_obj, n_trials, seed, parallel)
            return default, f"tpe ({why})"
    else:
        why = "as the recipe asks"
    startup = max(4, min(10, n_trials // 4))
    if name == "tpe":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, n_startup_trials=startup,
            constant_liar=parallel)
    elif name == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=max(8, min(50, n_trials // 5)))
    elif name == "gp":
        try:
            import scipy  # noqa: F401
        except ImportError:
            raise SearchError("study.sampler gp needs scipy: pip install scipy") from None
        sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    elif name == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    elif name == "grid":
        points = space.grid()
        if points is None:
            raise SearchError("study.sampler grid needs every searched setting to be a list of choices or a range with step")
        sampler = _GridSampler(points or {"_": [0]}, seed=seed)
    elif name == "cmaes":
        if n_obj > 1:
            raise SearchError("study.sampler cmaes handles one objective only; use tpe or nsga2")
        sampler = optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup)
    else:  # validated by the recipe already
        raise SearchError(f"unknown sampler {name!r}")
    return sampler, f"{name} ({why})"


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid, without its `study.stop()` (only legal inside `optimize`; we cap n_trials instead)."""

    def after_trial(self, study, trial, state, values) -> None:  # type: ignore[no-untyped-def]
        return None


def _recipe_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as JSON for the study and the trial processes, with the storage password masked
    (the URL was expanded from ${ENV} at load; it must not land in spec.json or the dashboard)."""
    d = json.loads(json.dumps(recipe.to_dict(), default=str))
    if d.get("study", {}).get("storage"):
        d["study"]["storage"] = mask_url(d["study"]["storage"])
    return d


def base_eval_key(recipe: dict[str, Any], values: dict[str, Any], data_fingerprint: str) -> str:
    """The study attribute that holds the untrained adapter's eval loss for a trial with these settings.

    LoRA starts as the identity (its B matrices are zero), so before training every trial computes the
    base model's loss: the same for every trial with the same model, precision, quantization, device
    and eval set, whatever its rank, targets, learning rate, context length or packing. One trial
    measures it; the later ones (on any worker: it lives in the study) skip that evaluation when they run
    on the same context (device, GPU, dtype, attention implementation, library versions: the trial checks).
    """
    what = {"model": recipe.get("model"), "data": recipe.get("data"), "fingerprint": data_fingerprint,
            "device": recipe.get("train", {}).get("device"), "eval_batch_size": recipe.get("train", {}).get("eval_batch_size"),
            "quantization": {k: v for k, v in values.items() if k == "quantization" or k.startswith("bnb_")}}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"llmtune.base_eval_loss.{digest}"


def check_resume(study: optuna.Study, recipe: Recipe, space: SearchSpace, data_fingerprint: str) -> None:
    """A study resumes only with the same objectives, search space and data; else say what to do."""
    attrs = study.user_attrs
    expected = {
        "llmtune.objectives": recipe.objectives,
        "llmtune.space": space.signature(),
        "llmtune.data_fingerprint": data_fingerprint,
        "llmtune.recipe_fingerprint": recipe.fingerprint(),
    }
    if "llmtune.space" not in attrs:
        for k, v in expected.items():
            study.set_user_attr(k, v)
        study.set_user_attr("llmtune.recipe", _recipe_dict(recipe))
        study.set_user_attr("llmtune.version", __version__)
        return
    what = {"llmtune.objectives": "objectives", "llmtune.space": "search space",
            "llmtune.data_fingerprint": "data", "llmtune.recipe_fingerprint": "training settings"}
    changed = [what[k] for k, v in expected.items() if json.dumps(attrs.get(k), sort_keys=True) != json.dumps(v, sort_keys=True)]
    if changed:
        raise SearchError(
            f"study {study.study_name!r} was run with different {', '.join(changed)}; its trials would not compare. "
            f"Start a new study: pass --study-name NEW (or set study.study_name), or use another output_dir.")


def _physical_gpus(entry: str) -> str:
    """CUDA_VISIBLE_DEVICES for a --gpus entry ("1" or a group "0+1"). Indices count the GPUs this
    process sees: under CUDA_VISIBLE_DEVICES=2,3, --gpus 0 is GPU 2."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    parts = [p.strip() for p in entry.replace("+", ",").split(",")]
    if not entry.strip() or not all(parts):
        raise SearchError(f"--gpus: {entry!r} is not a GPU index or a group like 0+1; e.g. --gpus 0,1 or --gpus 0+1,2+3")
    out = []
    for p in parts:
        if visible and p.isdigit():
            if int(p) >= len(visible):
                raise SearchError(f"--gpus: GPU {p} is not among the {len(visible)} visible ones "
                                  f"(CUDA_VISIBLE_DEVICES={','.join(visible)}); use 0 to {len(visible) - 1}")
            p = visible[int(p)]
        out.append(p)
    return ",".join(out)


class Search:
    """One search process: any number of worker threads, each running trial processes in turn.

    `gpus` pins each worker to one GPU (CUDA_VISIBLE_DEVICES); an entry may name a group, "0+1", which
    the trial sees whole (the harness still loads the model on the group's first GPU). Many search processes may share
    one study (same storage and study name): together they run n_trials trials.
    """

    def __init__(self, recipe: Recipe, *, storage: str | None = None, n_trials: int | None = None,
                 workers: int = 1, gpus: list[str] | None = None, study_name: str | None = None,
                 progress: Any = None, log: Callable[[str], None] = print):
        self.recipe = recipe
        self.space = recipe.space
        self.n_trials = n_trials or recipe.study.n_trials
        self.gpus = [_physical_gpus(g) for g in gpus or []]
        self.workers = len(self.gpus) if self.gpus else max(1, workers)
        self.url, self.storage_given = storage_url(recipe, storage), storage
        self.study_name = study_name or recipe.study.study_name or recipe.name
        self.log = log
        self.progress = progress
        self.pruner = make_pruner(recipe.study.pruner, objectives=dict(recipe.objectives),
                                  **recipe.study.pruner_settings)
        self.stop = threading.Event()
        self.output_dir = Path(recipe.output_dir)
        self._lock = threading.Lock()
        self.started = time.time()
        self.errors: list[BaseException] = []
        self.fork_server: zygote.ForkServer | None = None
        gate = recipe.study.memory_gate
        from llmtune.hardware import gpu_count

        self.memory_gate = gate == "on" or (gate == "auto" and recipe.train.device != "cpu" and gpu_count() > 0)

    # -- setup ---------------------------------------------------------------------------------
    def prepare(self) -> optuna.Study:
        from llmtune.harness.data import load_splits
        from llmtune.tiny import resolve_data_source, resolve_model_name

        # Build the offline demo assets once here, not in N trial processes at once.
        resolve_model_name(self.recipe.model.name, log=self.log)
        resolve_data_source(self.recipe.data.source, log=self.log)
        self.data_fingerprint = load_splits(self.recipe.data).fingerprint
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Trials run in parallel with other threads, or with other processes on a named (shared) storage:
        # TPE then treats running trials as bad guesses (constant liar) so workers spread out.
        shared = bool(self.storage_given or os.environ.get("LLMTUNE_STORAGE") or self.recipe.study.storage)
        self.sampler, self.sampler_why = make_sampler(self.recipe, self.space, self.workers > 1 or shared)
        grid = self.space.grid_size()
        if isinstance(self.sampler, optuna.samplers.GridSampler) and grid is not None and (self.n_trials or grid) > grid:
            self.log(f"the grid has {grid} point(s): running {grid} trial(s), not {self.n_trials}")
            self.n_trials = grid
        directions = list(self.recipe.objectives.values())
        study = open_study(self.url, self.study_name, directions, self.sampler)
        if list(d.name.lower() for d in study.directions) != directions:
            raise SearchError(f"study {self.study_name!r} exists with other objectives; pass --study-name NEW")
        check_resume(study, self.recipe, self.space, self.data_fingerprint)
        lost = recover_lost_trials(study)
        if lost:
            self.log(f"retrying trial(s) {', '.join(map(str, lost))} that a stopped search left unfinished")
        self.study = study
        return study

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> optuna.Study:
        study = self.prepare()
        self.log(f"study {self.study_name!r} in {mask_url(self.url)}; sampler {self.sampler_why}; "
                 f"pruner {self.pruner.describe()}; {self.workers} worker(s)")
        # Trials fork from one warm interpreter (llmtune.zygote): the imports are paid once, not per trial.
        self.fork_server = zygote.prewarm()
        if self.progress:
            self.progress.start(self)
        threads = [threading.Thread(target=self._worker, args=(i,), daemon=True) for i in range(self.workers)]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(timeout=0.2)
        except KeyboardInterrupt:
            self.stop.set()
            self.log("stopping: the running trial(s) are marked interrupted and will be retried on the next run")
            for t in threads:
                t.join(timeout=30)
            raise
        finally:
            if self.progress:
                self.progress.stop()
        if self.errors:
            raise self.errors[0]
        return study

    def _budget(self) -> str:
        """"start" a trial, "wait" (every slot is taken, but a running trial may still be lost and need
        a retry) or "done". Counted from the storage, so all processes on the study share n_trials."""
        if self.stop.is_set():
            return "done"
        if self.recipe.study.timeout and time.time() - self.started > self.recipe.study.timeout:
            return "done"
        lost = fail_stale(self.study)
        if lost:
            self.log(f"trial(s) {', '.join(map(str, lost))} lost their worker (no heartbeat): retrying")
        if self.n_trials is None:
            return "start"
        done, running = counted(self.study)
        if done + running < self.n_trials:
            return "start"
        return "wait" if done < self.n_trials else "done"

    def _claim(self) -> optuna.Trial | None:
        """The next trial to run, or None when the study has its n_trials.

        Several processes may ask at once for the last slot. Each checks again after `ask`, when its
        own trial is in the storage: if finished + running trials now exceed n_trials, it gives the
        trial up and tries later. A queued retry goes back to WAITING (params and all) for the next
        ask; a fresh trial, whose settings are not sampled yet, is ended as FAIL with status
        ``surplus`` (it counts for nothing), so that WAITING trials are always retries and run first. Of two racing asks, the one that checks second sees both trials and gives back, so
        n_trials is never exceeded; if both give back, random backoff breaks the tie. Storage reads
        see every committed trial (Optuna creates trials under a lock on the study row).
        """
        interval = heartbeat_settings()[0]
        while True:
            with self._lock:  # within one process, threads never race each other
                state = self._budget()
                if state == "start":
                    trial = self.study.ask()
                    done, running = counted(self.study)
                    storage, tid = self.study._storage, trial._trial_id
                    if self.n_trials is None or done + running <= self.n_trials:
                        storage.record_heartbeat(tid)  # type: ignore[attr-defined]  # found from now on if it dies
                        storage.set_trial_system_attr(tid, OWNER, worker_id())
                        return trial
                    if "fixed_params" in trial._cached_frozen_trial.system_attrs:
                        storage.set_trial_state_values(tid, TrialState.WAITING)  # a retry: keep it queued
                    else:
                        storage.set_trial_user_attr(tid, STATUS, SURPLUS)
                        storage.set_trial_user_attr(tid, REASON, "another worker took the last of n_trials")
                        storage.set_trial_state_values(tid, TrialState.FAIL)
            if state == "done":
                return None
            self.stop.wait(min(5.0, max(0.5, interval / 4)) * random.uniform(0.5, 1.5))

    def _worker(self, index: int) -> None:
        try:
            self._work(index)
        except BaseException as e:  # surfaced by run(): a dead worker must not end the search silently
            self.errors.append(e)
            self.stop.set()

    def _work(self, index: int) -> None:
        env: dict[str, str] = {}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[index]
        if self.workers > 1 and not self.gpus:
            env["LLMTUNE_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.workers))
        while (trial := self._claim()) is not None:
            with _Heartbeat(self.study._storage, trial, self.log):
                self._run_one(trial, env)

    def _run_one(self, trial: optuna.Trial, env: dict[str, str]) -> None:
        values = self.space.suggest(trial)
        storage, tid = self.study._storage, trial._trial_id
        trial_dir = (self.output_dir / "trials" / f"{trial.number:04d}").resolve()
        storage.set_trial_user_attr(tid, SETTINGS, json.loads(json.dumps(values, default=str)))
        storage.set_trial_user_attr(tid, DIR, str(trial_dir))
        storage.set_trial_user_attr(tid, STATUS, "running")
        if self.progress:
            self.progress.trial_started(trial.number, values)
        reason, predicted = self._gate(values)
        if reason:
            result = TrialResult(status=OVER_BUDGET, reason=reason, settings=values)
        else:
            curve: list[list[float]] = []
            rung_metrics: list[list[Any]] = []
            recipe = _recipe_dict(self.recipe)
            base_key = base_eval_key(recipe, values, self.data_fingerprint)
            base_eval = self.study.user_attrs.get(base_key)

            def on_event(event: dict[str, Any]) -> bool:
                if self.progress:
                    self.progress.trial_event(trial.number, event)
                if event.get("event") != "eval":
                    return False
                curve.append([event["fraction"], event["eval_loss"]])
                if event["fraction"] == 0.0 and base_eval is None and finite(event["eval_loss"]):
                    # the next trials reuse it where they run on the same context
                    self.study.set_user_attr(base_key, {"loss": event["eval_loss"], "context": event.get("context")})
                # what the trial has measured so far of its other objectives: the pruner ranks on these too
                measured = {k: float(v) for k, v in (event.get("metrics") or {}).items() if finite(v)}
                rung_metrics.append([event["fraction"], measured])
                try:
                    storage.set_trial_user_attr(tid, CURVE, curve)
                    storage.set_trial_user_attr(tid, RUNG_METRICS, rung_metrics)
                except optuna.exceptions.UpdateFinishedTrialError:
                    return True  # declared lost by another worker (missed heartbeats): its retry runs
                return self.pruner.should_prune(self.study, trial.number, event["fraction"], event["eval_loss"],
                                                measured)

            job = TrialJob(recipe=recipe, values=values, out_dir=trial_dir, fractions=self._fractions(),
                           trial_number=trial.number, timeout=self.recipe.study.trial_timeout, env=env,
                           fork_server=self.fork_server, base_eval=base_eval if isinstance(base_eval, dict) else None)
            result = run_trial_process(job, on_event=on_event, stop=self.stop)
        if predicted is not None:
            result.metrics["predicted_memory_gb"] = predicted
        try:
            self._tell(trial, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            self.log(f"trial {trial.number}: another worker declared it lost (no heartbeat for longer than the "
                     f"grace period) and retried it; this result is dropped")
            return
        if self.progress:
            self.progress.trial_finished(trial.number, result)

    def _gate(self, values: dict[str, Any]) -> tuple[str | None, float | None]:
        """(why the config must not run, predicted peak GPU GB). Predicted over the memory budget ->
        recorded infeasible without spending GPU time. Active on GPUs, or everywhere with memory_gate: on."""
        from llmtune.gate import calibration_from_trials, predicted_peak_gb

        pairs = [(t.user_attrs[METRICS_KEY]["predicted_memory_gb"], t.user_attrs[METRICS_KEY]["peak_memory_gb"])
                 for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if t.user_attrs.get(STATUS) == COMPLETE and t.user_attrs.get(INFO, {}).get("device") == "cuda"
                 and {"predicted_memory_gb", "peak_memory_gb"} <= set(t.user_attrs.get(METRICS_KEY, {}))]
        try:
            predicted = predicted_peak_gb(self.recipe, values, calibration_from_trials(pairs) if pairs else None)
        except Exception as e:  # an architecture the estimator cannot read must never block a search
            self.log(f"memory estimate unavailable: {type(e).__name__}: {e}")
            return None, None
        limit = self.recipe.constraints.get("peak_memory_gb", {}).get("max")
        if limit is not None and self.memory_gate and predicted > limit:
            return f"predicted peak memory {predicted:.2f} GB is over the budget of {limit:g} GB; not run", predicted
        return None, predicted

    def _fractions(self) -> list[float]:
        from llmtune.harness.train import eval_fractions

        return eval_fractions(self.recipe, self.pruner.rungs())

    # -- recording -----------------------------------------------------------------------------
    def _constraints(self, result: TrialResult) -> dict[str, float]:
        """Optuna constraint values (<= 0 feasible): "infeasible" for OOM / over budget, then one per
        recipe constraint, each scaled by its bound so violations of different units add up fairly."""
        values = {"infeasible": 1.0 if result.status in INFEASIBLE else 0.0}
        for metric, bound in self.recipe.constraints.items():
            v = result.metrics.get(metric)
            worst = 0.0
            if v is not None and finite(v):
                if "max" in bound:
                    worst = max(worst, (v - bound["max"]) / max(abs(bound["max"]), 1e-9))
                if "min" in bound:
                    worst = max(worst, (bound["min"] - v) / max(abs(bound["min"]), 1e-9))
            values[metric] = worst
        return values

    def _penalty_values(self, result: TrialResult) -> list[float]:
        """Objective values for an infeasible trial: measured where known, else the worst seen so far.

        Samplers only learn from COMPLETE trials; constraint values > 0 mark these as infeasible, so
        the values matter little and are never shown as results (the Pareto front excludes them).
        """
        done = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.values and t.user_attrs.get(STATUS) == COMPLETE]
        out = []
        for i, (metric, direction) in enumerate(self.recipe.objectives.items()):
            v = result.metrics.get(metric)
            if metric == "eval_loss":
                v = result.base_eval_loss if v is None or result.status in INFEASIBLE else v
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

    def _tell(self, trial: optuna.Trial, result: TrialResult) -> None:
        storage, tid = self.study._storage, trial._trial_id
        result.metrics = {k: v for k, v in result.metrics.items() if finite(v)}
        storage.set_trial_user_attr(tid, STATUS, result.status)
        storage.set_trial_user_attr(tid, REASON, result.reason)
        storage.set_trial_user_attr(tid, METRICS_KEY, result.metrics)
        storage.set_trial_user_attr(tid, CURVE, result.curve)
        keep = ("device", "gpu", "dtype", "wall_time_s", "process_wall_s", "load_s", "eval_s", "latency_s",
                "trained_tokens", "trained_examples", "padding_share", "total_params", "data_fingerprint",
                "adapter_dir", "log_tail", "truncated_examples", "peak_memory", "launch", "base_eval_loss_reused")
        storage.set_trial_user_attr(tid, INFO, json.loads(json.dumps({k: result.info[k] for k in keep if k in result.info}, default=str)))
        missing = [m for m in self.recipe.objectives if m not in result.metrics]
        if result.status == COMPLETE and missing:
            result.status, result.reason = CRASHED, f"the trial did not measure {', '.join(missing)}"
            storage.set_trial_user_attr(tid, STATUS, CRASHED)
            storage.set_trial_user_attr(tid, REASON, result.reason)
        if result.status in (COMPLETE, PRUNED) or result.status in INFEASIBLE:
            for key, value in self._constraints(result).items():
                trial.set_constraint(key, value)  # samplers read these: infeasible trials teach them
        if result.status == COMPLETE or result.status in INFEASIBLE:
            values = ([result.metrics[m] for m in self.recipe.objectives] if result.status == COMPLETE
                      else self._penalty_values(result))
            self.study.tell(trial, values, skip_if_finished=True)
        elif result.status == PRUNED:
            self.study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        else:
            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            if result.status == INTERRUPTED:
                _retry(self.study, trial, None)  # status and reason were recorded above


def finalize(study: optuna.Study, recipe: Recipe, log: Callable[[str], None] = print):
    """Pareto front, the chosen trial's adapter under output_dir/best, trials.csv/json, report.html."""
    from llmtune.results import SearchResult

    result = SearchResult(study, recipe)
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = result.trials
    df.to_csv(out / "trials.csv", index=False)
    df.to_json(out / "trials.json", orient="records", indent=1)
    best = result.best
    if best is not None:
        src = Path(best.user_attrs.get(DIR, "")) / "adapter"
        dst = out / "best"
        if src.is_dir():
            # Workers sharing one output_dir may finish at once: each builds its copy aside and swaps it
            # in whole, so best/ never mixes two trials; the last swap wins, none fails.
            tmp = out / f".best-{os.getpid()}-{threading.get_ident()}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp / "adapter")
            (tmp / "trial.json").write_text(json.dumps({
                "trial": best.number, "settings": best.user_attrs.get(SETTINGS),
                "metrics": best.user_attrs.get(METRICS_KEY), "selected_by": recipe.select.by,
                "base_model": recipe.model.name}, indent=2, default=str))
            for attempt in range(5):  # a directory cannot replace a non-empty one: move the old one aside
                old = out / f".best-old-{os.getpid()}-{threading.get_ident()}-{attempt}"
                try:
                    os.replace(dst, old)
                except FileNotFoundError:
                    pass
                try:
                    os.replace(tmp, dst)
                    break
                except OSError:  # another worker swapped its copy in meanwhile: move that aside too
                    continue
            for leftover in out.glob(f".best-*-{os.getpid()}-{threading.get_ident()}*"):
                shutil.rmtree(leftover, ignore_errors=True)
    try:
        from llmtune.report import write_report

        write_report(result, out / "report.html")
    except ImportError:
        pass
    return result
