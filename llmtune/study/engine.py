"""Optuna behind one door: every use of a name Optuna does not publish lives here, each with why.

Optuna is the engine (ARCHITECTURE decision 1), driven by ask/tell from threads whose trials run in other
processes, with heartbeats kept by llmtune and trials written by id (a retry, a variant, a trial another
worker declared lost). Optuna's public API serves a trial from inside ``objective(trial)``; for the rest
llmtune needs the storage behind a study and the id behind a trial. Nothing else in the package touches
a private name of Optuna: when a release moves one, this module and its canary test
(tests/test_engine.py) fail, not a search. The tested range is pinned in pyproject.toml.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial

# The system attribute under which `Study.enqueue_trial` stores a queued trial's settings (optuna/study/
# study.py, `enqueue_trial`; read back by `Trial._suggest`). Its presence marks a retry or a prior.
_FIXED_PARAMS = "fixed_params"


def storage(study: optuna.Study) -> BaseStorage:
    """The study's storage. `Study` keeps it private (`_storage`); llmtune writes attributes of trials
    it holds no `Trial` for (a trial declared lost, a variant, a queued retry) through the storage's
    public methods."""
    return study._storage  # noqa: SLF001


def study_id(study: optuna.Study) -> int:
    """The study's row id (`_study_id`): the storage's public methods take it."""
    return study._study_id  # noqa: SLF001


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The trial's row id (`_trial_id`, on `Trial` and `FrozenTrial`): the storage's methods take it,
    and only the trial number is public."""
    return trial._trial_id  # noqa: SLF001


def frozen(study: optuna.Study, trial: optuna.Trial) -> FrozenTrial:
    """The trial as the storage holds it now (its user attributes as queued with it, among others)."""
    return storage(study).get_trial(trial_id(trial))


def is_queued(trial: optuna.Trial) -> bool:
    """Whether an asked trial was queued (`enqueue_trial`: a retry, a prior, a PBT segment) rather than
    fresh. `Trial` has no public reader of its system attributes; its cached frozen copy has them
    without another storage read (`_cached_frozen_trial`)."""
    return _FIXED_PARAMS in trial._cached_frozen_trial.system_attrs  # noqa: SLF001


def record_heartbeat(study: optuna.Study, trial: optuna.Trial | FrozenTrial) -> None:
    """Say the trial is alive. Optuna records heartbeats itself only inside `study.optimize`; llmtune's
    workers run ask/tell, so it calls the storage's heartbeat method (public on RDBStorage, not on
    BaseStorage: hence the ignore)."""
    storage(study).record_heartbeat(trial_id(trial))  # type: ignore[attr-defined]


def heartbeat_enabled(study: optuna.Study) -> bool:
    """Whether the storage keeps heartbeats (`optuna.storages._heartbeat.is_heartbeat_enabled`: no public
    equivalent; an in-memory storage keeps none)."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return bool(is_heartbeat_enabled(storage(study)))


def stale_trial_ids(study: optuna.Study) -> list[int]:
    """Running trials whose heartbeat stopped for longer than the grace period. Optuna's public
    `fail_stale_trials` fails them itself, before llmtune can mark them interrupted (a finished trial
    is frozen), so llmtune asks the storage's `_get_stale_trial_ids` and fails them its own way."""
    return list(storage(study)._get_stale_trial_ids(study_id(study)))  # type: ignore[attr-defined]  # noqa: SLF001


def grace_period(study: optuna.Study) -> int | None:
    """The heartbeat grace period the storage was opened with (`grace_period`, public on RDBStorage; a
    cached storage wraps it in `_backend`)."""
    return getattr(uncached(study), "grace_period", None)


def uncached(study: optuna.Study) -> Any:
    """The storage past Optuna's per-process cache (`_CachedStorage._backend`): what the database holds
    now, written by any process (used where two processes may have raced for one row)."""
    s = storage(study)
    return getattr(s, "_backend", s)


# RDBStorage's private methods that read the database, which a storage that outlasts a dropped connection
# (`storage._RDBStorage`, `outages.reconnecting`) wraps as it wraps the public ones: `_get_trials` is how
# Optuna's per-process cache (`_CachedStorage.get_all_trials`) reads trials, `_get_stale_trial_ids` is
# llmtune's own read (`stale_trial_ids`).
PRIVATE_STORAGE_CALLS = ("_get_trials", "_get_stale_trial_ids")

# Every private name above, for the canary test: (object, attribute) pairs as Optuna must still have them.
PRIVATE_NAMES = (
    ("optuna.study.Study", "_storage"),
    ("optuna.study.Study", "_study_id"),
    ("optuna.trial.Trial", "_trial_id"),
    ("optuna.trial.Trial", "_cached_frozen_trial"),
    ("optuna.trial.FrozenTrial", "_trial_id"),
    ("optuna.storages.RDBStorage", "_get_stale_trial_ids"),
    ("optuna.storages.RDBStorage", "_get_trials"),
    ("optuna.storages.RDBStorage", "record_heartbeat"),
    ("optuna.storages._CachedStorage", "_backend"),
    ("optuna.storages._heartbeat", "is_heartbeat_enabled"),
)
