"""Faults and files: what a search does when its surroundings fail (several processes on one SQLite file, a
database that restarts, a full disk), and what export writes and removes.

The PostgreSQL restart tests start a private server of their own (the same binaries as .ci/run, a free
port, a temp folder) so that restarting it disturbs nobody; without PostgreSQL binaries they skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from conftest import tiny_recipe_dict
from optuna.trial import TrialState

from llmtune.study.attrs import PRIOR, RETRY_OF, STATUS
from llmtune.study.storage import open_storage

FAST = {
    "data": {"source": "llmtune/tiny-tasks", "eval_max_length": 128, "max_eval_examples": 16, "max_train_examples": 200},
    "train": {"budget": {"examples": 32}, "eval_points": 1},
    "measure": {"latency_prompts": 1, "max_new_tokens": 2},
}
REPO = Path(__file__).resolve().parents[1]


def fast_recipe(tmp_path: Path, **sections: Any) -> dict:
    search = {**tiny_recipe_dict(tmp_path)["search"], "lora_r": [2, 4, 8, 16]}
    return tiny_recipe_dict(tmp_path, **{**FAST, "search": search, **sections})


@pytest.fixture()
def tiny_assets(tiny_model_path, tiny_data_path):
    """Build the tiny model once before any search starts trial processes."""


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


# -- 4: several processes on one SQLite study --------------------------------------------------------------

# A search process whose trials take 0.2 s and measure what their settings say (the loop, the sampler, the
# queue and the claims are the real ones; only the training is not), started when `go` appears.
FAKE_TRAINING = r'''
import sys, time
from pathlib import Path
import yaml
from llmtune.config.recipe import recipe_from_dict
from llmtune.study import loop
from llmtune.trial.result import TrialResult

def train(self, job, **kwargs):
    time.sleep(0.2)
    v = job.values
    return TrialResult(status="complete", settings=dict(v),
                       metrics={"eval_loss": 1.0 / v["lora_r"] + v["learning_rate"], "peak_memory_gb": v["lora_r"] / 100})

loop.Search.train = train
loop.prewarm = lambda: None
recipe = recipe_from_dict(yaml.safe_load(Path(sys.argv[1]).read_text()))
search = loop.Search(recipe, n_trials=int(sys.argv[3]), log=lambda m: print(m, flush=True))
go = Path(sys.argv[2])
(go.parent / f"ready-{__import__('os').getpid()}").touch()
while not go.exists():
    time.sleep(0.005)
search.run()
print("ran", len(search.finished), flush=True)
'''


def _race(tmp_path: Path, script: str, args: list[str], processes: int, timeout: float = 300) -> list[str]:
    """Start `processes` copies of `script` (argv: args[0], the go file, args[1:]); each says it is ready after
    its imports and set-up, and waits for the go file, so that all start at the same moment. Their output."""
    (tmp_path / "race.py").write_text(script)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "race.py"), args[0], str(go), *args[1:]],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(processes)]
    deadline = time.time() + 240
    while time.time() < deadline and not all(p.poll() is not None for p in procs):
        if len(list(tmp_path.glob("ready-*"))) >= processes:
            break
        time.sleep(0.1)
    go.touch()
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append(out)
        assert p.returncode == 0, out
    return outs


@pytest.mark.parametrize("learning_rate", [[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2], {"low": 1e-4, "high": 3e-2}],
                         ids=["discrete", "range"])
def test_three_processes_on_one_sqlite_study_never_run_a_configuration_twice(tmp_path, tiny_assets, learning_rate):
    """3 processes x 6 trials on one default (SQLite) study, started at the same moment: every trial ran a
    configuration no other ran (distinct configurations / trials = 1.0), each queued starting point ran once.
    A discrete space: the sampler never repeats what any process claimed, which the claim lock makes visible
    to the next claim; a range: only distinct seeds keep the processes from drawing the same values."""
    search = {**fast_recipe(tmp_path)["search"], "learning_rate": learning_rate}
    data = fast_recipe(tmp_path, search=search, study={"n_trials": 18, "trial_timeout": 300})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    outs = _race(tmp_path, FAKE_TRAINING, [str(recipe), "18"], processes=3)
    study = optuna.load_study(study_name="test", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    ran = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    configs = {(t.params["lora_r"], t.params["learning_rate"]) for t in ran}
    assert len(ran) == 18 and sum(int(o.split("ran ")[-1]) for o in outs) == 18, outs
    assert len(configs) / len(ran) == 1.0
    priors = [t for t in study.get_trials() if t.user_attrs.get(PRIOR)]
    assert priors and all(t.state == TrialState.COMPLETE for t in priors)  # each queued point popped by one process
    assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING, TrialState.FAIL))


POP_QUEUE = r'''
import os, sys, time
from pathlib import Path
import optuna
from llmtune.study import engine
from llmtune.study.storage import claim_lock, open_storage
url = sys.argv[1]
study = optuna.load_study(study_name="q", storage=open_storage(url))
go = Path(sys.argv[2])
(go.parent / f"ready-{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.002)
popped = []
for _ in range(int(sys.argv[3])):
    with claim_lock(url):
        trial = study.ask()
    popped.append(trial.suggest_int("x", 0, 99) if engine.is_queued(trial) else -1)
    study.tell(trial, 0.0)
print("popped", popped, flush=True)
'''


def test_queued_trials_are_popped_by_exactly_one_of_several_processes_on_sqlite(tmp_path):
    """Optuna's pop of a waiting trial reads it outside the write transaction on SQLite; under `claim_lock`
    four processes popping 24 queued trials at the same moment pop each exactly once."""
    url = f"sqlite:///{tmp_path / 'q.db'}"
    study = optuna.create_study(storage=open_storage(url), study_name="q")
    for x in range(24):
        study.enqueue_trial({"x": x})
    outs = _race(tmp_path, POP_QUEUE, [url, "6"], processes=4)
    popped = [x for out in outs for x in json.loads(out.split("popped ")[-1])]
    assert sorted(popped) == list(range(24)), popped  # none popped twice, none left, no fresh trial instead


# -- the stop message after crashes --------------------------------------------------------------------


@pytest.mark.parametrize("n_trials, crashes, said", [(1, 1, "the first trial crashed"),
                                                     (2, 2, "the first 2 trials all crashed with the same reason"),
                                                     (8, 3, "the first 3 trials all crashed with the same reason")])
def test_the_crash_stop_says_the_true_count_once(tmp_path, n_trials, crashes, said):
    from llmtune.config.recipe import recipe_from_dict
    from llmtune.errors import SearchError
    from llmtune.study.loop import Search
    from llmtune.trial.result import TrialResult

    logged: list[str] = []
    search = Search(recipe_from_dict(fast_recipe(tmp_path, study={"n_trials": n_trials})), log=logged.append)
    for _ in range(crashes):
        search._fail_fast(TrialResult(status="crashed", reason="boom"))
    assert search.stop.is_set() and search.failed_fast_count == crashes
    search.prepare = lambda: None  # type: ignore[method-assign]  # nothing to open: the stop is what is tested
    search.workers, search.fork_server = 0, None
    search.log, search.strategy.describe = (lambda m: None), (lambda s: [])  # type: ignore[method-assign]
    search.sampler_why, search.redraw = "", (lambda force=False: None)  # type: ignore[method-assign]
    with pytest.raises(SearchError) as err, _no_prewarm():
        search.run()
    message = str(err.value)
    assert said in message and "boom" in message and message.count("crashed") == 1
    assert not any("crashed" in line for line in logged)  # said once: in the error, not also in the log


@contextlib.contextmanager
def _no_prewarm() -> Iterator[None]:
    from llmtune.study import loop

    real = loop.prewarm
    loop.prewarm = lambda: None  # type: ignore[assignment]
    try:
        yield
    finally:
        loop.prewarm = real


# -- 7: a full disk ------------------------------------------------------------------------------------

# Loaded at the start of every trial process (and of the fork server): while the file LLMTUNE_TEST_DISK_FULL
# names exists, writing result.json fails as a full disk does.
DISK_FULL = '''
import errno, os
flag = os.environ.get("LLMTUNE_TEST_DISK_FULL")
if flag:
    import llmtune.files as files
    real = files.write_atomic
    def write_atomic(path, text):
        if os.path.exists(flag) and str(path).endswith("result.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text)
    files.write_atomic = write_atomic
'''


def test_a_full_disk_stops_the_search_and_the_lost_configuration_runs_once_space_is_freed(tmp_path, tiny_assets,
                                                                                          monkeypatch):
    import llmtune
    from llmtune.errors import SearchError
    from llmtune.study import outages, record

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(DISK_FULL)
    full = tmp_path / "disk-is-full"
    full.touch()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hooks), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("LLMTUNE_TEST_DISK_FULL", str(full))
    monkeypatch.setattr(record, "ENVIRONMENT_WAIT_S", 0.0)
    monkeypatch.setattr(outages, "ENVIRONMENT_STOP", 2)
    data = fast_recipe(tmp_path, study={"n_trials": 2, "sampler": "random", "trial_timeout": 300})
    with pytest.raises(SearchError) as err:
        llmtune.search(data)
    assert err.value.exit_code == 1 and "the last 2 trials of this search could not run" in str(err.value)
    assert "No space left on device" in str(err.value) and "Free disk space" in str(err.value)
    storage = f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    trials = optuna.load_study(study_name="test", storage=storage).get_trials()
    assert [t.user_attrs.get(STATUS) for t in trials if t.state == TrialState.FAIL] == ["environment"] * 2
    assert trials[1].user_attrs[RETRY_OF] == 0 and trials[1].params == trials[0].params
    lost = trials[0].params
    assert [t.state for t in trials[2:]] == [TrialState.WAITING]  # kept for the next start, not final

    full.unlink()  # space freed: the same command again
    result = llmtune.search(data)
    done = [t for t in result.study.get_trials() if t.state == TrialState.COMPLETE]
    assert len(done) == 2 and done[0].params == lost and done[0].user_attrs[RETRY_OF] == 1
    assert not [t for t in result.study.get_trials() if t.user_attrs.get(STATUS) == "crashed"]


# -- 5: the storage restarts mid-search ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivatePostgres:
    """A PostgreSQL server of this test's own (a fresh cluster in a temp folder, on a free loopback port),
    which it may stop and start."""

    def __init__(self, root: Path) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb")) or \
            ([Path(p)] if (p := shutil.which("initdb")) else [])
        if not bins:
            pytest.skip("no PostgreSQL binaries (initdb) here: .ci/run installs them")
        self.bin = bins[-1].parent
        self.as_pg: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no postgres user to run the server as")
            self.as_pg = ["runuser", "-u", "postgres", "--"]
        self.dir = root
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.as_pg:
            shutil.chown(self.dir, "postgres")
        self.port, self.password = _free_port(), "pg-" + uuid.uuid4().hex[:12]
        (self.dir / "pw").write_text(self.password)
        (self.dir / "pw").chmod(0o644)
        self._pg(["initdb", "-D", str(self.dir / "data"), "-U", "llmtune", f"--pwfile={self.dir / 'pw'}",
                  "-A", "scram-sha-256", "-E", "UTF8"])
        self.start()
        subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "llmtune", "faults"],
                       env={**os.environ, "PGPASSWORD": self.password}, check=True, capture_output=True)
        self.url = f"postgresql://llmtune:{self.password}@127.0.0.1:{self.port}/faults"

    def _pg(self, argv: list[str]) -> None:
        subprocess.run([*self.as_pg, str(self.bin / argv[0]), *argv[1:]], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._pg(["pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-t", "60", "-o",
                  f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c max_connections=100", "start"])

    def stop(self) -> None:
        self._pg(["pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._pg(["pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture()
def private_pg(tmp_path_factory) -> Iterator[PrivatePostgres]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            pytest.skip("no PostgreSQL driver: pip install 'psycopg[binary]'")
    server = PrivatePostgres(Path(f"/tmp/llmtune-faults-pg-{uuid.uuid4().hex[:8]}"))
    try:
        yield server
    finally:
        server.close()


def _search_on(pg: PrivatePostgres, tmp_path: Path, n_trials: int, grace: int) -> tuple[subprocess.Popen, Path]:
    data = fast_recipe(tmp_path, study={"n_trials": n_trials, "sampler": "random", "trial_timeout": 300})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    log = tmp_path / "search.log"
    proc = subprocess.Popen([sys.executable, "-m", "llmtune.cli", "search", str(tmp_path / "recipe.yaml"),
                             "--storage", pg.url, "--quiet"],
                            env=_env(LLMTUNE_HEARTBEAT_INTERVAL="1", LLMTUNE_HEARTBEAT_GRACE=str(grace)),
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    return proc, log


def _wait_for_a_running_trial(proc: subprocess.Popen, tmp_path: Path, log: Path) -> None:
    deadline = time.time() + 240
    while not list((tmp_path / "run" / "trials").glob("*/spec.json")):
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"no trial started: {log.read_text()}")
        time.sleep(0.2)


def test_a_postgres_restart_mid_search_loses_nothing_and_prints_no_traceback(tmp_path, tiny_assets, private_pg):
    """The server stops while a trial trains and starts again ~4 s later: the search waits for it, carries on
    and ends with every trial complete, none lost or retried, and no traceback."""
    proc, log = _search_on(private_pg, tmp_path, n_trials=2, grace=60)
    _wait_for_a_running_trial(proc, tmp_path, log)
    private_pg.stop()  # every pooled connection dies with the server
    time.sleep(4)
    private_pg.start()
    assert proc.wait(timeout=400) == 0, log.read_text()
    out = log.read_text()
    assert "Traceback" not in out and "exceeding max length" not in out, out
    assert "lost the study storage" in out and "the study storage is back after" in out, out
    assert private_pg.password not in out
    study = optuna.load_study(study_name="test", storage=open_storage(private_pg.url))
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, [(t.state, t.user_attrs.get(STATUS)) for t in trials]
    assert all(t.user_attrs[STATUS] == "complete" for t in trials)
    back = float(out.split("the study storage is back after ")[1].split("s")[0])
    print(f"storage back after {back:.1f}s of a ~4s outage")  # measured: reported by the search itself


def test_a_storage_gone_longer_than_the_grace_ends_the_search_with_one_message(tmp_path, tiny_assets, private_pg):
    """The server stays away past the heartbeat grace (6 s): one error line naming the storage (masked), exit 1,
    no traceback, soon after the grace."""
    proc, log = _search_on(private_pg, tmp_path, n_trials=2, grace=6)
    _wait_for_a_running_trial(proc, tmp_path, log)
    private_pg.stop()
    stopped = time.time()
    code = proc.wait(timeout=120)
    took = time.time() - stopped
    out = log.read_text()
    assert code == 1 and "Traceback" not in out, out
    print(f"search ended {took:.1f}s after the server stopped (grace 6s)")
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lost the study storage" in errors[0] and "(6s)" in errors[0], out
    assert private_pg.password not in out and "llmtune:***@127.0.0.1" in errors[0]
    assert took < 60, took
    private_pg.start()  # the trial it ran is found lost, as any lost trial is, and retried on the next start
    trials = optuna.load_study(study_name="test", storage=open_storage(private_pg.url)).get_trials()
    assert not [t for t in trials if t.state == TrialState.COMPLETE]


# -- 3, 12, 14: what a finished search delivers -------------------------------------------------------------


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_model_path, tiny_data_path):
    import llmtune

    tmp = tmp_path_factory.mktemp("faults-search")
    data = fast_recipe(tmp, search={**fast_recipe(tmp)["search"], "lora_r": [2, 8]},
                       study={"n_trials": 2, "sampler": "grid", "trial_timeout": 300})
    result = llmtune.search(data)
    assert result.best is not None
    return result


def test_export_never_deletes_a_folder_it_did_not_write_nor_a_file_a_user_added(searched, tmp_path):
    from llmtune import HubError, export_adapter

    # a folder that merely holds a file named llmtune.json is not an export: refused, untouched
    project = tmp_path / "project"
    project.mkdir()
    (project / "llmtune.json").write_text('{"my": "settings"}')
    (project / "notes.txt").write_text("mine")
    with pytest.raises(HubError, match="is not empty and not an llmtune export .* nothing was written or removed"):
        export_adapter(searched, project)
    assert sorted(p.name for p in project.iterdir()) == ["llmtune.json", "notes.txt"]
    assert (project / "llmtune.json").read_text() == '{"my": "settings"}'

    # an export lists what it wrote; a re-export replaces those files and nothing else
    out = tmp_path / "exp"
    first = export_adapter(searched, out, trial=0)
    manifest = json.loads((out / "llmtune.json").read_text())
    assert sorted(manifest["files"]) == sorted(first.files) and "llmtune.json" in first.files
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(first.files)
    (out / "my-eval.txt").write_text("a user's notes")
    (out / "results").mkdir()
    (out / "results" / "scores.csv").write_text("1,2")
    second = export_adapter(searched, out, trial=1)
    assert (out / "my-eval.txt").read_text() == "a user's notes"
    assert (out / "results" / "scores.csv").read_text() == "1,2"
    assert json.loads((out / "llmtune.json").read_text())["trial"] == 1
    assert "my-eval.txt" not in second.files and "results/scores.csv" not in second.files  # push uploads only these
    # the manifest never reaches outside the folder
    listed = json.loads((out / "llmtune.json").read_text())
    listed["files"].append("../outside.txt")
    (out / "llmtune.json").write_text(json.dumps(listed))
    (tmp_path / "outside.txt").write_text("keep")
    export_adapter(searched, out, trial=1)
    assert (tmp_path / "outside.txt").read_text() == "keep"


def test_the_card_code_runs_offline_where_the_export_is(searched, tmp_path):
    from llmtune import export_adapter
    from llmtune.deliver.modelcard import read_card, usage_code

    out = export_adapter(searched, tmp_path / "exp").path
    _, body = read_card(out / "README.md")
    code = body.split("## Use it\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "resolve_model_name('llmtune/tiny')" in code
    code += "\nimport torch\nprint('logits', tuple(model(torch.tensor([[1, 2, 3]])).logits.shape))\n"
    run = subprocess.run([sys.executable, "-c", code], cwd=out, capture_output=True, text=True, timeout=300,
                         env=_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    assert run.returncode == 0 and "logits (1, 3," in run.stdout, run.stderr[-2000:]
    # the other built-in base and a Hub base: loaded by llmtune, and by name
    assert "resolve_model_name('llmtune/smollm2-135m')" in usage_code("llmtune/smollm2-135m", None, True)
    hub = usage_code("Qwen/Qwen2.5-0.5B", "alice/x", False)
    assert "base_path = 'Qwen/Qwen2.5-0.5B'" in hub and "adapter = 'alice/x'" in hub and "llmtune" not in hub


def test_card_and_summary_count_trials_not_retries(searched, tmp_path):
    from llmtune.deliver.modelcard import render_card
    from llmtune.deliver.results import load_results
    from llmtune.study import record

    url = f"sqlite:///{tmp_path / 'copy.db'}"
    src = f"sqlite:///{Path(searched.recipe.output_dir).resolve() / 'study.db'}"
    optuna.copy_study(from_study_name="test", from_storage=src, to_storage=url, to_study_name="test")
    study = optuna.load_study(study_name="test", storage=url)
    for _ in range(3):  # an interrupted try, its retry waiting: not trials of their own
        trial = study.ask()
        trial.suggest_categorical("lora_r", [2, 8])
        record.lost(study, trial._trial_id, "test: its worker died")
    result = load_results(url)
    assert result.counted_trials == 2 and len(result.all_trials) > 5
    card = render_card(result, result.best)
    assert f"## Pareto front ({len(result.pareto_front)} of 2 trials)" in card


def test_export_push_and_report_read_llmtune_storage_as_search_does(searched, tmp_path, monkeypatch, capfd):
    from llmtune.cli import main

    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    src = f"sqlite:///{Path(searched.recipe.output_dir).resolve() / 'study.db'}"
    optuna.copy_study(from_study_name="test", from_storage=src, to_storage=url, to_study_name="shared")
    folder = tmp_path / "runs"  # a search's folder whose study lives in LLMTUNE_STORAGE
    folder.mkdir()
    monkeypatch.setenv("LLMTUNE_STORAGE", url)
    assert main(["export", str(folder), "--output-dir", str(tmp_path / "x")]) == 0
    assert json.loads((tmp_path / "x" / "llmtune.json").read_text())["study"] == "shared"
    assert main(["push", str(folder), "--repo-id", "alice/x", "--dry-run", "--output-dir", str(tmp_path / "p")]) == 0
    assert main(["report", str(folder), "--output-dir", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "trials.csv").exists()
    capfd.readouterr()
    monkeypatch.delenv("LLMTUNE_STORAGE")
    assert main(["report", str(folder), "--output-dir", str(tmp_path / "r2")]) == 2  # without it: no study there
    assert "holds no study.db" in capfd.readouterr().err


def test_reading_a_data_file_writes_its_cache_under_llmtune_home(tmp_path, monkeypatch):
    import datasets

    from llmtune.builtin.cache import llmtune_home
    from llmtune.harness.data_sources import _read_with_datasets

    monkeypatch.setenv("LLMTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    default = Path(datasets.config.HF_DATASETS_CACHE)
    before = set(default.rglob("*")) if default.exists() else set()
    path = tmp_path / "rows.csv"
    path.write_text("text\nhello there\ngeneral kenobi\n")
    rows = _read_with_datasets(path, "csv", "data.source")
    assert [r["text"] for r in rows] == ["hello there", "general kenobi"]
    assert any((llmtune_home() / "datasets").rglob("*.arrow"))
    assert (set(default.rglob("*")) if default.exists() else set()) == before


# -- 12: the fork server and its parent ------------------------------------------------------------------

PARENT = r'''
import sys, time
from llmtune.trial.fork_server import prewarm
server = prewarm()
print(server.proc.pid, flush=True)
time.sleep(600)
'''


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state  # exited; its new parent has not reaped it yet


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server runs on Linux only")
def test_a_fork_server_exits_promptly_when_its_parent_dies_before_the_first_trial(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT], env=_env(LLMTUNE_FORK_SERVER="1"),
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    server = int(parent.stdout.readline())
    time.sleep(0.5)  # it is importing torch & co. now (seconds)
    assert not _gone(server)
    parent.kill()
    parent.wait()
    killed = time.time()
    while not _gone(server) and time.time() - killed < 10:
        time.sleep(0.05)
    took = time.time() - killed
    assert _gone(server) and took < 3, f"the fork server outlived its parent by {took:.1f}s"  # importing takes longer
    print(f"fork server gone {took:.2f}s after its parent")


def test_causes_walks_an_error_chain_once_even_through_a_cycle():
    import sqlalchemy.exc

    from llmtune.study.outages import causes, dropped

    root = sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionResetError("server closed the connection"))
    try:
        try:
            raise root
        except sqlalchemy.exc.OperationalError as e:
            raise RuntimeError("StorageInternalError: the data is broken") from e
    except RuntimeError as wrapped:
        outer = wrapped
    assert list(causes(outer)) == [outer, root]
    assert dropped(outer) is root and dropped(RuntimeError("a refused statement")) is None
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a  # a cycle ends the walk
    assert list(causes(a)) == [a, b]
