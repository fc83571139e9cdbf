"""Edges of a shared search: processes that start at the same moment, processes and resumed searches
that would repeat configurations, and trial endings that are neither the configuration's fault nor final.

No training here: studies are opened, sampled and told through the functions the search loop uses.
The PostgreSQL cases need LLMTUNE_TEST_POSTGRES_URL (see tests/test_scale.py) and skip without it.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import tiny_recipe_dict
from optuna.trial import TrialState

from llmtune.config.recipe import recipe_from_dict
from llmtune.config.space import SearchSpace
from llmtune.study import attrs, record
from llmtune.study.attrs import RETRY_OF, STATUS
from llmtune.study.loop import check_resume
from llmtune.study.samplers import UniqueSampler, make_sampler, study_sampler
from llmtune.study.storage import counted, join_study, open_storage
from llmtune.trial.endings import CRASHED, ENVIRONMENT, KILLED, OOM, classify
from llmtune.trial.result import TrialResult
from llmtune.trial.runner import MemoryWatch, TrialJob, TrialProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import distinct_configs  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- safe start ------------------------------------------------------------------------------------

# One process of the safe-start test: for each round, wait for the go file, then join the round's study
# and check its fingerprint as `Search.prepare` does.
_JOINER = r"""
import json, sys, time
from pathlib import Path
cfg, index = json.loads(Path(sys.argv[1]).read_text()), int(sys.argv[2])
from llmtune.config.recipe import recipe_from_dict
from llmtune.study.loop import check_resume
from llmtune.study.storage import join_study
recipe = recipe_from_dict(cfg["recipe"])
out = Path(cfg["dir"])
for r, round_ in enumerate(cfg["rounds"]):
    (out / f"ready.{r}.{index}").touch()
    while not (out / f"go.{r}").exists():
        time.sleep(0.001)
    try:
        study, created = join_study(round_["url"], round_["study"], list(recipe.objectives.values()))
        check_resume(study, recipe, recipe.space, "data", created=created)
        result = {"study_id": study._study_id, "created": created}
        study._storage._backend.engine.dispose()  # this round is done: its connections go back to the server
    except BaseException as e:
        result = {"error": f"{type(e).__name__}: {e}"[:500]}
    (out / f"result.{r}.{index}.tmp").write_text(json.dumps(result))
    (out / f"result.{r}.{index}.tmp").rename(out / f"result.{r}.{index}.json")  # whole, for the reader
"""

PROCESSES, ROUNDS = 4, 10


def _wait_for(paths: list[Path], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not all(p.exists() for p in paths):
        assert time.time() < deadline, f"not there after {timeout}s: {[str(p) for p in paths if not p.exists()]}"
        time.sleep(0.01)


def _safe_start(tmp_path: Path, fresh_url: Any) -> list[list[dict[str, Any]]]:
    """ROUNDS rounds of PROCESSES processes released at one moment. Round r % 3 == 0 opens a fresh
    storage and a new study, 1 a new study in the storage of the round before, 2 that round's study
    again. Returns each round's results, one per process."""
    rounds: list[dict[str, Any]] = []
    for r in range(ROUNDS):
        url = fresh_url(r) if r % 3 == 0 else rounds[-1]["url"]
        study = rounds[-1]["study"] if r % 3 == 2 else f"study-{r}"
        rounds.append({"url": url, "study": study})
    recipe = tiny_recipe_dict(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"recipe": recipe, "dir": str(tmp_path), "rounds": rounds}))
    procs = [subprocess.Popen([sys.executable, "-c", _JOINER, str(tmp_path / "cfg.json"), str(i)])
             for i in range(PROCESSES)]
    results = []
    try:
        for r in range(ROUNDS):
            _wait_for([tmp_path / f"ready.{r}.{i}" for i in range(PROCESSES)])
            (tmp_path / f"go.{r}").touch()
            outs = [tmp_path / f"result.{r}.{i}.json" for i in range(PROCESSES)]
            _wait_for(outs)
            results.append([json.loads(p.read_text()) for p in outs])
        for p in procs:
            assert p.wait(timeout=60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    fingerprint = recipe_from_dict(recipe)
    for r, (round_, outs) in enumerate(zip(rounds, results, strict=True)):
        assert [o.get("error") for o in outs] == [None] * PROCESSES, f"round {r}: {outs}"
        assert len({o["study_id"] for o in outs}) == 1, f"round {r}: not one study: {outs}"
        assert sum(o["created"] for o in outs) == (0 if r % 3 == 2 else 1), f"round {r}: {outs}"
        stored = optuna.load_study(study_name=round_["study"], storage=open_storage(round_["url"]))
        assert stored.user_attrs[attrs.FINGERPRINT]["recipe_fingerprint"] == fingerprint.fingerprint()
        assert stored.user_attrs[attrs.FINGERPRINT]["data_fingerprint"] == "data"
    return results


def test_processes_started_together_on_sqlite_all_join_one_study(tmp_path):
    _safe_start(tmp_path, lambda r: f"sqlite:///{tmp_path / f'fresh-{r}.db'}")


def test_processes_started_together_on_postgres_all_join_one_study(tmp_path, pg_url):
    import psycopg2

    base, _, _ = pg_url.rpartition("/")
    made: list[str] = []

    def fresh(r: int) -> str:
        name = f"llmtune_edges_{uuid.uuid4().hex[:8]}_{r}"
        conn = psycopg2.connect(pg_url)
        conn.autocommit = True
        conn.cursor().execute(f"CREATE DATABASE {name}")
        conn.close()
        made.append(name)
        return f"{base}/{name}"

    try:
        _safe_start(tmp_path, fresh)
    finally:
        conn = psycopg2.connect(pg_url)
        conn.autocommit = True
        for name in made:
            conn.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


def test_reading_an_empty_postgres_database_says_so_and_creates_no_tables(pg_url):
    import psycopg2

    from llmtune.deliver.results import load_results
    from llmtune.errors import SearchError
    from llmtune.study.storage import has_studies

    name = f"llmtune_empty_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(pg_url)
    conn.autocommit = True
    conn.cursor().execute(f"CREATE DATABASE {name}")
    url = f"{pg_url.rpartition('/')[0]}/{name}"
    try:
        with pytest.raises(SearchError, match="holds no study yet"):
            load_results(url)
        assert not has_studies(url)  # before, Optuna created its schema here on a read
    finally:
        conn.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()


def test_a_joiner_waits_for_the_fingerprint_and_reads_the_old_separate_attributes(tmp_path):
    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study, created = join_study(url, "s", list(recipe.objectives.values()))
    joiner, joined = join_study(url, "s", list(recipe.objectives.values()))
    assert (created, joined) == (True, False)
    # The creator writes its fingerprint a moment after the joiner looks: the joiner waits for it.
    writer = threading.Timer(0.3, check_resume, (study, recipe, recipe.space, "data"), {"created": True})
    writer.start()
    started = time.monotonic()
    check_resume(joiner, recipe, recipe.space, "data", created=False)
    assert 0.2 < time.monotonic() - started < 5
    writer.join()
    with pytest.raises(Exception, match="different data"):
        check_resume(joiner, recipe, recipe.space, "other data", created=False)
    # A study written by an earlier version: the separate attributes, no FINGERPRINT.
    old = optuna.create_study(storage=url, study_name="old", directions=list(recipe.objectives.values()))
    for key, value in ((attrs.OBJECTIVES, recipe.objectives), (attrs.SPACE, recipe.space.signature()),
                       (attrs.DATA_FINGERPRINT, "data"), (attrs.RECIPE_FINGERPRINT, recipe.fingerprint())):
        old.set_user_attr(key, value)
    check_resume(old, recipe, recipe.space, "data", created=False, wait_s=0)
    assert attrs.FINGERPRINT not in old.user_attrs
    with pytest.raises(Exception, match="different search space"):
        check_resume(old, recipe_from_dict(tiny_recipe_dict(tmp_path, search={"lora_r": [4, 8]})),
                     recipe_from_dict(tiny_recipe_dict(tmp_path, search={"lora_r": [4, 8]})).space, "data",
                     created=False, wait_s=0)


# -- no repeated configuration ---------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["auto", "random"])
def test_three_processes_on_one_study_run_distinct_configurations(sampler):
    distinct, trials = distinct_configs.run(sampler, workers=3, trials=6, seed=0)
    print(f"{sampler}: distinct configurations / trials = {distinct}/{trials} = {distinct / trials:.2f}")
    assert trials == 18 and distinct / trials == 1.0


@pytest.mark.parametrize("sampler", ["auto", "tpe", "random", "nsga2", "gp"])
def test_a_resumed_search_with_the_same_seed_repeats_no_configuration(tmp_path, sampler):
    if sampler == "gp":
        pytest.importorskip("scipy")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    space = SearchSpace.from_dict(distinct_configs.SPACE)
    for _ in range(2):  # a session, killed while a trial runs; then the resumed one
        study, _ = join_study(url, "resume", ["minimize"])
        study_sampler(study, sampler, space, 1, 12, seed=0, parallel=False)
        assert isinstance(study.sampler, UniqueSampler)
        for _ in range(5):
            trial = study.ask()
            study.tell(trial, distinct_configs.loss(space.suggest(trial)))
        space.suggest(study.ask())  # running when the search was killed
    ran = [frozenset(t.params.items()) for t in study.get_trials()]
    assert len(ran) == 12 and len(set(ran)) == 12


def test_a_configuration_given_to_a_running_or_queued_trial_is_not_given_again(tmp_path):
    """Processes seeded alike ask at the same moment: a trial given its configuration but without its
    parameters yet, and a queued retry just taken, are tried configurations for everyone else."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    space = SearchSpace.from_dict({"lora_r": [4, 8, 16]})
    studies = []
    for _ in range(3):  # three processes, one sampler each, the same seed
        study, _ = join_study(url, "race", ["minimize"])
        study.sampler = make_sampler("random", space, 1, 10, 0, True)[0]
        studies.append(study)
    studies[0].enqueue_trial({"lora_r": 4}, user_attrs={RETRY_OF: 99})
    retry = studies[0].ask()  # takes the queued retry; its parameters come later
    given = studies[1].ask()
    assert given.relative_params  # given its configuration, not yet its parameters
    third = studies[2].ask()
    values = [space.suggest(t)["lora_r"] for t in (third, given, retry)]
    assert sorted(values) == [4, 8, 16], values


# -- trial endings ---------------------------------------------------------------------------------

def test_classify_tells_memory_kills_from_other_kills_and_reads_cpu_oom_and_environment():
    def ending(returncode: int | None, tail: str = "", **evidence: Any) -> str:
        return classify(returncode, None, tail, timed_out=False, interrupted=False, timeout=60, **evidence)[0]

    assert ending(-signal.SIGKILL) == KILLED
    assert ending(-signal.SIGKILL, memory_evidence="the oom_kill counter rose") == OOM
    cpu_oom = ("RuntimeError: [enforce fail at alloc_cpu.cpp:116] data. DefaultCPUAllocator: can't allocate memory: "
               "you tried to allocate 34359738368 bytes. Error code 12 (Cannot allocate memory)")
    assert ending(1, f"Traceback ...\n{cpu_oom}") == OOM
    assert ending(1, "OSError: [Errno 28] No space left on device: '/runs/t/result.tmp'") == ENVIRONMENT
    assert ending(1, "psycopg2.OperationalError: server closed the connection unexpectedly") == ENVIRONMENT
    assert ending(1, "", disk_full="the disk of /runs had 3 MB free") == ENVIRONMENT
    assert ending(1, "ValueError: bad") == CRASHED
    # A library's earlier warning about a connection does not make a later crash an environment failure.
    warned = "wandb: Network error (Connection refused), retrying\n" + "\n".join(["Traceback:", "  ...", "  ...",
                                                                               "ValueError: bad"])
    assert ending(1, warned) == CRASHED


def _fake_machine(root: Path, *, available_kb: int, oom_kills: int, rss_kb: int = 1000, v2: bool = True) -> None:
    (root / "proc" / "self").mkdir(parents=True, exist_ok=True)
    (root / "proc" / "123").mkdir(exist_ok=True)
    (root / "proc" / "meminfo").write_text(f"MemTotal:       16000000 kB\nMemAvailable:   {available_kb} kB\n")
    (root / "proc" / "vmstat").write_text("pgfault 10\noom_kill 0\n")
    (root / "proc" / "123" / "status").write_text(f"Name:\tpython\nVmRSS:\t{rss_kb} kB\n")
    if v2:
        (root / "proc" / "self" / "cgroup").write_text("0::/job\n")
        (root / "cg" / "job").mkdir(parents=True, exist_ok=True)
        (root / "cg" / "job" / "memory.events").write_text(f"low 0\nhigh 0\nmax 3\noom {oom_kills}\noom_kill {oom_kills}\n")
        (root / "cg" / "job" / "memory.max").write_text("max\n")
    else:
        (root / "proc" / "self" / "cgroup").write_text("4:memory:/job\n0::/\n")
        (root / "cg" / "memory" / "job").mkdir(parents=True, exist_ok=True)
        (root / "cg" / "memory" / "job" / "memory.oom_control").write_text(f"oom_kill_disable 0\nunder_oom 0\noom_kill {oom_kills}\n")
        (root / "cg" / "memory" / "job" / "memory.limit_in_bytes").write_text(f"{8000000 * 1024}\n")


@pytest.mark.parametrize("v2", [True, False])
def test_memory_evidence_comes_from_oom_kill_counters_low_memory_or_the_trials_own_size(tmp_path, v2):
    def watch(**machine: Any) -> MemoryWatch:
        _fake_machine(tmp_path, v2=v2, **machine)
        return MemoryWatch(123, proc=tmp_path / "proc", cgroup=tmp_path / "cg")

    quiet = watch(available_kb=8000000, oom_kills=0)
    quiet.poll()
    assert quiet.evidence() is None
    counted_kill = watch(available_kb=8000000, oom_kills=0)
    _fake_machine(tmp_path, available_kb=8000000, oom_kills=1, v2=v2)  # the cgroup's counter rose
    assert "oom_kill counter" in (counted_kill.evidence() or "")
    low = watch(available_kb=8000000, oom_kills=0)
    _fake_machine(tmp_path, available_kb=300000, oom_kills=0, v2=v2)  # 2% of 16 GB left at a poll
    low.poll()
    assert "available" in (low.evidence() or "")
    big = watch(available_kb=6000000, oom_kills=0)
    _fake_machine(tmp_path, available_kb=6000000, oom_kills=0, rss_kb=5800000, v2=v2)
    big.poll()
    assert "it used" in (big.evidence() or "")


def test_a_trial_process_killed_by_sigkill_without_memory_evidence_ends_killed(tmp_path):
    job = TrialJob(recipe=tiny_recipe_dict(tmp_path), values={}, out_dir=tmp_path / "t", fractions=[1.0],
                   timeout=120, env={"LLMTUNE_FAULT": "hang"})
    trial = TrialProcess(job)
    threading.Timer(1.0, os.kill, (trial.proc.pid, signal.SIGKILL)).start()
    result = trial.wait()
    assert trial.proc.returncode == -signal.SIGKILL
    assert result.status == KILLED, result.reason


@pytest.mark.parametrize(("error", "status"), [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:116] data. DefaultCPUAllocator: can't allocate memory: "
                  "you tried to allocate 34359738368 bytes."), OOM),
    (OSError(errno.ENOSPC, "No space left on device"), ENVIRONMENT),
    (RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                  "data/0: file write failed: [Errno 28]"), ENVIRONMENT),
    (ValueError("a bug"), CRASHED),
])
def test_the_harness_maps_host_oom_and_a_full_disk(tmp_path, monkeypatch, error, status):
    from llmtune.harness import train

    def fail(*args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr(train, "_run", fail)
    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path))
    result = train.run_trial(recipe, recipe.space.complete({}), tmp_path / "t")
    assert result.status == status, result.reason
    assert TrialResult.load(tmp_path / "t" / "result.json").status == status


def _ran(study: optuna.Study, recipe: Any, status: str) -> optuna.Trial:
    """Ask the next trial (a queued retry first), give it settings, tell it `status`."""
    trial = study.ask()
    trial.suggest_categorical("lora_r", [4, 8, 16])
    record.tell(study, trial, recipe, TrialResult(status=status, reason=f"test: {status}"))
    return trial


def test_a_killed_trial_is_retried_once_and_an_environment_failure_is_never_final(tmp_path, monkeypatch):
    monkeypatch.setattr(record, "ENVIRONMENT_WAIT_S", 0.0)
    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path))
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", directions=list(recipe.objectives.values()))
    first = _ran(study, recipe, KILLED)
    again = _ran(study, recipe, KILLED)  # its retry: the same settings, killed again
    trials = study.get_trials()
    assert again.params == first.params and trials[1].user_attrs[RETRY_OF] == first.number
    assert [t.user_attrs[STATUS] for t in trials] == [KILLED, CRASHED]  # the second kill is final
    assert "ended killed 1 time(s) before: final" in trials[1].user_attrs[attrs.REASON]
    assert counted(study) == (1, 0)  # the first kill does not count towards n_trials, the final one does
    assert not study.get_trials(states=(TrialState.WAITING,))
    for _ in range(3):  # a disk that stays full: retried with the same settings...
        _ran(study, recipe, ENVIRONMENT)
    trials = study.get_trials(states=(TrialState.FAIL,))
    assert [t.user_attrs[STATUS] for t in trials[2:]] == [ENVIRONMENT] * 3
    assert len({frozenset(t.params.items()) for t in trials[2:]}) == 1  # each time the same settings again
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].user_attrs[RETRY_OF] == trials[-1].number
    assert counted(study) == (1, 0)
    for _ in range(10):  # ...as often as it fails: a full disk is never the configuration's fault
        _ran(study, recipe, ENVIRONMENT)
    last = study.get_trials(states=(TrialState.FAIL,))[-1]
    assert last.user_attrs[STATUS] == ENVIRONMENT and "final" not in last.user_attrs[attrs.REASON]
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].user_attrs[RETRY_OF] == last.number and counted(study) == (1, 0)
