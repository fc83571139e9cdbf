"""Population-based training (``study.strategy: pbt``): a population of members trained in segments, the
worst copying the best and perturbing their learning rate, warmup or dropout between segments.

It fits the house: every segment of every member is one Optuna trial, run in its own trial process like any
trial (`llmtune.trial.runner`), resuming from the saved state it is handed (`llmtune.harness.resume`) and
saving its own into the checkpoint folder (``study.pbt_settings.checkpoint_dir``, default
``<output_dir>/pbt-state``; a folder every worker can read, e.g. an NFS mount, when workers run on several
machines). Each trial carries its lineage (`attrs.LINEAGE`: member, segment, the trial whose state it
resumed, whether it copied another member, the schedule of settings per segment so far), so the study
opens in optuna-dashboard as it is and many processes share it on one storage.

The work queue is Optuna's: a generation's segments are queued trials (WAITING, with their lineage and
settings) that any worker's `ask` takes. What a generation does follows from the previous one's stored
results alone (`pbt_plan.next_generation`, seeded by the study seed and the segment), so every worker that
finds a generation finished queues the same next one; where two queued it at once, the later copy of a
segment is given up when taken. A segment lost with its worker (no heartbeat, a killed search) is queued
again from the state its parent saved, so a resumed search loses no finished segment.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from llmtune.config.space import PERTURBABLE, trial_settings
from llmtune.errors import SearchError
from llmtune.study import attrs
from llmtune.study.loop import Search
from llmtune.study.pbt_plan import Member, next_generation, pbt_settings
from llmtune.study.record import save_dashboard_plot, tell
from llmtune.study.storage import fail_stale, heartbeat_settings, masked_recipe, worker_id
from llmtune.trial.endings import COMPLETE, CRASHED, ENDINGS, OVER_BUDGET, RUNNING, SEGMENT, SURPLUS
from llmtune.trial.result import TrialResult, finite
from llmtune.trial.runner import TrialJob, run_trial_process

MAX_ATTEMPTS = 3  # a segment lost this many times (interrupted, killed, environment) counts as a dead member
# On SQLite, Optuna's pop of a waiting trial is not atomic across processes (the read runs outside the write
# transaction), so two processes can both take one queued segment. Each writes itself as the owner and reads
# the owner back after this pause: the later writer runs it, the other lets it go. PostgreSQL locks the row.
SQLITE_SETTLE_S = 1.0
LINEAGE_PLOT_ID = "llmtune-pbt-lineage"


def _key(t: FrozenTrial) -> tuple[int, int] | None:
    lineage = t.user_attrs.get(attrs.LINEAGE)
    if not isinstance(lineage, dict) or t.user_attrs.get(attrs.STATUS) == SURPLUS:
        return None
    return int(lineage["member"]), int(lineage["segment"])


def _loss(t: FrozenTrial) -> float:
    metrics = t.user_attrs.get(attrs.METRICS_KEY) or {}
    loss = metrics.get("eval_loss")
    return float(loss) if loss is not None and finite(loss) else math.inf


class PBTSearch(Search):
    """The search loop with PBT's claim and run: same workers, heartbeats, storage and trial processes."""

    def __init__(self, recipe: Any, **kwargs: Any) -> None:
        super().__init__(recipe, **kwargs)
        self.pbt = pbt_settings(recipe)
        self.bounds = self.pbt.bounds
        self.n_trials = self.pbt.population * len(self.bounds)  # what the progress display counts to
        self.state_root = Path(self.pbt.checkpoint_dir or Path(recipe.output_dir) / "pbt-state")
        # Every setting is sampled per member, execution ones too: a member's segments run as it was sampled.
        self.probing, self.sample_space = False, self.space

    def _enqueue_priors(self, study: optuna.Study) -> None:
        """No priors: the first generation is the sampler's spread of the space."""

    def prepare(self) -> optuna.Study:
        study = super().prepare()
        self.state_dir = (self.state_root / self.study_name).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        mine = json.loads(json.dumps({**vars(self.pbt), "bounds": self.bounds}))
        stored = study.user_attrs.get(attrs.PBT)
        if stored is None:
            study.set_user_attr(attrs.PBT, {**mine, "state_dir": str(self.state_dir)})
        elif {k: v for k, v in stored.items() if k not in ("state_dir", "checkpoint_dir")} != \
                {k: v for k, v in mine.items() if k != "checkpoint_dir"}:
            raise SearchError(f"study {self.study_name!r} was run with other study.pbt_settings ({stored}); its "
                              "members would not continue. Start a new study: pass --study-name NEW")
        self.log(f"population-based training: {self.pbt.population} members x {len(self.bounds)} segments, "
                 f"perturbing {', '.join(self.pbt.perturb)}; states in {self.state_dir}")
        return study

    # -- the queue -----------------------------------------------------------------------------------
    def _enqueue(self, lineage: dict[str, Any], params: dict[str, Any]) -> None:
        self.study.enqueue_trial(params, user_attrs={attrs.LINEAGE: lineage}, skip_if_exists=False)

    def _advance(self) -> str:
        """Queue what is due; "start" when a queued segment waits, "wait" while others run, or "done"."""
        if self.stop.is_set() or (self.recipe.study.timeout and time.time() - self.started > self.recipe.study.timeout):
            return "done"
        lost = fail_stale(self.study)
        if lost:
            self.log(f"trial(s) {', '.join(map(str, lost))} lost their worker (no heartbeat): queued again")
        trials = self.study.get_trials(deepcopy=False)
        by_key: dict[tuple[int, int], list[FrozenTrial]] = defaultdict(list)
        for t in trials:
            key = _key(t)
            if key is not None:
                by_key[key].append(t)
        population = range(self.pbt.population)
        for k in range(len(self.bounds)):
            missing = [m for m in population if (m, k) not in by_key]
            if missing:  # a generation is due (the previous one has finished), or part of one was never queued
                if k == 0:
                    for m in missing:
                        self._enqueue({"member": m, "segment": 0, "parent": None, "exploited": False, "schedule": [],
                                       "resume": None, "params": None}, {})
                    return "start"
                done = [self._member(by_key[(m, k - 1)]) for m in population]
                rng = random.Random(f"{self.recipe.study.seed}-pbt-{k}")
                nexts = next_generation([d for d in done if d is not None], self.pbt, self.space,
                                        dict(self.recipe.objectives), rng)
                if not nexts:
                    self.log(f"population-based training stops after segment {k}: no member is left alive")
                    return "done"
                for n in nexts:
                    if n.member in missing:
                        self._enqueue({"member": n.member, "segment": k, "exploited": n.exploited,
                                       "parent": {"member": n.source, "segment": k - 1, "trial": n.source_trial},
                                       "schedule": n.schedule, "resume": n.resume, "params": n.params}, n.params)
                return "start"
            waiting = running = False
            for m in population:
                state = self._state(by_key[(m, k)])
                if state == "requeue":  # lost with its worker: queued again as it was queued
                    lost_trial = max(by_key[(m, k)], key=lambda t: t.number)
                    last = dict(lost_trial.user_attrs[attrs.LINEAGE])
                    last["schedule"] = list(last.get("schedule") or [])[:k]
                    for run_only in ("state", "start", "stop", "final"):
                        last.pop(run_only, None)
                    self._enqueue(last, dict(last.get("params") or lost_trial.params))
                    waiting = True
                waiting |= state == "waiting"
                running |= state == "running"
            if waiting:
                return "start"
            if running:
                return "wait"
        return "done"

    @staticmethod
    def _state(tried: list[FrozenTrial]) -> str:
        """Where one segment of one member stands: waiting, running, done (alive or dead) or requeue."""
        states = {t.state for t in tried}
        if TrialState.WAITING in states:
            return "waiting"
        if TrialState.RUNNING in states:
            return "running"
        if TrialState.COMPLETE in states:
            return "done"
        failed = [t for t in tried if t.state == TrialState.FAIL]
        final = [t for t in failed if not (ENDINGS.get(t.user_attrs.get(attrs.STATUS) or "") or ENDINGS[CRASHED]).retried]
        return "done" if final or len(failed) >= MAX_ATTEMPTS else "requeue"

    def _member(self, tried: list[FrozenTrial]) -> Member | None:
        """A member as its finished segment left it (dead unless the segment trained and evaluated)."""
        if not tried:
            return None
        done = [t for t in tried if t.state == TrialState.COMPLETE] or tried
        t = max(done, key=lambda t: t.number)
        lineage = t.user_attrs.get(attrs.LINEAGE) or {}
        alive = t.state == TrialState.COMPLETE and t.user_attrs.get(attrs.STATUS) in (COMPLETE, SEGMENT)
        metrics = {k: float(v) for k, v in (t.user_attrs.get(attrs.METRICS_KEY) or {}).items() if finite(v)}
        return Member(int(lineage["member"]), t.number, alive and math.isfinite(_loss(t)), _loss(t), metrics,
                      dict(t.params), list(lineage.get("schedule") or []), str(lineage.get("state") or ""))

    def _claim(self) -> optuna.Trial | None:
        interval = heartbeat_settings()[0]
        while True:
            with self._lock:
                state = self._advance()
                if state == "start":
                    trial = self.study.ask()
                    frozen = self.study._storage.get_trial(trial._trial_id)
                    key = _key(frozen)
                    twin = key is not None and any(
                        _key(t) == key and t.number < trial.number and t.state != TrialState.FAIL
                        for t in self.study.get_trials(deepcopy=False))
                    if key is not None and not twin:
                        if not self._owns(trial._trial_id):
                            continue  # another process took the same queued segment and runs it
                        self.study._storage.record_heartbeat(trial._trial_id)  # type: ignore[attr-defined]
                        return trial
                    # a fresh trial (another worker took the queued one), a house retry without lineage
                    # (PBT queues its lost segments itself) or a second copy of a segment: counts for nothing
                    self.study._storage.set_trial_user_attr(trial._trial_id, attrs.STATUS, SURPLUS)
                    self.study._storage.set_trial_user_attr(trial._trial_id, attrs.REASON,
                                                            "not a segment to run (PBT queues its own)")
                    self.study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                    continue
            if state == "done":
                return None
            self.stop.wait(min(5.0, max(0.5, interval / 4)) * random.uniform(0.5, 1.5))

    def _owns(self, trial_id: int) -> bool:
        """Write this process as the trial's owner; on SQLite, whether it still is after `SQLITE_SETTLE_S`."""
        storage = self.study._storage
        storage.set_trial_system_attr(trial_id, attrs.OWNER, worker_id())
        if not self.url.startswith("sqlite"):
            return True
        time.sleep(SQLITE_SETTLE_S)
        backend = getattr(storage, "_backend", storage)  # past any cache: what the database holds now
        return bool(backend.get_trial_system_attrs(trial_id).get(attrs.OWNER) == worker_id())

    # -- one segment ---------------------------------------------------------------------------------
    def _run_one(self, trial: optuna.Trial, env: dict[str, str]) -> None:
        storage, tid = self.study._storage, trial._trial_id
        lineage = dict(storage.get_trial(tid).user_attrs[attrs.LINEAGE])
        m, k = int(lineage["member"]), int(lineage["segment"])
        start, stop = (self.bounds[k - 1] if k else 0.0), self.bounds[k]
        final = k == len(self.bounds) - 1
        values = self.space.suggest(trial)
        settings = trial_settings(values)
        entry = {"until": stop, "values": {p: settings[p] for p in PERTURBABLE if settings.get(p) is not None}}
        state = f"m{m:03d}-s{k:02d}"
        lineage.update(schedule=[*lineage.get("schedule", []), entry], state=state, start=start, stop=stop, final=final)
        trial_dir = (self.output_dir / "trials" / f"{trial.number:04d}").resolve()
        storage.set_trial_user_attr(tid, attrs.LINEAGE, lineage)
        storage.set_trial_user_attr(tid, attrs.SETTINGS, json.loads(json.dumps(values, default=str)))
        storage.set_trial_user_attr(tid, attrs.DIR, str(trial_dir))
        storage.set_trial_user_attr(tid, attrs.STATUS, RUNNING)
        if self.progress:
            self.progress.trial_started(trial.number, values)
        reason, predicted = self.gate.check(self.study, values)
        if reason:
            result = TrialResult(status=OVER_BUDGET, reason=reason, settings=values)
        else:
            result = self._train_segment(trial, values, lineage, trial_dir, env)
        if predicted is not None:
            result.metrics["predicted_memory_gb"] = predicted
        if result.status == COMPLETE and not (self.state_dir / state / "state.pt").is_file():
            result.status, result.reason = CRASHED, f"the segment saved no state in {self.state_dir / state}"
        if result.status == COMPLETE and not final:
            result.status = SEGMENT
            result.reason = f"member {m}, segment {k + 1} of {len(self.bounds)}: continued by a later trial"
        try:
            tell(self.study, trial, self.recipe, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            self.log(f"trial {trial.number}: another worker declared it lost and queued it again; result dropped")
            return
        self._save_lineage_plot()
        if self.progress:
            self.progress.trial_finished(trial.number, result)
        self._fail_fast(result)

    def _train_segment(self, trial: optuna.Trial, values: dict[str, Any], lineage: dict[str, Any], trial_dir: Path,
               env: dict[str, str]) -> TrialResult:
        tid = trial._trial_id
        curve: list[list[float]] = []
        rung_metrics: list[list[Any]] = []

        def on_event(event: dict[str, Any]) -> bool:
            if self.progress:
                self.progress.trial_event(trial.number, event)
            if event.get("event") != "eval":
                return False
            if self._store_eval(tid, event, curve, rung_metrics) is None:
                return True  # declared lost by another worker: its copy runs
            return False  # never pruned: the exploit step between segments decides

        resume = str(self.state_dir / lineage["resume"]) if lineage.get("resume") else None
        segment = {"schedule": lineage["schedule"], "start": lineage["start"], "stop": lineage["stop"],
                   "resume": resume, "save": str(self.state_dir / lineage["state"])}
        fractions = ([0.0] if lineage["start"] == 0 else []) + [lineage["stop"]]
        job = TrialJob(recipe=masked_recipe(self.recipe), values=values, out_dir=trial_dir, fractions=fractions,
                       trial_number=trial.number, timeout=self.recipe.study.trial_timeout, env=env,
                       fork_server=self.fork_server, segment=segment)
        return run_trial_process(job, on_event=on_event, stop=self.stop)

    def _save_lineage_plot(self) -> None:
        """The lineage figure as an optuna-dashboard custom plot (the report draws the same one)."""
        try:
            from llmtune.deliver.lineage import lineage_figure

            figure = lineage_figure(self.study.get_trials(deepcopy=False), list(self.recipe.objectives))
            if figure is not None:
                save_dashboard_plot(self.study, LINEAGE_PLOT_ID, figure.to_json())
        except ImportError:  # plotly missing: the dashboard goes without the plot
            pass
