"""Pause and resume instead of kill: a trial the pruner stops is paused, and promoted later when its rung says so.

Stopping a trial at a rung is a bet that its loss there ranks its final loss. On public LoRA sweeps of real
models that bet often loses (issue 21: the best configuration fell outside ASHA's kept third in 8 of 12
problems). So, as ASHA with promotion does (Li et al., 2020, "A System for Massively Parallel Hyperparameter
Tuning"; Ray Tune's and Syne Tune's promotion-type schedulers), a stopped trial is *paused*:

- the trial process saves its training state when the pruner answers "stop" (`harness.resume.save_state`:
  LoRA tensors, optimizer state, the RNG dropout draws from, the step index), in the trial's own folder;
  the recorder marks the trial `PAUSED` ({fraction, state}); it stays PRUNED in Optuna, so samplers learn
  from it as before;
- whenever a worker looks for work (`Strategy.next_state`), `promote` asks the pruner again, with the
  rung's population as it is *now*, about each paused trial: one that the rule would now let continue
  (more trials reached the rung and it ranks in the kept share; or the rung was measured not to rank the
  final losses, `rungs.rung_agreement`, so it decides nothing) is promoted: a *continuation* is queued,
  a new trial with the same settings, `RESUME_OF` the paused one and its curve so far. Queued trials run
  before new ones (Optuna's `ask` takes them first), as ASHA promotes before it samples;
- the continuation trains from the saved state to the end (a `SegmentRun` from the rung: bit for bit the
  run the trial would have made; tests/test_promotion.py), may be paused again at a later rung, and ends
  like any trial. No training step is repeated.

A configuration is one entry of a rung's population however many trials carry it (`rungs.configuration`:
the first trial's number, followed along `RESUME_OF`), so a paused trial and its continuation never
count twice; Hyperband's bracket is the first trial's too. Continuations count towards no n_trials: they
are the same configuration, trained on (the search ends when n_trials configurations have run and no
paused trial is promotable). Two workers may queue one promotion at once on PostgreSQL (no lock spans the
read and the enqueue; on SQLite the claim lock does); the later copy is given up when taken (`twin`). A state that cannot be read where the
continuation runs (another machine without the output folder) is trained again from the start: slower,
never lost. `study.pruner_settings.pause: false` kills stopped trials as before (no state kept: about 12
bytes per trainable parameter each, in fp32).

Measured (benchmarks/results/promotion_*.md): where rungs rank the final loss well (llmtune's long tiny table,
+0.86) pausing does not pay; where they rank it backwards, fewer seeds miss the front.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from llmtune.config.pruner_settings import FRACTION_TOL
from llmtune.study.attrs import CURVE, PAUSED, RESUME_OF, RUNG_METRICS, SETTINGS, STATUS
from llmtune.study.rungs import configuration
from llmtune.trial.endings import SURPLUS

PAUSE_FOLDER = "paused-state"  # in the trial's folder: the state a paused trial goes on from
STATE_FILE = "state.pt"  # harness.resume.STATE_FILE (not imported: the search process does not load torch)


def _points_to(points: Any, fraction: float) -> list[Any]:
    """The entries of a curve or rung-metrics list up to ``fraction``."""
    return [p for p in points if float(p[0]) <= fraction + FRACTION_TOL] if isinstance(points, list) else []


def paused_at(trial: FrozenTrial) -> tuple[float, str] | None:
    """(rung fraction, state folder) of a paused trial, or None."""
    paused = trial.user_attrs.get(PAUSED)
    if trial.state != TrialState.PRUNED or not isinstance(paused, dict):
        return None
    return float(paused["fraction"]), str(paused["state"])


def continued(trials: Iterable[FrozenTrial]) -> set[int]:
    """Numbers of the paused trials a continuation has been queued for (and not given up as a twin)."""
    out = set()
    for t in trials:
        of = t.user_attrs.get(RESUME_OF)
        if isinstance(of, dict) and t.user_attrs.get(STATUS) != SURPLUS:
            out.add(int(of["trial"]))
    return out


def promotable(study: optuna.Study, should_prune: Callable[..., bool],
               trials: list[FrozenTrial] | None = None) -> list[FrozenTrial]:
    """The paused trials that the pruner's rule, asked again now, lets continue; latest rung first, then
    lowest loss (as ASHA promotes from the top rung down). ``should_prune``: the pruner's own method."""
    everyone = trials if trials is not None else study.get_trials(deepcopy=False)
    taken = continued(everyone)
    out: list[tuple[float, float, FrozenTrial]] = []
    for t in everyone:
        where = paused_at(t)
        if where is None or t.number in taken:
            continue
        fraction = where[0]
        point = _points_to(t.user_attrs.get(CURVE), fraction)
        if not point or abs(float(point[-1][0]) - fraction) > FRACTION_TOL:
            continue
        loss = float(point[-1][1])
        if not math.isfinite(loss):
            continue
        metrics = _points_to(t.user_attrs.get(RUNG_METRICS), fraction)
        measured = dict(metrics[-1][1]) if metrics and isinstance(metrics[-1][1], dict) else {}
        if not should_prune(study, configuration(t), fraction, loss, measured):
            out.append((-fraction, loss, t))
    return [t for _, _, t in sorted(out, key=lambda x: (x[0], x[1], x[2].number))]


def enqueue_continuation(study: optuna.Study, paused: FrozenTrial) -> None:
    """Queue the paused trial's continuation: its settings, what it resumes, its curve up to the rung (so
    the rung populations see the configuration while it waits)."""
    where = paused_at(paused)
    assert where is not None
    fraction, state = where
    study.enqueue_trial(paused.params, skip_if_exists=False, user_attrs={
        RESUME_OF: {"trial": paused.number, "first": configuration(paused), "fraction": fraction, "state": state,
                    "settings": paused.user_attrs.get(SETTINGS) or {}},
        CURVE: _points_to(paused.user_attrs.get(CURVE), fraction),
        RUNG_METRICS: _points_to(paused.user_attrs.get(RUNG_METRICS), fraction)})


def promote(study: optuna.Study, should_prune: Callable[..., bool], log: Callable[[str], None]) -> int:
    """Queue a continuation for every promotable paused trial; returns how many were queued."""
    chosen = promotable(study, should_prune)
    for t in chosen:
        enqueue_continuation(study, t)
    if chosen:
        log(f"trial(s) {', '.join(str(t.number) for t in chosen)} promoted: their rung now ranks them among the "
            "kept; each goes on from where it was paused")
    return len(chosen)


def waiting(study: optuna.Study) -> bool:
    """Whether a continuation waits in the queue (it runs whatever n_trials says)."""
    return any(RESUME_OF in t.user_attrs for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def release(resume: Resume) -> None:
    """Delete a paused state once its continuation has ended for good (no retry will read it)."""
    shutil.rmtree(resume.folder, ignore_errors=True)


def twin(trial: FrozenTrial, trials: Iterable[FrozenTrial]) -> bool:
    """Whether an earlier trial already continues the same paused trial (two workers promoted it at once)."""
    of = trial.user_attrs.get(RESUME_OF)
    if not isinstance(of, dict):
        return False
    return any(t.number < trial.number and t.state != TrialState.FAIL
               and isinstance(t.user_attrs.get(RESUME_OF), dict) and t.user_attrs[RESUME_OF]["trial"] == of["trial"]
               for t in trials)


@dataclass
class Resume:
    """What a continuation resumes: the paused trial, its rung, its state folder (None when it cannot be read
    here), its settings, and its curve and rung metrics up to the rung."""

    trial: int
    first: int
    fraction: float
    state: str | None
    folder: str
    settings: dict[str, Any]
    curve: list[Any]
    rung_metrics: list[Any]


def resume_of(trial: FrozenTrial) -> Resume | None:
    """What the trial continues, or None when it is no continuation."""
    of = trial.user_attrs.get(RESUME_OF)
    if not isinstance(of, dict):
        return None
    fraction, folder = float(of["fraction"]), str(of["state"])
    return Resume(int(of["trial"]), int(of["first"]), fraction,
                  folder if (Path(folder) / STATE_FILE).is_file() else None, folder, dict(of.get("settings") or {}),
                  _points_to(trial.user_attrs.get(CURVE), fraction), _points_to(trial.user_attrs.get(RUNG_METRICS), fraction))


def carried(trial: FrozenTrial | optuna.Trial) -> dict[str, Any]:
    """The user attributes a retry of a continuation keeps (what it resumes, its history to the rung)."""
    of = trial.user_attrs.get(RESUME_OF)
    if not isinstance(of, dict):
        return {}
    fraction = float(of["fraction"])
    return {RESUME_OF: of, CURVE: _points_to(trial.user_attrs.get(CURVE), fraction),
            RUNG_METRICS: _points_to(trial.user_attrs.get(RUNG_METRICS), fraction)}
