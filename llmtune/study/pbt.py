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
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from llmtune.config.pbt_settings import pbt_settings
from llmtune.config.recipe import Recipe
from llmtune.config.settings import TrialSettings
from llmtune.config.space import PERTURBABLE
from llmtune.errors import SearchError
from llmtune.study import attrs, engine
from llmtune.study.pbt_plan import Member, next_generation
from llmtune.study.storage import worker_id
from llmtune.study.strategy import RUN, Claim, Job, Strategy
from llmtune.trial.endings import (
    COMPLETE,
    CRASHED,
    ENDINGS,
    SEGMENT,
    SURPLUS,
    SegmentEnd,
)
from llmtune.trial.result import TrialResult, finite

if TYPE_CHECKING:  # pragma: no cover
    from llmtune.study.loop import Search

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


class PBTStrategy(Strategy):
    """Population-based training's job in the one search loop: the queue of segments, the claim of a queued
    segment, and a segment's run (resume, train to its bound, save). Same workers, heartbeats, storage,
    recorder and trial processes as every strategy."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        self.pbt = pbt_settings(recipe)
        self.bounds = self.pbt.bounds
        self.state_root = Path(self.pbt.checkpoint_dir or Path(recipe.output_dir) / "pbt-state")
        self.state_dir = self.state_root  # per study, set by `prepare`

    def planned_trials(self) -> int:
        return self.pbt.population * len(self.bounds)  # what the progress display counts to

    # Every setting is sampled per member, execution ones too (the default `sample_space`): a member's
    # segments run as it was sampled. No priors: the first generation is the sampler's spread of the space.
    def created(self, search: Search) -> None:
        pass

    def prepare(self, search: Search) -> None:
        self.state_dir = (self.state_root / search.study_name).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        mine = json.loads(json.dumps({**vars(self.pbt), "bounds": self.bounds}))
        stored = search.study.user_attrs.get(attrs.PBT)
        if stored is None:
            search.study.set_user_attr(attrs.PBT, {**mine, "state_dir": str(self.state_dir)})
        elif {k: v for k, v in stored.items() if k not in ("state_dir", "checkpoint_dir")} != \
                {k: v for k, v in mine.items() if k != "checkpoint_dir"}:
            raise SearchError(f"study {search.study_name!r} was run with other study.pbt_settings ({stored}); its "
                              "members would not continue. Start a new study: pass --study-name NEW")

    def describe(self, search: Search) -> list[str]:
        return [f"population-based training: {self.pbt.population} members x {len(self.bounds)} segments, "
                f"perturbing {', '.join(self.pbt.perturb)}; states in {self.state_dir}"]

    # -- the queue -----------------------------------------------------------------------------------
    def _enqueue(self, study: optuna.Study, lineage: dict[str, Any], params: dict[str, Any]) -> None:
        study.enqueue_trial(params, user_attrs={attrs.LINEAGE: lineage}, skip_if_exists=False)

    def next_state(self, search: Search) -> str:
        """Queue what is due; "start" when a queued segment waits, "wait" while others run, or "done"."""
        study = search.study
        by_key: dict[tuple[int, int], list[FrozenTrial]] = defaultdict(list)
        for t in study.get_trials(deepcopy=False):
            key = _key(t)
            if key is not None:
                by_key[key].append(t)
        population = range(self.pbt.population)
        for k in range(len(self.bounds)):
            missing = [m for m in population if (m, k) not in by_key]
            if missing:  # a generation is due (the previous one has finished), or part of one was never queued
                return self._queue_generation(search, k, missing, by_key)
            waiting = running = False
            for m in population:
                state = self._state(by_key[(m, k)])
                if state == "requeue":  # lost with its worker: queued again as it was queued
                    lost_trial = max(by_key[(m, k)], key=lambda t: t.number)
                    last = dict(lost_trial.user_attrs[attrs.LINEAGE])
                    last["schedule"] = list(last.get("schedule") or [])[:k]
                    for run_only in ("state", "start", "stop", "final"):
                        last.pop(run_only, None)
                    self._enqueue(study, last, dict(last.get("params") or lost_trial.params))
                    waiting = True
                waiting |= state == "waiting"
                running |= state == "running"
            if waiting:
                return "start"
            if running:
                return "wait"
        return "done"

    def _queue_generation(self, search: Search, k: int, missing: list[int],
                          by_key: dict[tuple[int, int], list[FrozenTrial]]) -> str:
        """Queue generation k's missing members: from the sampler for the first, else from the previous
        generation's results (`next_generation`, the same from every worker)."""
        if k == 0:
            for m in missing:
                self._enqueue(search.study, {"member": m, "segment": 0, "parent": None, "exploited": False,
                                             "schedule": [], "resume": None, "params": None}, {})
            return "start"
        population = range(self.pbt.population)
        done = [self._member(by_key[(m, k - 1)]) for m in population]
        rng = random.Random(f"{self.recipe.study.seed}-pbt-{k}")
        nexts = next_generation([d for d in done if d is not None], self.pbt, search.space,
                                dict(self.recipe.objectives), rng)
        if not nexts:
            search.log(f"population-based training stops after segment {k}: no member is left alive")
            return "done"
        for n in nexts:
            if n.member in missing:
                self._enqueue(search.study, {"member": n.member, "segment": k, "exploited": n.exploited,
                                             "parent": {"member": n.source, "segment": k - 1, "trial": n.source_trial},
                                             "schedule": n.schedule, "resume": n.resume, "params": n.params}, n.params)
        return "start"

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

    def claim(self, search: Search, trial: optuna.Trial) -> Claim:
        """Run a queued segment that no other trial has taken; anything else (a fresh trial: another worker
        took the queued one; a house retry without lineage: PBT queues its lost segments itself; a second
        copy of a segment) counts for nothing. On SQLite two processes may take one queued segment:
        the later to write itself as owner runs it (`_owns`)."""
        key = _key(engine.storage(search.study).get_trial(engine.trial_id(trial)))
        twin = key is not None and any(_key(t) == key and t.number < trial.number and t.state != TrialState.FAIL
                                       for t in search.study.get_trials(deepcopy=False))
        if key is None or twin:
            return Claim(False, "not a segment to run (PBT queues its own)", surplus=True)
        return RUN if self._owns(search, trial) else Claim(False)

    @staticmethod
    def _owns(search: Search, trial: optuna.Trial) -> bool:
        """Write this process as the trial's owner; on SQLite, whether it still is after `SQLITE_SETTLE_S`."""
        tid = engine.trial_id(trial)
        engine.storage(search.study).set_trial_system_attr(tid, attrs.OWNER, worker_id())
        if not search.url.startswith("sqlite"):
            return True
        time.sleep(SQLITE_SETTLE_S)
        # past any cache: what the database holds now
        return bool(engine.uncached(search.study).get_trial_system_attrs(tid).get(attrs.OWNER) == worker_id())

    # -- one segment ---------------------------------------------------------------------------------
    def settings(self, search: Search, trial: optuna.Trial) -> dict[str, Any]:
        """The member's settings (queued with the segment) and its lineage, completed with this segment."""
        storage, tid = engine.storage(search.study), engine.trial_id(trial)
        lineage = dict(storage.get_trial(tid).user_attrs[attrs.LINEAGE])
        m, k = int(lineage["member"]), int(lineage["segment"])
        values = search.space.suggest(trial)
        chosen = TrialSettings.of(values).as_dict()
        entry = {"until": self.bounds[k], "values": {p: chosen[p] for p in PERTURBABLE if chosen[p] is not None}}
        lineage.update(schedule=[*lineage.get("schedule", []), entry], state=f"m{m:03d}-s{k:02d}",
                       start=self.bounds[k - 1] if k else 0.0, stop=self.bounds[k], final=k == len(self.bounds) - 1)
        storage.set_trial_user_attr(tid, attrs.LINEAGE, lineage)
        return values

    @staticmethod
    def _lineage(search: Search, job: Job) -> dict[str, Any]:
        """The segment's lineage as `settings` stored it, read once per job."""
        if "lineage" not in job.state:
            frozen = engine.storage(search.study).get_trial(engine.trial_id(job.trial))
            job.state["lineage"] = dict(frozen.user_attrs[attrs.LINEAGE])
        return dict(job.state["lineage"])

    def run(self, search: Search, job: Job) -> TrialResult:
        """Resume the parent's state, train to the segment's bound, save; never pruned (the exploit step
        between segments decides)."""
        lineage = self._lineage(search, job)
        resume = str(self.state_dir / lineage["resume"]) if lineage.get("resume") else None
        segment = {"schedule": lineage["schedule"], "start": lineage["start"], "stop": lineage["stop"],
                   "resume": resume, "save": str(self.state_dir / lineage["state"])}
        fractions = ([0.0] if lineage["start"] == 0 else []) + [lineage["stop"]]
        return self.gated(search, job, lambda: search.train(job, fractions=fractions, prune=False, segment=segment))

    def segment_end(self, search: Search, job: Job) -> SegmentEnd:
        lineage = self._lineage(search, job)
        folder = self.state_dir / lineage["state"]
        return SegmentEnd(member=int(lineage["member"]), index=int(lineage["segment"]), count=len(self.bounds),
                          state_dir=str(folder), saved=(folder / "state.pt").is_file())

    def figures(self, search: Search) -> dict[str, str]:
        """The lineage figure as an optuna-dashboard custom plot (the report draws the same one)."""
        from llmtune.deliver.lineage import lineage_figure

        figure = lineage_figure(search.study.get_trials(deepcopy=False), list(self.recipe.objectives))
        return {LINEAGE_PLOT_ID: figure.to_json()} if figure is not None else {}
