"""Optuna behind one door (llmtune/study/engine.py): a canary that fails loudly when Optuna moves a private
name llmtune relies on, and a check that nothing else in the package touches one."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import optuna
import pytest

from llmtune.study import engine

PACKAGE = Path(__file__).resolve().parents[1] / "llmtune"


def _resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return importlib.import_module(dotted)


@pytest.mark.parametrize("owner, name", engine.PRIVATE_NAMES, ids=[f"{o}.{n}" for o, n in engine.PRIVATE_NAMES])
def test_private_name_still_exists(owner, name, tmp_path):
    """Each private name, on a real object where it is an instance attribute."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=60)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    instances = {"optuna.study.Study": study, "optuna.trial.Trial": trial,
                 "optuna.trial.FrozenTrial": study.trials[0], "optuna.storages._CachedStorage": study._storage}
    target = instances.get(owner) or _resolve(owner)
    assert hasattr(target, name), (f"Optuna {optuna.__version__} moved {owner}.{name}: update llmtune/study/engine.py "
                                   "and the optuna range in pyproject.toml")


def test_engine_functions_on_a_real_study(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage)
    study.enqueue_trial({"x": 1.0})
    queued, fresh = study.ask(), study.ask()
    assert engine.is_queued(queued) and not engine.is_queued(fresh)
    storage.set_trial_user_attr(engine.trial_id(queued), "k", 1)
    assert engine.frozen(study, queued).user_attrs == {"k": 1} and engine.frozen(study, queued).number == queued.number
    assert engine.trial_id(fresh) == study.trials[1]._trial_id == engine.trial_id(study.trials[1])
    assert engine.study_id(study) == storage.get_study_id_from_name(study.study_name)
    assert engine.heartbeat_enabled(study) and engine.grace_period(study) == 2
    assert isinstance(engine.uncached(study), optuna.storages.RDBStorage)
    engine.record_heartbeat(study, queued)
    assert engine.stale_trial_ids(study) == []  # fresh never beat: Optuna only counts trials that did
    storage.set_trial_state_values(engine.trial_id(fresh), optuna.trial.TrialState.FAIL)
    import time

    time.sleep(3.1)
    assert engine.stale_trial_ids(study) == [engine.trial_id(queued)]
    memory = optuna.create_study()
    assert not engine.heartbeat_enabled(memory) and engine.grace_period(memory) is None


PRIVATE = re.compile(r"\._storage\b|\._trial_id\b|\._study_id\b|_cached_frozen_trial|\._backend\b|"
                     r"_get_stale_trial_ids|optuna\.storages\._|optuna\.[a-z_.]*\._[a-z]")


def test_no_private_optuna_name_outside_the_engine():
    found = [f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
             for path in sorted(PACKAGE.rglob("*.py")) if path.name != "engine.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if PRIVATE.search(line)]
    assert not found, "private Optuna names belong in llmtune/study/engine.py:\n" + "\n".join(found)


def test_pinned_optuna_range_holds_the_installed_one():
    import tomllib
    from packaging.requirements import Requirement

    deps = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    optuna_req = next(Requirement(d) for d in deps if Requirement(d).name == "optuna")
    assert any(s.operator == "<" for s in optuna_req.specifier), "pin an upper bound: Optuna's private names move"
    assert optuna_req.specifier.contains(optuna.__version__)
