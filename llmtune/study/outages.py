"""When a search's surroundings fail, not its trials: the study storage dropping out, and a trial's disk or
network failing again and again.

- **The storage drops out** (a PostgreSQL restart, a network blip): every storage call that fails because
  its connection dropped is tried again with a growing, jittered wait (`reconnecting`), for as long as the
  heartbeat grace period allows, since past it other workers take this process's trials for lost anyway.
  Connections the server closed are replaced on checkout (`pool_pre_ping`, set by `storage.open_storage`).
  Past the grace the search ends with one message (`StorageLost`, exit code 1), never a traceback; its
  running trials are retried, by another worker or on the next start, as any lost trial is.
- **A trial's surroundings keep failing** (a full disk): an `environment` ending is never final, its
  configuration stays queued; a search process whose last `ENVIRONMENT_STOP` trials in a row ended so
  stops with one message (`EnvironmentStop`), and the next start runs the queued configurations first.

Imports no optuna: the storage wraps its methods with `reconnecting`, the loop asks `EnvironmentStop`.
"""

from __future__ import annotations

import functools
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from llmtune.errors import SearchError

F = TypeVar("F", bound=Callable[..., Any])

# The storage methods (Optuna's RDBStorage: each opens a session of its own) retried after a dropped
# connection. Methods built on these (BaseStorage.get_trial_number_from_id, ...) are covered through them.
STORAGE_CALLS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
    "get_trial_user_attrs", "get_trial_system_attrs", "get_all_studies", "create_new_trial", "set_trial_param",
    "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr",
    "set_trial_system_attr", "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials",
    "get_best_trial", "record_heartbeat",
)  # and Optuna's private ones that read the database: `engine.PRIVATE_STORAGE_CALLS`
FIRST_WAIT_S, MAX_WAIT_S = 0.5, 5.0

# Trials in a row of one search process that ended `environment` before it stops: a disk that stays full.
ENVIRONMENT_STOP = 8


class StorageLost(SearchError):
    """The study storage stayed unreachable for longer than the heartbeat grace period."""


def causes(error: BaseException) -> Iterator[BaseException]:
    """The error and each it was raised from or during, once each (a cycle ends the walk)."""
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in seen:
        seen.append(current)
        yield current
        current = current.__cause__ or current.__context__


def dropped(error: BaseException) -> BaseException | None:
    """The lost or refused database connection behind an error (Optuna wraps SQLAlchemy's errors in a
    StorageInternalError whose words blame the data), or None for a refused statement."""
    import sqlalchemy.exc

    return next((e for e in causes(error) if isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError))
                 or getattr(e, "connection_invalidated", False)), None)


class _Outage:
    """One outage of the storage, shared by every thread of the process: it began at `since`; told once
    when it begins and once when it ends (through the storage's `log`)."""

    lock = threading.Lock()
    since: float | None = None

    @classmethod
    def failed(cls, storage: Any, error: BaseException) -> float:
        """Note a failed call; returns the outage's age in seconds."""
        with cls.lock:
            now = time.monotonic()
            if cls.since is None:
                cls.since = now
                why = " ".join(f"{type(error).__name__}: {error}".partition("(Background on this error")[0].split())
                _log(storage, f"lost the study storage ({why[:200]}); reconnecting for up to "
                              f"{_grace(storage):g}s (the heartbeat grace)")
            return now - cls.since

    @classmethod
    def over(cls, storage: Any) -> None:
        with cls.lock:
            if cls.since is not None:
                _log(storage, f"the study storage is back after {time.monotonic() - cls.since:.1f}s")
                cls.since = None


def _log(storage: Any, message: str) -> None:
    log = getattr(storage, "log", None)
    if log is not None:
        log(message)


def _grace(storage: Any) -> float:
    return float(getattr(storage, "grace_period", None) or 90)


def _lost(storage: Any, error: BaseException) -> StorageLost:
    from llmtune.study.storage import mask_url, storage_error

    url = str(getattr(storage, "url", ""))
    return StorageLost(
        f"lost the study storage {mask_url(url)} for longer than the heartbeat grace period ({_grace(storage):g}s), "
        f"so this search stopped: {storage_error(url, error).partition(': ')[2]}. Run the same command again once the "
        "database is back: the study keeps its trials, and the ones this search was running are retried", code=1)


def reconnecting(method: F) -> F:
    """A storage method that, when its connection dropped, waits and tries again (0.5 s, doubling, at most
    5 s, jittered) until the heartbeat grace period of the outage has passed; then `StorageLost`."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        wait = FIRST_WAIT_S
        while True:
            try:
                result = method(self, *args, **kwargs)
            except Exception as e:
                cause = None if isinstance(e, StorageLost) else dropped(e)
                if cause is None:
                    raise
                if _Outage.failed(self, cause) >= _grace(self):
                    raise _lost(self, cause) from None
                time.sleep(wait * random.uniform(0.5, 1.5))
                wait = min(MAX_WAIT_S, wait * 2)
                continue
            if _Outage.since is not None:
                _Outage.over(self)
            return result

    return call  # type: ignore[return-value]


def reconnect_all(cls: type, names: tuple[str, ...] = STORAGE_CALLS) -> type:
    """`cls` (a storage class) with every method of `names` it has made `reconnecting`."""
    for name in names:
        if hasattr(cls, name):
            setattr(cls, name, reconnecting(getattr(cls, name)))
    return cls


class EnvironmentStop:
    """Counts this search process's `environment` endings in a row (any other ending resets it); at
    `ENVIRONMENT_STOP` the surroundings stay broken and the search stops (`message`)."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit or ENVIRONMENT_STOP
        self.in_a_row = 0
        self.last = ""
        self.lock = threading.Lock()

    def ended(self, status: str, reason: str) -> bool:
        """Note a told trial's ending; True when the search should stop now."""
        from llmtune.trial.endings import ENVIRONMENT

        with self.lock:
            if status != ENVIRONMENT:
                self.in_a_row = 0
                return False
            self.in_a_row += 1
            self.last = reason
            return self.in_a_row >= self.limit

    def message(self) -> str:
        return (f"the last {self.in_a_row} trials of this search could not run because their surroundings failed, "
                f"not their settings (last: {self.last}), so the search stopped. Free disk space (or fix the "
                "network) and run the same command again: those configurations are kept and run first")
