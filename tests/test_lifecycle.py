"""One trial lifecycle: the ending decided once (trial/endings.decide), recorded once (study/record), by one
loop (study/loop.Search) that asks a strategy (study/strategy.py) what to run. No training here: the loop
runs fake strategies, the recorder real Optuna storages."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import optuna
import pytest
from conftest import tiny_recipe_dict

from llmtune.errors import LlmtuneError
from llmtune.study import engine, record
from llmtune.study.attrs import RETRY_OF, STATUS
from llmtune.study.strategy import Claim, Job, Strategy
from llmtune.trial import endings
from llmtune.trial.endings import (
    COMPLETE,
    CRASHED,
    ENVIRONMENT,
    INTERRUPTED,
    KILLED,
    SEGMENT,
    SURPLUS,
    SegmentEnd,
    decide,
)
from llmtune.trial.result import TrialResult

OBJECTIVES = ["eval_loss", "peak_memory_gb"]


# -- the one decision ------------------------------------------------------------------------------
def test_decide_keeps_a_measured_complete_and_drops_non_finite_metrics():
    r = decide(TrialResult(COMPLETE, metrics={"eval_loss": 1.0, "peak_memory_gb": 2.0, "x": float("nan")}), OBJECTIVES)
    assert r.status == COMPLETE and r.metrics == {"eval_loss": 1.0, "peak_memory_gb": 2.0}


def test_decide_a_missing_objective_is_a_crash_naming_it():
    r = decide(TrialResult(COMPLETE, metrics={"eval_loss": float("inf"), "peak_memory_gb": 2.0}), OBJECTIVES)
    assert r.status == CRASHED and "eval_loss" in r.reason


@pytest.mark.parametrize("status, limit", [(KILLED, 1)])
def test_decide_retried_endings_become_final_at_their_limit(status, limit):
    assert decide(TrialResult(status, "x"), OBJECTIVES, earlier=lambda s: limit - 1).status == status
    final = decide(TrialResult(status, "x"), OBJECTIVES, earlier=lambda s: limit)
    assert final.status == CRASHED and f"{limit} time(s) before: final" in final.reason


def test_decide_an_environment_failure_is_never_final():  # a full disk is not the configuration's fault
    assert decide(TrialResult(ENVIRONMENT, "x"), OBJECTIVES, earlier=lambda s: 100).status == ENVIRONMENT


def test_decide_interrupted_is_retried_without_limit():
    assert decide(TrialResult(INTERRUPTED), OBJECTIVES, earlier=lambda s: 100).status == INTERRUPTED


def test_decide_pbt_segments():
    done = {"eval_loss": 1.0, "peak_memory_gb": 2.0}
    middle = SegmentEnd(member=0, index=0, count=3, state_dir="/s", saved=True)
    assert decide(TrialResult(COMPLETE, metrics=dict(done)), OBJECTIVES, segment=middle).status == SEGMENT
    last = SegmentEnd(member=0, index=2, count=3, state_dir="/s", saved=True)
    assert decide(TrialResult(COMPLETE, metrics=dict(done)), OBJECTIVES, segment=last).status == COMPLETE
    unsaved = SegmentEnd(member=0, index=0, count=3, state_dir="/s", saved=False)
    r = decide(TrialResult(COMPLETE, metrics=dict(done)), OBJECTIVES, segment=unsaved)
    assert r.status == CRASHED and "/s" in r.reason


# -- the one recorder ------------------------------------------------------------------------------
@pytest.fixture()
def recipe(tmp_path):
    from llmtune.config.recipe import recipe_from_dict

    return recipe_from_dict(tiny_recipe_dict(tmp_path, search={"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}))


def _study(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    return optuna.create_study(storage=storage, directions=["minimize", "minimize"])


def test_tell_records_the_decided_ending_and_requeues_retried_ones(tmp_path, recipe):
    study = _study(tmp_path)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    told = record.tell(study, trial, recipe, TrialResult(COMPLETE, metrics={"eval_loss": 1.5}))
    frozen = study.trials[0]
    assert told.status == CRASHED and frozen.user_attrs[STATUS] == CRASHED
    assert frozen.state == optuna.trial.TrialState.FAIL and len(study.trials) == 1  # crashed: not retried

    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    record.tell(study, trial, recipe, TrialResult(KILLED, "sigkill"))
    retry = study.trials[-1]
    assert retry.state == optuna.trial.TrialState.WAITING and retry.user_attrs[RETRY_OF] == trial.number
    again = study.ask()  # the retry; killed a second time is final
    assert again.number == retry.number
    assert record.tell(study, again, recipe, TrialResult(KILLED, "sigkill")).status == CRASHED
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]


def test_give_up_returns_a_queued_trial_and_ends_a_fresh_one_surplus(tmp_path):
    study = _study(tmp_path)
    study.enqueue_trial({"x": 0.5})
    queued, fresh = study.ask(), study.ask()
    record.give_up(study, queued, "busy")
    record.give_up(study, fresh, "another worker took the last of n_trials")
    by = {t.number: t for t in study.trials}
    assert by[queued.number].state == optuna.trial.TrialState.WAITING
    assert by[fresh.number].state == optuna.trial.TrialState.FAIL and by[fresh.number].user_attrs[STATUS] == SURPLUS


def test_a_lost_trial_is_retried_exactly_once_by_racing_workers(pg_url):
    """Four workers (each with its own connection, as processes have) find one lost trial at once: the
    database's row lock lets exactly one fail it and queue the retry. (SQLite takes no row lock: there
    one process's threads are serialised by the loop's lock, and two processes on one SQLite file may
    each queue a retry: docs/scaling.md.)"""
    from llmtune.study.storage import open_storage

    name = f"lost-{time.time_ns()}"
    study = optuna.create_study(storage=open_storage(pg_url), study_name=name)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    tid = engine.trial_id(trial)
    workers = [optuna.load_study(study_name=name, storage=open_storage(pg_url)) for _ in range(4)]
    results: list[bool] = []
    threads = [threading.Thread(target=lambda w=w: results.append(record.lost(w, tid, "no heartbeat"))) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert study.trials[0].user_attrs[STATUS] == INTERRUPTED
    assert [t.user_attrs.get(RETRY_OF) for t in study.trials[1:]] == [trial.number]
    optuna.delete_study(study_name=name, storage=open_storage(pg_url))


def test_one_process_at_a_time_holds_the_plot_lease(tmp_path):
    study = _study(tmp_path)
    assert record.take_plot_lease(study, "a") and record.take_plot_lease(study, "a")
    assert not record.take_plot_lease(study, "b")
    assert record.take_plot_lease(study, "b", lease_s=0.0)  # expired: b takes it
    assert not record.take_plot_lease(study, "a")


def test_the_recorder_neither_sleeps_nor_draws(monkeypatch, tmp_path, recipe):
    """Back-off is the loop's and figures are redrawn by the loop: `tell` of an environment ending returns at once."""
    study = _study(tmp_path)
    monkeypatch.setattr(time, "sleep", lambda s: pytest.fail("record.tell slept"))
    monkeypatch.setattr(record, "save_curves_plot", lambda s: pytest.fail("record.tell drew"))
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    assert record.tell(study, trial, recipe, TrialResult(ENVIRONMENT, "disk full")).status == ENVIRONMENT
    assert record.environment_wait(study, study.trials[-1]) > 0


# -- the one loop, with fake strategies ---------------------------------------------------------------
class Fake(Strategy):
    """Runs nothing: every trial 'trains' to a loss set by its number."""

    def __init__(self, recipe, statuses=None):
        super().__init__(recipe)
        self.ran: list[int] = []
        self.after_told: list[str] = []
        self.statuses = statuses or {}

    def run(self, search, job: Job) -> TrialResult:
        self.ran.append(job.trial.number)
        status = self.statuses.get(job.trial.number, COMPLETE)
        return TrialResult(status, "fake", metrics={"eval_loss": 1.0 + job.trial.number, "peak_memory_gb": 1.0})

    def after(self, search, job, result):
        self.after_told.append(result.status)


def _search(recipe, strategy, **kw):
    from llmtune.study.loop import Search

    return Search(recipe, strategy=strategy, data_fingerprint="fake", log=lambda m: None, **kw)


@pytest.fixture()
def no_fork_server(monkeypatch, tiny_model_path, tiny_data_path):
    monkeypatch.setattr("llmtune.study.loop.prewarm", lambda: None)


def test_the_loop_runs_n_trials_through_one_recorder(tmp_path, recipe, no_fork_server):
    fake = Fake(recipe, statuses={1: KILLED})
    study = _search(recipe, fake, n_trials=3, workers=2).run()
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3 and fake.after_told.count(KILLED) == 1
    killed = next(t for t in study.trials if t.user_attrs.get(STATUS) == KILLED)
    assert any(t.user_attrs.get(RETRY_OF) == killed.number for t in done)  # the retry ran, outside n_trials
    assert all(STATUS in t.user_attrs for t in study.trials)


def test_a_strategy_that_declines_leaves_its_trial_surplus(tmp_path, recipe, no_fork_server):
    class Picky(Fake):
        def claim(self, search, trial):
            return Claim(False, "not mine", surplus=True) if trial.number == 0 else super().claim(search, trial)

    picky = Picky(recipe)
    study = _search(recipe, picky, n_trials=2).run()
    assert study.trials[0].user_attrs[STATUS] == SURPLUS and 0 not in picky.ran
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 2


def test_the_loop_stops_fast_on_one_repeated_crash(tmp_path, recipe, no_fork_server):
    from llmtune.errors import SearchError

    fake = Fake(recipe, statuses={n: CRASHED for n in range(10)})
    with pytest.raises(SearchError, match="all crashed with the same reason"):
        _search(recipe, fake, n_trials=8).run()
    assert len(fake.ran) < 8


# -- imports and errors ---------------------------------------------------------------------------
def test_importing_a_leaf_module_loads_no_optuna():
    code = "import sys, llmtune.trial.endings; print(sorted(m for m in ('optuna', 'torch', 'sqlalchemy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
    assert endings.COMPLETE == "complete"


@pytest.mark.parametrize("kwargs, named", [({"quantization": "nf4"}, "quantization"), ({"lora_r": 0}, "lora_r"),
                                          ({"dtype": "fp8"}, "dtype")])
def test_estimate_memory_refuses_bad_arguments_as_llmtune_errors(kwargs, named):
    from llmtune import estimate_memory

    with pytest.raises(LlmtuneError, match=named):
        estimate_memory("llmtune/tiny", **kwargs)


def test_estimate_memory_names_an_unknown_model():
    from llmtune import estimate_memory

    with pytest.raises(LlmtuneError, match="no-such/model"):
        estimate_memory("no-such/model")


@pytest.mark.parametrize("model, kwargs, named", [(42, {}, "model"), ("llmtune/tiny", {"device": "tpu"}, "device"),
                                                  ("llmtune/tiny", {"lora_target_modules": ["nonsense"]}, "lora_target_modules")])
def test_estimate_memory_names_every_other_bad_argument(model, kwargs, named):
    from llmtune import estimate_memory

    with pytest.raises(LlmtuneError, match=named):
        estimate_memory(model, **kwargs)


def test_a_lost_trial_holds_its_slot_until_its_retry_is_queued():
    """Failing a lost trial and queueing its retry are two writes: a worker counting in between must not see a
    free slot (it would start a fresh trial, and the lost configuration would never run once n_trials is met)."""
    from optuna.trial import TrialState, create_trial

    from llmtune.study.attrs import RETRY_OF, STATUS
    from llmtune.study.storage import counted

    study = optuna.create_study()
    study.add_trial(create_trial(state=TrialState.FAIL, params={}, distributions={}, user_attrs={STATUS: "interrupted"}))
    assert counted(study) == (0, 1)  # failed a moment ago, its retry not queued yet: still holds its slot
    study.enqueue_trial({}, user_attrs={RETRY_OF: 0})
    assert counted(study) == (0, 0)  # the queued retry takes it from here (the next ask runs it first)
    study.add_trial(create_trial(state=TrialState.FAIL, params={}, distributions={}, user_attrs={STATUS: "crashed"}))
    assert counted(study) == (1, 0)  # a final ending counts as done
