"""Where a study lives and how its workers stay honest: storage URLs (masked), opening studies, the
trial attributes llmtune writes, heartbeats, and finding and retrying trials whose worker died.

Optuna's own RDB storage is the engine (ARCHITECTURE decision 7); this module only adds llmtune's
bookkeeping on top. Read-only users of a study (results, report, export) import from here, so they
do not pull in the search loop and its trial runner.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy.exc
from filelock import FileLock
from optuna.trial import FrozenTrial, TrialState

from llmtune.config.recipe import Recipe
from llmtune.errors import SearchError
from llmtune.study import engine
from llmtune.study.attrs import OWNER, RESUME_OF, RETRY_OF, STATUS, VARIANT_OF
from llmtune.study.outages import STORAGE_CALLS, StorageLost, causes, reconnect_all
from llmtune.study.record import lost, retry
from llmtune.trial.endings import counts, retried

# llmtune drives heartbeats itself around ask/tell (the trial runs in a child process), which is
# what these warnings are about; they would only confuse users.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

T = TypeVar("T")

# Processes that open a fresh storage at the same moment all create Optuna's tables (on PostgreSQL its
# enum types first: CREATE TYPE studydirection) and stamp its schema version (alembic_version); all but
# one fail on a duplicate, as IntegrityError or in words. Opening again finds what the winner created.
_RACE_MARKERS = ("already exists", "duplicate key", "UniqueViolation", "UNIQUE constraint failed", "DuplicateTable",
                 "DuplicateObject")
OPEN_ATTEMPTS = 10  # jittered backoff from 0.05 s, at most 2 s a wait: ~10 s in all

# Defaults; LLMTUNE_HEARTBEAT_INTERVAL / LLMTUNE_HEARTBEAT_GRACE (seconds) override them, e.g. for tests.
# A grace of several intervals keeps a busy database or a slow network from failing live trials.
HEARTBEAT_INTERVAL, GRACE_PERIOD = 20, 90


def mask_url(url: str) -> str:
    """Hide the password of a storage URL (user:secret@host -> user:***@host)."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url


def masked_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe as JSON for the study and the trial processes, with the storage password masked
    (the URL was expanded from ${ENV} at load; it must not land in spec.json or the dashboard)."""
    d: dict[str, Any] = json.loads(json.dumps(recipe.to_dict(), default=str))
    if d.get("study", {}).get("storage"):
        d["study"]["storage"] = mask_url(d["study"]["storage"])
    return d


def heartbeat_settings() -> tuple[int, int]:
    """(heartbeat interval, grace period) in seconds: how often a running trial reports alive, and how
    long without a report before another worker declares it lost."""
    values = []
    for name, default in (("LLMTUNE_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL), ("LLMTUNE_HEARTBEAT_GRACE", GRACE_PERIOD)):
        raw = os.environ.get(name, "").strip()
        try:
            value = int(raw) if raw else default
        except ValueError:
            value = 0
        if value < 1:
            raise SearchError(f"{name}={raw!r} is not a whole number of seconds >= 1; e.g. {name}={default}")
        values.append(value)
    interval, grace = values
    if grace < 2 * interval:
        raise SearchError(f"LLMTUNE_HEARTBEAT_GRACE={grace} must be at least twice LLMTUNE_HEARTBEAT_INTERVAL={interval}, "
                          f"or live trials are declared lost; e.g. LLMTUNE_HEARTBEAT_GRACE={max(GRACE_PERIOD, 4 * interval)}")
    return interval, grace


def worker_id() -> str:
    """host:pid of this search process. The host part carries the PID namespace, so containers that
    share a host name (host networking) never take each other's PIDs for their own."""
    try:
        ns = os.readlink("/proc/self/ns/pid").removeprefix("pid:")
    except OSError:
        ns = ""
    return f"{socket.gethostname()}{ns}:{os.getpid()}"


# pip names of database drivers whose import name differs
PIP_NAMES = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient"}


def storage_error(url: str, error: BaseException) -> str:
    """Why the storage at ``url`` did not open, with the fix, and its password masked wherever the driver
    quoted the URL. Every opener uses it: the search, the readers (report, export) and the preflight."""
    if isinstance(error, ImportError) and error.name:
        return (f"cannot open the study storage {mask_url(url)}: its database driver {error.name!r} is not installed; "
                f"pip install {PIP_NAMES.get(error.name, error.name)}")
    if isinstance(error, sqlalchemy.exc.NoSuchModuleError):
        return (f"{mask_url(url)!r}: SQLAlchemy knows no database {url.partition(':')[0]!r}; use "
                "sqlite:///path/study.db or postgresql://user:password@host:5432/db")
    text = " ".join(f"{type(error).__name__}: {error}".partition("(Background on this error")[0].split())
    password = url.split("://", 1)[-1].rsplit("@", 1)[0].partition(":")[2] if "@" in url else ""
    if password:
        text = text.replace(password, "***")
    hint = ("pip install 'psycopg[binary]'" if isinstance(error, ImportError) and url.startswith("postgres")
            else "check the storage URL, that the database server is reachable and the user may connect")
    return f"cannot open the study storage {mask_url(url)}: {text.strip()}; {hint}"


def _schema_race(error: BaseException) -> bool:
    """Whether an error (or one it was raised from) is another process creating the same schema."""
    return any(isinstance(e, sqlalchemy.exc.IntegrityError) or any(m in str(e) for m in _RACE_MARKERS)
               for e in causes(error))


def _until_settled(step: Callable[[], T]) -> T:
    """`step`, run again after a short random wait while it fails on a schema race (bounded)."""
    for attempt in range(OPEN_ATTEMPTS):
        try:
            return step()
        except Exception as e:
            if attempt == OPEN_ATTEMPTS - 1 or not _schema_race(e):
                raise
            time.sleep(min(2.0, 0.05 * 2 ** attempt) * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")


def join_study(url: str, name: str, directions: list[str],
               sampler: optuna.samplers.BaseSampler | None = None) -> tuple[optuna.Study, bool]:
    """Create the study or join it: (the study, whether this call created it). Any number of processes
    may call this at the same moment on a fresh or existing storage: one creates the schema and the
    study, the others retry (`_until_settled`) and load them."""

    def create_or_load(storage: optuna.storages.BaseStorage) -> tuple[optuna.Study, bool]:
        try:
            return optuna.create_study(storage=storage, study_name=name,
                                       directions=directions,  # type: ignore[arg-type]  # validated by the recipe
                                       sampler=sampler), True
        except optuna.exceptions.DuplicatedStudyError:
            return optuna.load_study(study_name=name, storage=storage, sampler=sampler), False

    try:
        storage = open_storage(url)
        return _until_settled(lambda: create_or_load(storage))
    except (ImportError, ValueError, optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
        raise SearchError(storage_error(url, e)) from None


def open_study(url: str, name: str, directions: list[str], sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """Create the study or join it (other workers may have created it already)."""
    return join_study(url, name, directions, sampler)[0]


def storage_url(recipe: Recipe, override: str | None = None) -> str:
    url = override or os.environ.get("LLMTUNE_STORAGE") or recipe.study.storage
    if url:
        return os.path.expandvars(url)
    out = Path(recipe.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out / 'study.db'}"


def _retry_failed(study: optuna.Study, trial: FrozenTrial) -> None:
    """Heartbeat callback, for when Optuna's own `fail_stale_trials` (e.g. in `study.optimize`) found the
    trial first: it is retried. Optuna calls it after failing the trial, so it can no longer be annotated."""
    retry(study, trial)


def fail_stale(study: optuna.Study) -> list[int]:
    """Fail the trials whose worker stopped sending heartbeats (it died, or lost the database for longer
    than the grace period), mark them interrupted and queue each for a retry (`record.lost`: of several
    workers doing this at once, exactly one fails and requeues each)."""
    if not engine.heartbeat_enabled(study):
        return []
    grace = engine.grace_period(study)
    reason = f"its worker sent no heartbeat for {grace}s (it died or lost the database); retried"
    numbers = []
    for tid in engine.stale_trial_ids(study):
        if lost(study, tid, reason):
            numbers.append(engine.storage(study).get_trial(tid).number)
    return numbers


def _with_driver(url: str) -> str:
    """postgresql:// (or postgres://, as cloud providers write it) with an installed driver: SQLAlchemy 2.1
    defaults to psycopg 3, while psycopg2 is what many environments carry."""
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        return url
    from llmtune.hardware import installed

    driver = "psycopg" if installed("psycopg") or not installed("psycopg2") else "psycopg2"
    return f"postgresql+{driver}{sep}{rest}"


class _RDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage that closes its connections when creating it fails (e.g. on a schema race,
    before `_until_settled` tries again): else each failed try would hold its pool until collected. Its
    calls outlast a dropped connection for up to the heartbeat grace period (`outages.reconnecting`),
    telling `log` (set by the search: `watch_storage`) when the storage goes and comes back."""

    log: Callable[[str], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            if hasattr(self, "engine"):
                self.engine.dispose()
            raise


reconnect_all(_RDBStorage, STORAGE_CALLS + engine.PRIVATE_STORAGE_CALLS)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Optuna's RDB storage at `url`, creating its schema if needed (safe with other processes doing it at once)."""
    if url.startswith("sqlite:") or "://" in url:
        interval, grace = heartbeat_settings()
        return _until_settled(lambda: _RDBStorage(
            _with_driver(url), heartbeat_interval=interval, grace_period=grace,
            heartbeat_stale_trial_callback=_retry_failed,
            # a server that restarted closed every pooled connection: each is checked out anew (pool_pre_ping)
            engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {"pool_pre_ping": True}))
    raise SearchError(f"study.storage {url!r} is not a database URL; use sqlite:///path.db or postgresql://user@host/db")


def watch_storage(study: optuna.Study, log: Callable[[str], None]) -> None:
    """Tell `log` when the study's storage drops out and when it is back (`outages.reconnecting`)."""
    backend = engine.uncached(study)
    if isinstance(backend, _RDBStorage):
        backend.log = log


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (None for another database, or SQLite in memory)."""
    if not url.startswith("sqlite:"):
        return None
    path = url.partition(":///")[2].partition("?")[0]
    return Path(path) if path and path != ":memory:" else None


@contextlib.contextmanager
def claim_lock(url: str) -> Iterator[None]:
    """Held while a search process takes its next trial (`Search._claim`: the lost-trial check, `ask`, the
    strategy's claim). On PostgreSQL nothing: its row locks make Optuna's pop of a queued trial and the
    failing of a lost one atomic, and every proposal is visible to the next `ask`. SQLite has no row locks:
    two processes could pop one queued trial, fail one lost trial twice, or propose one configuration at
    the same moment; an exclusive lock on a file beside the database (`<db>.llmtune-lock`) makes the
    processes on one SQLite study take their trials one at a time, as the threads of one process do."""
    db = sqlite_path(url)
    if db is None:
        yield
        return
    with FileLock(str(db.with_name(db.name + ".llmtune-lock"))):  # flock on POSIX, msvcrt on Windows
        yield


def others_at_work(study: optuna.Study, created: bool) -> bool:
    """Whether other search processes may share this study now, on a storage nobody named shared (the
    default SQLite file): this process joined it rather than created it, and it is fresh (created by another
    process a moment ago) or holds a running trial of a live process other than this one."""
    if created:
        return False
    trials = study.get_trials(deepcopy=False)
    return not trials or any(t.state == TrialState.RUNNING and _running_elsewhere(str(t.system_attrs.get(OWNER, "")))
                             for t in trials)


def has_studies(url: str) -> bool:
    """Whether the database at `url` holds Optuna's schema, looked up without creating it (reading a
    search's results must not write tables into an empty database)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(_with_driver(url))
    try:
        return sqlalchemy.inspect(engine).has_table("studies")
    finally:
        engine.dispose()


def _running_elsewhere(owner: str) -> bool:
    """False when `owner` (host:pid, see `worker_id`) is a dead process on this host."""
    host, _, pid = owner.rpartition(":")
    if host != worker_id().rpartition(":")[0] or not pid.isdigit():
        return True  # another machine: the heartbeat decides
    try:
        os.kill(int(pid), 0)
        return int(pid) != os.getpid()
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def recover_lost_trials(study: optuna.Study) -> list[int]:
    """At start: fail and requeue RUNNING trials whose search process on this host is gone (at once),
    and those of other hosts whose heartbeat stopped."""
    numbers = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.system_attrs.get(OWNER)
        # several processes restarting on this host may find it at once: one of them fails and requeues it
        if owner and not _running_elsewhere(owner) and lost(study, engine.trial_id(t),
                                                            "the search stopped while it ran; retried"):
            numbers.append(t.number)
    return numbers + fail_stale(study)


# A trial failed as retried (lost with its worker, an environment ending) holds its slot for this long until its
# retry is queued: failing it and queueing the retry are two writes, and a worker that counted in between would
# start a fresh trial in the slot, leaving the lost configuration never run once n_trials is reached.
RETRY_PENDING_S = 60.0


def counted(study: optuna.Study) -> tuple[int, int]:
    """(finished trials that count towards n_trials, running trials; a trial just failed as retried, whose retry
    is not queued yet, counts as running: `RETRY_PENDING_S`)."""
    done = running = 0
    trials = study.get_trials(deepcopy=False)
    queued_again = {t.user_attrs.get(RETRY_OF) for t in trials}
    now = time.time()
    for t in trials:
        if VARIANT_OF in t.user_attrs or RESUME_OF in t.user_attrs:
            continue  # an execution variant measured by a probe (study/probes.py), or a paused trial's continuation
            #           (study/promotion.py): the same configuration, not a trial of its own
        status = t.user_attrs.get(STATUS)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            done += 1
        elif t.state == TrialState.FAIL and counts(status):
            done += 1
        elif t.state == TrialState.RUNNING:
            running += 1
        elif (t.state == TrialState.FAIL and retried(status) and t.number not in queued_again
              and t.datetime_complete is not None and now - t.datetime_complete.timestamp() < RETRY_PENDING_S):
            running += 1
    return done, running


class Heartbeat:
    """Records a running trial's heartbeat every interval from a thread of its own, so that no slow
    step of the search process (memory estimate, telling) makes a live worker look dead."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, log: Callable[[str], None],
                 lost: Callable[[StorageLost], None] | None = None):
        self.study, self.trial, self.log, self.lost = study, trial, log, lost  # lost: the storage stayed away
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    def _beat(self) -> None:
        interval = heartbeat_settings()[0]
        while not self.done.wait(interval):
            try:
                engine.record_heartbeat(self.study, self.trial)
            except StorageLost as e:  # gone for longer than the grace: the search stops (outages.py)
                if self.lost is not None:
                    self.lost(e)
                return
            except Exception as e:  # a database hiccup must not stop the trial; the next beat retries
                self.log(f"trial {self.trial.number}: heartbeat not recorded ({type(e).__name__}); retrying")
