"""The search loop: an Optuna study driven by ask/tell, one child process per trial.

One loop for every strategy (ARCHITECTURE decision 10), as Optuna's `_optimize_sequential` is one loop
around `_run_trial`: `Search` claims a trial against the study's budget, hands it to its strategy
(`llmtune.study.strategy`: a plain search, probes + a full trial, a PBT segment), records how it ended
through the one recorder (`llmtune.study.record.tell`, after `trial.endings.decide`), and redraws the
dashboard's figures. A strategy says which trial runs next and what job it is; nothing else.

What llmtune adds to Optuna (ARCHITECTURE decisions 1-3): trials run isolated in processes;
out-of-memory and over-budget trials are told as *infeasible* (constraint values > 0) so samplers
steer away from them; a killed or interrupted search resumes where it stopped and retries the
trial it lost; pruning works with several objectives through the recorded learning curves.

Scale-out (ARCHITECTURE decision 7) is Optuna's own distributed mode (storage and heartbeats:
`llmtune.study.storage`): any number of search processes,
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
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import optuna

from llmtune._version import __version__
from llmtune.config.recipe import Recipe
from llmtune.config.space import SearchSpace
from llmtune.errors import SearchError
from llmtune.hardware import trial_threads
from llmtune.study import attrs, engine, promotion, record
from llmtune.study.attrs import CURVE, OWNER, RUNG_METRICS
from llmtune.study.gate import MemoryGate
from llmtune.study.outages import EnvironmentStop
from llmtune.study.pruners import make_pruner
from llmtune.study.samplers import study_sampler
from llmtune.study.storage import (
    Heartbeat,
    claim_lock,
    fail_stale,
    heartbeat_settings,
    join_study,
    mask_url,
    masked_recipe,
    others_at_work,
    recover_lost_trials,
    storage_url,
    watch_storage,
    worker_id,
)
from llmtune.study.strategy import Job, Strategy, make_strategy
from llmtune.trial.endings import CRASHED, ENVIRONMENT
from llmtune.trial.fork_server import ForkServer, prewarm
from llmtune.trial.result import TrialResult, finite
from llmtune.trial.runner import TrialJob, run_trial_process


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
    return f"{attrs.BASE_EVAL_PREFIX}{digest}"


def _stored_fingerprint(found: dict[str, Any]) -> dict[str, Any] | None:
    """The study's fingerprint: one attribute (FINGERPRINT), or the separate ones earlier versions wrote."""
    if attrs.FINGERPRINT in found:
        return dict(found[attrs.FINGERPRINT])
    legacy = {attrs.OBJECTIVES: "objectives", attrs.SPACE: "space", attrs.DATA_FINGERPRINT: "data_fingerprint",
              attrs.RECIPE_FINGERPRINT: "recipe_fingerprint"}
    return {key: found.get(name) for name, key in legacy.items()} if attrs.SPACE in found else None


def check_resume(study: optuna.Study, recipe: Recipe, space: SearchSpace, data_fingerprint: str, *,
                 created: bool | None = None, wait_s: float = 30.0) -> None:
    """A study resumes only with the same objectives, search space and data; else say what to do.

    The process that created the study (`created`) writes its fingerprint, in one attribute so that no
    process reads half of it. A process that joined a study without one (`created=False`) waits up to
    `wait_s` for its creator to write it, then (a creator that died, a study made outside llmtune) writes
    its own; `created=None` (not known) writes it at once where it is missing."""
    expected = {"objectives": recipe.objectives, "space": space.signature(),
                "data_fingerprint": data_fingerprint, "recipe_fingerprint": recipe.fingerprint()}
    found = _stored_fingerprint(study.user_attrs)
    if found is None and created is False:
        deadline = time.monotonic() + wait_s
        while found is None and time.monotonic() < deadline:
            time.sleep(0.1)
            found = _stored_fingerprint(study.user_attrs)
    if found is None:
        study.set_user_attr(attrs.RECIPE, masked_recipe(recipe))
        study.set_user_attr(attrs.VERSION, __version__)
        study.set_user_attr(attrs.FINGERPRINT, expected)  # last: once it is there, the recipe is too
        found = _stored_fingerprint(study.user_attrs)  # whoever wrote last, every process compares with it
    what = {"objectives": "objectives", "space": "search space", "data_fingerprint": "data",
            "recipe_fingerprint": "training settings"}
    changed = [what[k] for k, v in expected.items()
               if json.dumps((found or {}).get(k), sort_keys=True) != json.dumps(v, sort_keys=True)]
    if changed:
        raise SearchError(
            f"study {study.study_name!r} was run with different {', '.join(changed)}; its trials would not compare. "
            f"Start a new study: pass --study-name NEW (or set study.study_name), or use another output_dir.")
    # The objectives' names, for Optuna's trials_dataframe and plots and optuna-dashboard ("objective_names").
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(recipe.objectives))


def parse_gpus(gpus: str | list[str] | None) -> list[str]:
    """--gpus / ``gpus=``: "all", "0,1", "0+1,2+3" or a list of such entries -> one entry per worker."""
    if gpus is None:
        return []
    entries = [gpus] if isinstance(gpus, str) else [str(g) for g in gpus]
    out: list[str] = []
    for entry in entries:
        if entry.strip() == "all":
            from llmtune.hardware import gpu_count

            count = gpu_count()
            if not count:
                raise SearchError("--gpus all: no NVIDIA GPU is visible; leave --gpus out to run on the CPU")
            out += [str(i) for i in range(count)]
        else:
            out += [part.strip() for part in entry.split(",")]
    return out


def _physical_gpus(entry: str) -> str:
    """CUDA_VISIBLE_DEVICES for a --gpus entry ("1" or a group "0+1"). Indices count the GPUs this
    process sees: under CUDA_VISIBLE_DEVICES=2,3, --gpus 0 is GPU 2."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    parts = [p.strip() for p in entry.replace("+", ",").split(",")]
    if not entry.strip() or not all(parts):
        raise SearchError(f"--gpus: {entry!r} is not a GPU index or a group like 0+1; e.g. --gpus 0,1 or --gpus 0+1,2+3")
    out = []
    for p in parts:
        if not p.isdigit() and not p.startswith(("GPU-", "MIG-")):
            raise SearchError(f"--gpus: {p!r} in {entry!r} is not a GPU index (0, 1, ...) or a GPU-/MIG- UUID; "
                              "e.g. --gpus 0,1, --gpus all or --gpus 0+1,2+3")
        if visible and p.isdigit():
            if int(p) >= len(visible):
                raise SearchError(f"--gpus: GPU {p} is not among the {len(visible)} visible ones "
                                  f"(CUDA_VISIBLE_DEVICES={','.join(visible)}); use 0 to {len(visible) - 1}")
            p = visible[int(p)]
        out.append(p)
    return ",".join(out)


# A search stops when this many of its first trials crashed for one and the same reason.
FAIL_FAST_TRIALS = 3


def fail_fast_message(count: int, reason: str) -> str:
    """Why a search stopped on crashes: how many of its first trials crashed (the true count) and the reason."""
    which = "the first trial crashed" if count == 1 else f"the first {count} trials all crashed with the same reason"
    return (f"{which}, so the search stopped: {reason}. Fix that and run the same command again (the study keeps "
            "its trials); each trial's trial.log has the details")


class Progress(Protocol):
    """What the loop tells a progress display (`llmtune.study.progress`)."""

    def start(self, search: Any) -> None: ...
    def trial_started(self, number: int, values: dict[str, Any]) -> None: ...
    def trial_event(self, number: int, event: dict[str, Any]) -> None: ...
    def trial_finished(self, number: int, result: TrialResult) -> None: ...
    def stop(self) -> None: ...


class Search:
    """One search process: any number of worker threads, each running trial processes in turn.

    `gpus` pins each worker to one GPU (CUDA_VISIBLE_DEVICES); an entry may name a group, "0+1", which
    the trial sees whole (the harness still loads the model on the group's first GPU). Many search processes
    may share one study (same storage and study name): together they run n_trials trials. `strategy`
    defaults to the recipe's (`make_strategy`).
    """

    def __init__(self, recipe: Recipe, *, storage: str | None = None, n_trials: int | None = None,
                 workers: int = 1, gpus: list[str] | None = None, study_name: str | None = None,
                 progress: Progress | None = None, log: Callable[[str], None] = print,
                 data_fingerprint: str | None = None, strategy: Strategy | None = None):
        self.recipe = recipe
        self._known_fingerprint = data_fingerprint  # the preflight's, when it ran: the data is not read twice
        self.space = recipe.space
        self.strategy = strategy or make_strategy(recipe)
        self.sample_space = self.strategy.sample_space(self.space)
        self.probing = self.strategy.probing  # read by the progress display
        self.n_trials = self.strategy.planned_trials() or n_trials or recipe.study.n_trials
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
        self._drawn, self._draw_lock = 0.0, threading.Lock()
        self.started = time.time()
        self.errors: list[BaseException] = []
        self.finished: list[tuple[str, str]] = []  # (status, reason) of this process's trials, in order
        self.failed_fast, self.failed_fast_count = "", 0
        self.environment = EnvironmentStop()  # a disk that stays full stops the search (outages.py)
        self.stopped_by = ""  # why the search stopped before its budget, said once at the end
        self.fork_server: ForkServer | None = None
        self.gate = MemoryGate(recipe, log)

    # -- setup ---------------------------------------------------------------------------------
    def prepare(self) -> optuna.Study:
        from llmtune.builtin.names import resolve_data_source, resolve_model_name
        from llmtune.harness.data_sources import load_splits

        # Build the offline demo assets once here, not in N trial processes at once.
        resolve_model_name(self.recipe.model.name, log=self.log)
        resolve_data_source(self.recipe.data.source, log=self.log)
        self.data_fingerprint = self._known_fingerprint or load_splits(self.recipe.data).fingerprint
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        directions = list(self.recipe.objectives.values())
        # Any number of processes may start here at the same moment: one creates the study, the others
        # join it (`join_study`) and wait for its fingerprint (`check_resume`).
        study, created = join_study(self.url, self.study_name, directions)
        if list(d.name.lower() for d in study.directions) != directions:
            raise SearchError(f"study {self.study_name!r} exists with other objectives; pass --study-name NEW")
        check_resume(study, self.recipe, self.space, self.data_fingerprint, created=created)
        # Trials run in parallel with other threads, or with other processes on a named (shared) storage:
        # TPE then treats running trials as bad guesses (constant liar) so workers spread out. On a shared
        # storage each process seeds its sampler differently (`process_seed`).
        # The default SQLite file is shared too when other processes work on it (`others_at_work`).
        shared = bool(self.storage_given or os.environ.get("LLMTUNE_STORAGE") or self.recipe.study.storage
                      or others_at_work(study, created))
        study_cfg = self.recipe.study
        self.sampler, self.sampler_why = study_sampler(
            study, study_cfg.sampler, self.sample_space, len(self.recipe.objectives), study_cfg.n_trials, study_cfg.seed,
            self.workers > 1 or shared, worker_id() if shared else "")
        grid = self.sample_space.grid_size()
        if isinstance(self.sampler, optuna.samplers.GridSampler) and grid is not None and (self.n_trials or grid) > grid:
            self.log(f"the grid has {grid} point(s): running {grid} trial(s), not {self.n_trials}")
            self.n_trials = grid
        self.study = study
        if created:
            self.strategy.created(self)
        watch_storage(study, self.log)
        with claim_lock(self.url):
            lost = recover_lost_trials(study)
        if lost:
            self.log(f"retrying trial(s) {', '.join(map(str, lost))} that a stopped search left unfinished")
        self.strategy.prepare(self)
        return study

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> optuna.Study:
        study = self.prepare()
        self.log(f"study {self.study_name!r} in {mask_url(self.url)}; sampler {self.sampler_why}; "
                 f"pruner {self.pruner.describe()}; {self.workers} worker(s)")
        for line in self.strategy.describe(self):
            self.log(line)
        # Trials fork from one warm interpreter (llmtune.trial.fork_server): the imports are paid once, not per trial.
        self.fork_server = prewarm()
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
        self.redraw(force=True)
        if self.failed_fast:
            raise SearchError(fail_fast_message(self.failed_fast_count, self.failed_fast), code=1)
        if self.stopped_by:
            raise SearchError(self.stopped_by, code=1)
        return study

    def _next(self) -> str:
        """"start" a trial, "wait" (nothing to start now, but a running trial may still end or be lost)
        or "done": the stop and timeout here, then the strategy's own budget or queue."""
        if self.stop.is_set():
            return "done"
        if self.recipe.study.timeout and time.time() - self.started > self.recipe.study.timeout:
            return "done"
        lost = fail_stale(self.study)
        if lost:
            self.log(f"trial(s) {', '.join(map(str, lost))} lost their worker (no heartbeat): retrying")
        return self.strategy.next_state(self)

    def _claim(self) -> optuna.Trial | None:
        """The next trial to run, or None when the strategy has nothing left.

        `ask` gives the next queued trial (a retry, a prior, a PBT segment) or a fresh one; the strategy
        then says whether this process runs it (`Strategy.claim`). A trial it does not run is given up
        (`record.give_up`): a queued one goes back to WAITING for the next `ask`, a fresh one ends as
        `surplus`, counted nowhere. Threads of one process never race each other (the lock); processes
        race on the storage, which every strategy's claim accounts for."""
        interval = heartbeat_settings()[0]
        while True:
            with self._lock, claim_lock(self.url):  # SQLite: one process at a time, as one thread at a time
                state = self._next()
                if state == "start":
                    trial = self.study.ask()
                    claim = self.strategy.claim(self, trial)
                    if claim.run:
                        engine.record_heartbeat(self.study, trial)  # found from now on if it dies
                        engine.storage(self.study).set_trial_system_attr(engine.trial_id(trial), OWNER, worker_id())
                        return trial
                    if claim.surplus:
                        record.surplus(self.study, trial, claim.give_up)
                        continue
                    if claim.give_up:
                        record.give_up(self.study, trial, claim.give_up)
                    state = "wait"  # back off: a queued trial given back is the first the next `ask` takes
            if state == "done":
                return None
            self.stop.wait(min(5.0, max(0.5, interval / 4)) * random.uniform(0.5, 1.5))

    def _worker(self, index: int) -> None:
        try:
            self._work(index)
        except BaseException as e:  # surfaced by run(): a dead worker must not end the search silently
            self.errors.append(e)
            self.stop.set()

    def _storage_lost(self, error: BaseException) -> None:
        """The storage stayed away past the heartbeat grace (`outages.StorageLost`): stop, say it once."""
        self.errors.append(error)
        self.stop.set()

    def _work(self, index: int) -> None:
        env: dict[str, str] = {}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[index]
        # each trial's share of the CPU: trials x threads fit the cores (hardware.trial_threads)
        env["LLMTUNE_THREADS"] = str(trial_threads(self.workers, self.recipe.train.threads))
        while (trial := self._claim()) is not None:
            with Heartbeat(self.study, trial, self.log, lost=self._storage_lost):
                self._run_one(trial, env)

    def _run_one(self, trial: optuna.Trial, env: dict[str, str]) -> None:
        """One claimed trial: the strategy's job, then the one recorder, then what follows a told trial."""
        values = self.strategy.settings(self, trial)
        resume = promotion.resume_of(engine.frozen(self.study, trial))
        if resume is not None:  # a paused trial's continuation runs the settings it was paused with
            values = {**values, **resume.settings}
        trial_dir = (self.output_dir / "trials" / f"{trial.number:04d}").resolve()
        record.started(self.study, trial, values, trial_dir)
        if self.progress:
            self.progress.trial_started(trial.number, values)
        job = Job(trial, values, trial_dir, env, resume=resume)
        result = self.strategy.run(self, job)
        try:
            result = record.tell(self.study, trial, self.recipe, result, segment=self.strategy.segment_end(self, job))
        except optuna.exceptions.UpdateFinishedTrialError:
            self.log(f"trial {trial.number}: another worker declared it lost (no heartbeat for longer than the "
                     f"grace period) and retried it; this result is dropped")
            return
        self.strategy.after(self, job, result)
        if self.progress:
            self.progress.trial_finished(trial.number, result)
        self._fail_fast(result)
        if self.environment.ended(result.status, result.reason) and not self.stopped_by:
            self.stopped_by = self.environment.message()
            self.stop.set()
        self.redraw()
        if result.status == ENVIRONMENT:  # not the settings' fault: wait, and let a worker elsewhere retry it
            self.stop.wait(record.environment_wait(self.study, trial))

    # -- what strategies run -------------------------------------------------------------------
    def train(self, job: Job, *, fractions: list[float] | None = None, prune: bool = True,
              segment: dict[str, Any] | None = None, history: tuple[list[Any], list[Any]] | None = None) -> TrialResult:
        """The trial's training run, in its own process; each evaluation is stored on the trial and, with
        `prune`, answered by the pruner (under a pausing pruner the trial then saves its state, to be
        promoted later: `study/promotion.py`). `fractions`: where to evaluate (default: the eval points and
        the pruner's rungs); `segment`: part of a run, from and to a saved state (PBT, a continuation);
        `history`: the curve and rung metrics the trial's configuration had before (a continuation)."""
        trial, tid = job.trial, engine.trial_id(job.trial)
        curve: list[list[float]] = list(history[0]) if history else []
        rung_metrics: list[list[Any]] = list(history[1]) if history else []
        recipe = masked_recipe(self.recipe)
        base_key = base_eval_key(recipe, job.values, self.data_fingerprint)
        base_eval = self.study.user_attrs.get(base_key) if segment is None else None

        def on_event(event: dict[str, Any]) -> bool:
            if self.progress:
                self.progress.trial_event(trial.number, event)
            if event.get("event") != "eval":
                return False
            if segment is None and event["fraction"] == 0.0 and base_eval is None and finite(event["eval_loss"]):
                # the next trials reuse it where they run on the same context
                self.study.set_user_attr(base_key, {"loss": event["eval_loss"], "context": event.get("context")})
            measured = self._store_eval(tid, event, curve, rung_metrics)
            if measured is None:
                return True  # declared lost by another worker (missed heartbeats): its retry runs
            return prune and self.pruner.should_prune(self.study, job.configuration, event["fraction"],
                                                      event["eval_loss"], measured)

        tj = TrialJob(recipe=recipe, values=job.values, out_dir=job.trial_dir,
                      fractions=self.eval_fractions() if fractions is None else fractions, trial_number=trial.number,
                      timeout=self.recipe.study.trial_timeout, env=job.env, fork_server=self.fork_server,
                      base_eval=base_eval if isinstance(base_eval, dict) else None, segment=segment,
                      pause=str(job.trial_dir / promotion.PAUSE_FOLDER) if prune and self.pruner.pause else None)
        return run_trial_process(tj, on_event=on_event, stop=self.stop)

    def probe(self, job: Job, settings: dict[str, Any], folder: Path, steps: int) -> TrialResult:
        """A short probe of one execution variant (`study/probes.py`), in its own process."""
        if self.progress:
            self.progress.trial_event(job.trial.number, {"event": "phase", "phase": f"probing {folder.name}"})
        tj = TrialJob(recipe=masked_recipe(self.recipe), values=settings, out_dir=folder, fractions=[],
                      trial_number=job.trial.number, timeout=self.recipe.study.trial_timeout, env=job.env,
                      fork_server=self.fork_server, probe_steps=steps)
        return run_trial_process(tj, stop=self.stop)

    def _store_eval(self, tid: int, event: dict[str, Any], curve: list[list[float]],
                    rung_metrics: list[list[Any]]) -> dict[str, float] | None:
        """Store one evaluation on the running trial: its curve, what it has measured so far of its other
        objectives (which the pruner ranks on too), the dashboard's intermediate value. Returns what was
        measured, or None when the trial was declared lost meanwhile (another worker runs its retry)."""
        curve.append([event["fraction"], event["eval_loss"]])
        measured = {k: float(v) for k, v in (event.get("metrics") or {}).items() if finite(v)}
        rung_metrics.append([event["fraction"], measured])
        storage = engine.storage(self.study)
        try:
            storage.set_trial_user_attr(tid, CURVE, curve)
            storage.set_trial_user_attr(tid, RUNG_METRICS, rung_metrics)
            record.report_eval(self.study, tid, self.recipe, event["fraction"], event["eval_loss"])  # for optuna-dashboard
        except optuna.exceptions.UpdateFinishedTrialError:
            return None
        return measured

    # -- after a trial -------------------------------------------------------------------------
    def redraw(self, force: bool = False) -> None:
        """Redraw the dashboard's figures (learning curves, the strategy's own) at most every
        `record.PLOT_EVERY_S`, by one process of the study at a time (`record.take_plot_lease`)."""
        with self._draw_lock:
            now = time.monotonic()
            if not force and now - self._drawn < record.PLOT_EVERY_S:
                return
            self._drawn = now
            if not record.take_plot_lease(self.study, worker_id()):
                return
            record.save_curves_plot(self.study)
            for plot_id, figure_json in self.strategy.figures(self).items():
                record.save_dashboard_plot(self.study, plot_id, figure_json)

    def _fail_fast(self, result: TrialResult) -> None:
        """Stop when this process's first trials all crashed for the same reason: every further trial would
        too (bad data, a broken model, a missing library), so say it now instead of after n_trials."""
        with self._lock:
            self.finished.append((result.status, result.reason))
            first = self.finished[:FAIL_FAST_TRIALS]
        if len(first) < min(FAIL_FAST_TRIALS, self.n_trials or FAIL_FAST_TRIALS) or self.failed_fast:
            return
        if all(status == CRASHED for status, _ in first) and len({reason for _, reason in first}) == 1:
            # said once, when the search ends (run): the count is the trials that crashed, not FAIL_FAST_TRIALS
            self.failed_fast, self.failed_fast_count = first[0][1], len(first)
            self.stop.set()

    def eval_fractions(self) -> list[float]:
        """Where a trial is evaluated: the recipe's eval points and the pruner's rungs."""
        from llmtune.harness.train import eval_fractions

        return eval_fractions(self.recipe, self.pruner.rungs())
