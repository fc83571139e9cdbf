"""Scale-out: several trials at once on one machine, and several search processes on one PostgreSQL study.

The PostgreSQL test needs a server: LLMTUNE_TEST_POSTGRES_URL (``.ci/run`` starts a throwaway one on
loopback and sets it); without it the test skips and says why.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import tiny_recipe_dict
from optuna.trial import TrialState

from llmtune.config.recipe import recipe_from_dict
from llmtune.errors import SearchError
from llmtune.study.attrs import METRICS_KEY, OWNER, REASON, RETRY_OF, STATUS
from llmtune.study.loop import Search
from llmtune.study.storage import counted, heartbeat_settings, mask_url, open_storage, open_study, worker_id

FAST = {
    "data": {"source": "llmtune/tiny-tasks", "eval_max_length": 128, "max_eval_examples": 16, "max_train_examples": 200},
    "train": {"budget": {"examples": 32}, "eval_points": 1},
    "measure": {"latency_prompts": 1, "max_new_tokens": 2},
}


def fast_recipe(tmp_path: Path, **sections) -> dict:
    search = {**tiny_recipe_dict(tmp_path)["search"], "lora_r": [2, 4, 8, 16]}
    return tiny_recipe_dict(tmp_path, **{**FAST, "search": search, **sections})


@pytest.fixture()
def tiny_assets(tiny_model_path, tiny_data_path):
    """Build the tiny model once before any search starts trial processes."""


def _overlaps(spans: list[tuple[float, float]]) -> int:
    """Most spans open at one moment."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_workers_2_on_cpu_run_trials_at_the_same_time(tmp_path, tiny_assets):
    data = fast_recipe(tmp_path, study={"n_trials": 2, "sampler": "random", "trial_timeout": 300})
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(data))
    run = subprocess.run([sys.executable, "-m", "llmtune.cli", "search", str(recipe_path), "--workers", "2", "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 worker(s)" in run.stderr
    study = optuna.load_study(study_name="test", storage=f"sqlite:///{Path(data['output_dir']) / 'study.db'}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    spans = [(t.datetime_start.timestamp(), t.datetime_complete.timestamp()) for t in trials]
    assert _overlaps(spans) == 2, spans  # both trials were running at once
    # Each worker's trial process got its share of the CPU threads.
    for t in trials:
        assert Path(t.user_attrs["llmtune.dir"], "result.json").exists()


def test_the_last_slot_goes_to_one_process_the_other_gives_its_trial_back(tmp_path, monkeypatch):
    """Two processes ask for the last of n_trials at once: the one that checks second gives back."""
    monkeypatch.setenv("LLMTUNE_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("LLMTUNE_HEARTBEAT_GRACE", "30")
    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path, study={"n_trials": 2}))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    search = Search(recipe, storage=url, log=lambda m: None)
    search.study = optuna.create_study(storage=open_storage(url), study_name="race", directions=["minimize"] * 2)
    rival = optuna.load_study(study_name="race", storage=open_storage(url))  # "another process"
    first = rival.ask()
    rival.tell(first, [1.0, 1.0])  # 1 of 2 trials done: one slot left
    rival_trials: list[optuna.Trial] = []
    own_ask = search.study.ask

    def ask_while_the_rival_takes_the_last_slot(*args, **kwargs):
        rival_trials.append(rival.ask())  # between this process's budget check and its ask
        search.study.ask = own_ask
        return own_ask(*args, **kwargs)

    search.study.ask = ask_while_the_rival_takes_the_last_slot
    claimed: list[object] = []
    worker = threading.Thread(target=lambda: claimed.append(search._claim()))
    worker.start()
    time.sleep(2)
    assert worker.is_alive()  # waits: the rival's trial might still fail and need a retry
    trials = rival.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL]  # ours: given up
    assert trials[2].user_attrs[STATUS] == "surplus" and not trials[2].params  # never sampled, never run
    assert counted(rival) == (1, 1)
    rival.tell(rival_trials[0], [2.0, 2.0])
    worker.join(timeout=20)
    assert not worker.is_alive() and claimed == [None]  # n_trials reached: nothing more to run
    assert counted(rival) == (2, 0)


def test_gpus_entries_are_indices_of_the_visible_gpus_and_may_be_groups(tmp_path, monkeypatch):
    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert Search(recipe, gpus=["0", "1+2"]).gpus == ["0", "1,2"]
    assert Search(recipe, gpus=["0", "1+2"]).workers == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert Search(recipe, gpus=["0", "1+2"]).gpus == ["4", "5,6"]
    with pytest.raises(SearchError, match="GPU 3 is not among the 3 visible ones"):
        Search(recipe, gpus=["3"])
    with pytest.raises(SearchError, match="'0\\+' is not a GPU index or a group like 0\\+1"):
        Search(recipe, gpus=["0+"])


def test_bad_heartbeat_settings_and_storage_errors_say_what_to_fix(monkeypatch):
    monkeypatch.setenv("LLMTUNE_HEARTBEAT_INTERVAL", "10")
    monkeypatch.setenv("LLMTUNE_HEARTBEAT_GRACE", "5")
    with pytest.raises(SearchError, match="LLMTUNE_HEARTBEAT_GRACE=5 must be at least twice"):
        heartbeat_settings()
    monkeypatch.setenv("LLMTUNE_HEARTBEAT_GRACE", "soon")
    with pytest.raises(SearchError, match="LLMTUNE_HEARTBEAT_GRACE='soon' is not a whole number"):
        heartbeat_settings()
    monkeypatch.delenv("LLMTUNE_HEARTBEAT_INTERVAL")
    monkeypatch.delenv("LLMTUNE_HEARTBEAT_GRACE")
    assert heartbeat_settings() == (20, 90)
    assert mask_url("postgresql://llm:pa55word@db:5432/studies") == "postgresql://llm:***@db:5432/studies"


def test_a_storage_that_does_not_open_is_reported_without_its_password():
    pytest.importorskip("psycopg2")
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    url = "postgresql://llm:Pa55-w0rd-x@127.0.0.1:1/studies"
    with pytest.raises(SearchError) as err:
        open_study(url, "x", ["minimize"], optuna.samplers.RandomSampler())
    message = str(err.value)
    assert "Pa55-w0rd-x" not in message and "postgresql://llm:***@127.0.0.1:1/studies" in message
    assert "reachable" in message


def _running_trial_of(study_name: str, storage, pid: int, out: Path) -> int | None:
    """The number of a trial that process `pid` runs (its trial process started), if any."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # not created yet
        return None
    for t in study.get_trials(states=(TrialState.RUNNING,)):
        if t.system_attrs.get(OWNER, "").endswith(f":{pid}") and (out / "trials" / f"{t.number:04d}" / "spec.json").exists():
            return t.number
    return None


def test_workers_on_postgres_share_n_trials_and_retry_the_trial_of_a_killed_worker(tmp_path, tiny_assets, pg_url):
    """Three `llmtune search` processes on one PostgreSQL study of 2 trials. Worker a is SIGKILLed while
    its trial runs; its trial is found by its missing heartbeat, failed as interrupted and retried by
    b or c, which end with exactly 2 finished trials between them."""
    n_trials, study_name = 2, f"scale-{uuid.uuid4().hex[:8]}"
    data = fast_recipe(tmp_path, study={"n_trials": n_trials, "sampler": "random", "trial_timeout": 300})
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "LLMTUNE_HEARTBEAT_INTERVAL": "1", "LLMTUNE_HEARTBEAT_GRACE": "6"}
    password = pg_url.split("://", 1)[1].rsplit("@", 1)[0].partition(":")[2]
    logs = {name: tmp_path / f"{name}.log" for name in "abc"}

    def start(name: str, **extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "llmtune.cli", "search", str(recipe_path), "--study-name", study_name,
               "--output-dir", str(tmp_path / name), "--quiet"]
        if name != "b":  # worker b reads the URL from the environment
            cmd += ["--storage", pg_url]
        worker_env = {**env, **extra, **({"LLMTUNE_STORAGE": pg_url} if name == "b" else {})}
        return subprocess.Popen(cmd, env=worker_env, stdout=logs[name].open("w"), stderr=subprocess.STDOUT)

    def wait_for(what: str, check, seconds: float = 120):
        deadline = time.time() + seconds
        while time.time() < deadline:
            if (found := check()) is not None:
                return found
            time.sleep(0.3)
        pytest.fail(f"timed out waiting for {what}; logs: " + " | ".join(p.read_text() for p in logs.values() if p.exists()))

    storage = open_storage(pg_url)
    doomed = start("a", LLMTUNE_FAULT="hang")  # its trials would never end
    killed = wait_for("worker a to run a trial", lambda: _running_trial_of(study_name, storage, doomed.pid, tmp_path / "a"))
    survivors = [start("b"), start("c")]
    # Both survivors must be past their start-up (where a dead local PID is spotted at once): this test
    # is about the heartbeat, the only sign a worker on another machine gives.
    wait_for("b and c to start", lambda: True if all("worker(s)" in logs[n].read_text() for n in "bc") else None)
    doomed.send_signal(signal.SIGKILL)  # like a machine that dies: no goodbye to the database
    doomed.wait()
    for p in survivors:
        p.wait(timeout=300)
    outputs = [logs[n].read_text() for n in "bc"]
    for p, out in zip(survivors, outputs, strict=True):
        assert p.returncode == 0, out

    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = study.get_trials()
    lost = trials[killed]
    assert lost.state == TrialState.FAIL and lost.user_attrs[STATUS] == "interrupted"
    assert "heartbeat" in lost.user_attrs[REASON]
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(finished) == n_trials and counted(study) == (n_trials, 0)
    assert len({t.number for t in trials}) == len(trials)
    retry = [t for t in finished if t.user_attrs.get(RETRY_OF) == killed]
    assert len(retry) == 1 and retry[0].params == lost.params  # the lost config ran again, once
    for t in finished:
        assert t.user_attrs[STATUS] == "complete"
        assert {"eval_loss", "peak_memory_gb"} <= set(t.user_attrs[METRICS_KEY])
        assert t.values == [t.user_attrs[METRICS_KEY]["eval_loss"], t.user_attrs[METRICS_KEY]["peak_memory_gb"]]
        assert not t.system_attrs[OWNER].endswith(f":{doomed.pid}")
    # Every finished trial ran in exactly one surviving worker.
    ran = sorted(p.parent.name for w in "bc" for p in (tmp_path / w / "trials").glob("*/result.json"))
    assert ran == sorted(f"{t.number:04d}" for t in finished)
    assert "lost their worker" in "".join(outputs)
    # The password never shows: not in the output, not in the trials' spec files, not in the study.
    assert all(password not in out for out in outputs) and mask_url(pg_url) in outputs[0]
    for spec in tmp_path.glob("*/trials/*/spec.json"):
        assert password not in spec.read_text()
    assert password not in str(study.user_attrs)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_gpus_pins_one_trial_per_gpu_entry(tmp_path, tiny_assets):
    """Run on a GPU machine: CUDA_VISIBLE_DEVICES=0 python -m pytest -m gpu tests/test_scale.py.
    Two workers on GPU 0 (`--gpus 0,0`, so one GPU suffices): both trials run at once, on CUDA."""
    data = fast_recipe(tmp_path, train={**FAST["train"], "device": "cuda"},
                       study={"n_trials": 2, "sampler": "random", "trial_timeout": 300})
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(data))
    run = subprocess.run([sys.executable, "-m", "llmtune.cli", "search", str(recipe_path), "--gpus", "0,0", "--quiet"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    study = optuna.load_study(study_name="test", storage=f"sqlite:///{Path(data['output_dir']) / 'study.db'}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert _overlaps([(t.datetime_start.timestamp(), t.datetime_complete.timestamp()) for t in trials]) == 2
    for t in trials:
        assert t.user_attrs["llmtune.info"]["device"] == "cuda"
        assert t.user_attrs[METRICS_KEY]["peak_memory_gb"] > 0


def test_a_lost_trial_is_retried_once_when_several_processes_restart_together(tmp_path):
    """Two search processes restarting on the host where a trial's worker died both find it: the FAIL
    transition succeeds for one, which alone queues the retry; the other neither retries nor crashes."""
    from llmtune.study.storage import recover_lost_trials

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=open_storage(url), study_name="s", directions=["minimize"])
    lost = study.ask()
    lost.suggest_int("lora_r", 4, 64)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    study._storage.set_trial_system_attr(lost._trial_id, OWNER, f"{worker_id().rpartition(':')[0]}:{dead.stdout.strip()}")
    other = optuna.load_study(study_name="s", storage=open_storage(url))
    stale = other.get_trials(states=(TrialState.RUNNING,))  # the second process saw it running too
    assert recover_lost_trials(study) == [lost.number]
    other.get_trials = lambda *a, **k: stale  # its view predates the first one's repair
    assert recover_lost_trials(other) == []
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs[STATUS] == "interrupted"
    retries = [t for t in trials if t.user_attrs.get(RETRY_OF) == lost.number]
    assert len(retries) == 1 and retries[0].state == TrialState.WAITING
