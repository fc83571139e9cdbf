"""Population-based training: segments of a run resume bit for bit, exploit copies state exactly, explore
changes only the settings it may, the study keeps each segment's lineage, kill + resume, two workers."""

from __future__ import annotations

import torch
from conftest import resumable_recipe, tiny_recipe_dict

from llmtune.config.recipe import recipe_from_dict
from llmtune.harness.resume import STATE_FILE
from llmtune.harness.train import run_trial

SCHEDULE = [{"until": 0.5, "values": {"learning_rate": 2e-3, "lora_dropout": 0.1}},
            {"until": 1.0, "values": {"learning_rate": 8e-4, "lora_dropout": 0.3}}]




def _state(path):
    return torch.load(path / STATE_FILE, weights_only=True)


def _same_state(a, b) -> bool:
    if a["lora"].keys() != b["lora"].keys() or not all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"]):
        return False
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k])


def test_segments_resume_bit_for_bit_and_a_copy_continues_like_the_original(tmp_path, tiny_model_path, tiny_data_path):
    """One run with a schedule == the same schedule cut into two trial runs (state saved, then resumed);
    a second member resumed from the same state (exploit's copy) continues on exactly the same curve."""
    recipe = resumable_recipe(tmp_path)
    values = recipe.space.complete({})
    later = {**values, **SCHEDULE[1]["values"]}
    whole = run_trial(recipe, values, tmp_path / "whole", fractions=[0.5, 1.0],
                      segment={"schedule": SCHEDULE, "save": str(tmp_path / "state-whole")})
    first = run_trial(recipe, values, tmp_path / "first", fractions=[0.5],
                      segment={"schedule": SCHEDULE, "stop": 0.5, "save": str(tmp_path / "s0")})
    second = run_trial(recipe, later, tmp_path / "second", fractions=[1.0],
                       segment={"schedule": SCHEDULE, "start": 0.5, "resume": str(tmp_path / "s0"),
                                "save": str(tmp_path / "s1")})
    copy = run_trial(recipe, later, tmp_path / "copy", fractions=[1.0],
                     segment={"schedule": SCHEDULE, "start": 0.5, "resume": str(tmp_path / "s0"),
                              "save": str(tmp_path / "s1-copy")})
    for r in (whole, first, second, copy):
        assert r.status == "complete", r.reason
    n = len(whole.info["step_losses"])
    assert n == 12 and len(first.info["step_losses"]) == 6
    assert whole.info["step_losses"] == first.info["step_losses"] + second.info["step_losses"]
    assert second.info["step_losses"] == copy.info["step_losses"]
    assert whole.curve == first.curve + second.curve  # eval at 0.5 and at the end, exactly
    assert copy.curve == second.curve
    assert _same_state(_state(tmp_path / "state-whole"), _state(tmp_path / "s1"))
    assert _same_state(_state(tmp_path / "s1"), _state(tmp_path / "s1-copy"))
    assert not (tmp_path / "first" / "adapter").exists() and (tmp_path / "second" / "adapter").is_dir()


def test_a_constant_schedule_is_a_plain_trial(tmp_path, tiny_model_path, tiny_data_path):
    """lr(step) = peak x the scheduler's factor, as torch's LambdaLR computes it: one entry == no schedule."""
    recipe = resumable_recipe(tmp_path)
    values = recipe.space.complete({})
    plain = run_trial(recipe, values, tmp_path / "plain", fractions=[1.0], save_adapter=False)
    one = run_trial(recipe, values, tmp_path / "one", fractions=[1.0], save_adapter=False,
                    segment={"schedule": [{"until": 1.0, "values": {}}]})
    assert plain.status == one.status == "complete"
    assert plain.curve == one.curve


def _pbt_dict(tmp_path, population=3, **study):
    return tiny_recipe_dict(
        tmp_path, train={"budget": {"examples": 96}, "eval_points": 1, "threads": 1}, measure={"latency": False},
        search={"learning_rate": {"low": 5e-4, "high": 5e-3, "log": True}, "lora_r": [4, 8], "sequence_len": 128,
                "micro_batch_size": 8, "lora_dropout": {"low": 0.0, "high": 0.2}},
        study={"strategy": "pbt", "pbt_settings": {"population": population, "interval": 0.5, "quantile": 0.34},
               "trial_timeout": 300, **study})


# -- rules: validation, ranking, exploit and explore (no training) -------------------------------------------------

def test_pbt_settings_are_checked_with_the_recipe(tmp_path):
    from llmtune.errors import RecipeError

    d = _pbt_dict(tmp_path, pruner="asha")
    d["study"]["pbt_settings"] = {"populaton": 4, "interval": 0.7, "quantile": 0.9, "perturb": ["lora_r"],
                                  "checkpoint_dir": "s3://bucket/pbt"}
    try:
        recipe_from_dict(d)
        raise AssertionError("accepted")
    except RecipeError as e:
        text = str(e)
    for expected in ("pbt_settings.populaton: unknown setting; did you mean 'population'?",
                     "pbt_settings.interval: 0.7 must be a fraction of the budget in (0, 0.5]",
                     "pbt_settings.quantile: 0.9 must be in (0, 0.5]",
                     "pbt_settings.perturb: 'lora_r' cannot change during training",
                     "object storage URLs are not supported", "study.pruner: 'asha': population-based training "):
        assert expected in text, text
    short = _pbt_dict(tmp_path)
    short["train"]["budget"] = {"examples": 8}
    try:
        recipe_from_dict(short)
        raise AssertionError("accepted")
    except RecipeError as e:
        assert "0.5 cuts a trial into 2 segments, but it has only 1 optimizer step(s)" in str(e), str(e)
    fixed = _pbt_dict(tmp_path)
    fixed["search"].update(learning_rate=1e-3, lora_dropout=0.1)
    try:
        recipe_from_dict(fixed)
        raise AssertionError("accepted")
    except RecipeError as e:
        assert "needs at least one of learning_rate, lora_dropout, warmup_ratio, warmup_steps searched" in str(e)


def test_explore_changes_only_the_settings_it_may_and_exploit_copies_the_best(tmp_path):
    import random

    from llmtune.config.pbt_settings import pbt_settings
    from llmtune.study.pbt_plan import Member, explore, next_generation, rank

    recipe = recipe_from_dict(_pbt_dict(tmp_path))
    settings, space = pbt_settings(recipe), recipe.space
    assert settings.perturb == ("learning_rate", "lora_dropout") and settings.bounds == [0.5, 1.0]
    rng = random.Random(0)
    params = {"learning_rate": 1e-3, "lora_r": 8, "lora_dropout": 0.1}
    changed = set()
    for _ in range(200):
        new = explore(params, settings, space, rng)
        assert new["lora_r"] == 8  # shapes the adapter: copied, never perturbed
        assert 5e-4 <= new["learning_rate"] <= 5e-3 and 0.0 <= new["lora_dropout"] <= 0.2
        changed |= {k for k in params if new[k] != params[k]}
    assert changed == {"learning_rate", "lora_dropout"}
    choices = _pbt_dict(tmp_path)
    choices["search"]["learning_rate"] = [1e-4, 3e-4, 1e-3, 3e-3]
    choice_recipe = recipe_from_dict(choices)
    steps = {explore(params, pbt_settings(choice_recipe), choice_recipe.space, rng)["learning_rate"] for _ in range(100)}
    assert {3e-4, 3e-3} <= steps <= {1e-4, 3e-4, 1e-3, 3e-3}  # one step either way, or drawn afresh from the list

    def member(i, loss, memory, alive=True):
        return Member(i, 10 + i, alive, loss, {"peak_memory_gb": memory}, {**params, "lora_r": 4 + i},
                      [{"until": 0.5, "values": {}}], f"m{i}")

    # A is best by loss, B trades loss for memory, C is dominated by A: multi-objective ranking replaces C,
    # ranking by loss alone would replace B
    pop = [member(0, 1.0, 3.0), member(1, 1.2, 1.0), member(2, 1.1, 3.5)]
    both = {"eval_loss": "minimize", "peak_memory_gb": "minimize"}
    assert [m.member for m in rank(pop, both)][-1] == 2
    assert [m.member for m in rank(pop, {"eval_loss": "minimize"})][-1] == 1
    nexts = next_generation(pop, settings, space, both, random.Random(1))
    copy = next(n for n in nexts if n.member == 2)
    assert copy.exploited and copy.source in (0, 1) and copy.resume == f"m{copy.source}"
    assert copy.params["lora_r"] == 4 + copy.source  # the source's shape, with perturbed learning settings
    assert [n.exploited for n in nexts] == [False, False, True]
    # a dead member is always replaced, whatever the quantile
    dead = next_generation([member(0, 1.0, 1.0), member(1, float("nan"), 1.0, alive=False), member(2, 1.1, 1.0)],
                           settings, space, both, random.Random(2))
    assert [n.exploited for n in dead] == [False, True, True]


# -- the search --------------------------------------------------------------------------------------------------

def _segments(study):
    from optuna.trial import TrialState

    from llmtune.study.attrs import LINEAGE

    return {(t.user_attrs[LINEAGE]["member"], t.user_attrs[LINEAGE]["segment"]): t
            for t in study.get_trials() if t.state == TrialState.COMPLETE and LINEAGE in t.user_attrs}


def test_pbt_search_records_lineage_reports_it_and_its_schedule_replays_the_loss(tmp_path, tiny_model_path,
                                                                                tiny_data_path):
    """3 members x 2 segments on two workers: each segment one trial with its lineage; a copy resumes the
    state of the member it copied with only learning rate / dropout changed; report.html has the lineage plot;
    best/schedule.json replayed as one trial gives the chosen trial's eval loss exactly."""
    import json

    import llmtune
    from llmtune.study.attrs import LINEAGE, STATUS

    d = _pbt_dict(tmp_path)
    result = llmtune.search(d, workers=2)
    segments = _segments(result.study)
    assert sorted(segments) == [(m, k) for m in range(3) for k in range(2)]
    assert [segments[(m, 0)].user_attrs[STATUS] for m in range(3)] == ["segment"] * 3
    assert [segments[(m, 1)].user_attrs[STATUS] for m in range(3)] == ["complete"] * 3
    copies = 0
    for m in range(3):
        lineage = segments[(m, 1)].user_attrs[LINEAGE]
        source = segments[(lineage["parent"]["member"], 0)]
        assert lineage["parent"]["trial"] == source.number and lineage["resume"] == source.user_attrs[LINEAGE]["state"]
        assert lineage["schedule"][0] == source.user_attrs[LINEAGE]["schedule"][0]
        changed = {k for k, v in segments[(m, 1)].params.items() if v != source.params[k]}
        if lineage["exploited"]:
            copies += 1
            assert lineage["parent"]["member"] != m and changed <= {"learning_rate", "lora_dropout"}
        else:
            assert lineage["parent"]["member"] == m and not changed
    assert copies == 1  # quantile 0.34 of 3: the worst copies the best
    system = result.study._storage.get_study_system_attrs(result.study._study_id)
    try:  # optuna-dashboard reads the lineage plot back as the figure stored
        from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

        plots = get_plotly_graph_objects(system)
        assert json.loads(plots["llmtune-pbt-lineage"])["layout"]["title"]["text"].endswith("lineage")
    except ImportError:
        assert any(k.startswith("dashboard:plot_data:llmtune-pbt-lineage:") for k in system)
    from llmtune.deliver.lineage import lineage_figure

    figure = lineage_figure(result.study.get_trials(), list(d["objectives"]), result.best.number)
    names = [trace.name for trace in figure.data]
    assert {"continued", "copied (exploit)", f"chosen #{result.best.number}", "segment"} == set(names)
    assert len(figure.data[-1].x) == 6  # a marker per segment
    out = tmp_path / "run"
    assert 'id="plot-lineage"' in (out / "report.html").read_text()
    doc = json.loads((out / "best" / "schedule.json").read_text())
    assert doc["trial"] == result.best.number and len(doc["schedule"]) == 2
    exported = llmtune.export_adapter(out, tmp_path / "export")
    assert json.loads((exported.path / "schedule.json").read_text()) == doc
    replay = llmtune.train(d, schedule=out / "best" / "schedule.json", output_dir=tmp_path / "replay", in_process=True)
    assert replay.status == "complete"
    assert replay.metrics["eval_loss"] == result.best.user_attrs["llmtune.metrics"]["eval_loss"] == doc["eval_loss"]


def test_pbt_killed_and_resumed_by_two_workers_loses_no_finished_segment(tmp_path, tiny_model_path, tiny_data_path):
    """A PBT search is SIGKILLed after its first segment finished, while the next runs; two `llmtune search`
    processes resume it together: the finished segment is kept (not run again), the lost one runs again with
    the same settings, every segment of every member finishes once, and both processes ran segments."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import optuna
    import yaml
    from optuna.trial import TrialState

    from llmtune.study.attrs import LINEAGE, OWNER, STATUS

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(_pbt_dict(tmp_path, population=2)))
    url = f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    logs = {name: tmp_path / f"{name}.log" for name in "abc"}

    # a short heartbeat interval makes an idle worker look for queued segments every ~0.5 s
    env = {**os.environ, "LLMTUNE_HEARTBEAT_INTERVAL": "1", "LLMTUNE_HEARTBEAT_GRACE": "10"}

    def start(name):
        return subprocess.Popen([sys.executable, "-m", "llmtune.cli", "search", str(recipe_path), "--quiet"], env=env,
                                stdout=logs[name].open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def trials():
        try:
            return optuna.load_study(study_name="test", storage=url).get_trials()
        except Exception:  # not created yet
            return []

    doomed = start("a")
    deadline, done_before = time.time() + 120, None
    while time.time() < deadline and done_before is None:
        now = trials()
        if any(t.state == TrialState.COMPLETE for t in now) and any(t.state == TrialState.RUNNING for t in now):
            done_before = {t.number: t.params for t in now if t.state == TrialState.COMPLETE}
        time.sleep(0.2)
    assert done_before, logs["a"].read_text()
    os.killpg(doomed.pid, signal.SIGKILL)  # the search and its fork server, with no goodbye to the database
    doomed.wait()
    survivors = {name: start(name) for name in "bc"}
    for name, p in survivors.items():
        assert p.wait(timeout=300) == 0, logs[name].read_text()

    study = optuna.load_study(study_name="test", storage=url)
    complete = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    keys = [(t.user_attrs[LINEAGE]["member"], t.user_attrs[LINEAGE]["segment"]) for t in complete]
    assert sorted(keys) == [(m, k) for m in range(2) for k in range(2)]  # each segment finished once
    assert set(done_before) <= {t.number for t in complete}  # what finished before the kill was kept
    lost = [t for t in study.get_trials() if t.user_attrs.get(STATUS) == "interrupted"]
    assert lost, "the segment running at the kill was not recorded as interrupted"
    for t in lost:
        rerun = next(c for c in complete if c.user_attrs[LINEAGE]["member"] == t.user_attrs[LINEAGE]["member"]
                     and c.user_attrs[LINEAGE]["segment"] == t.user_attrs[LINEAGE]["segment"])
        assert rerun.number > t.number and (not t.params or rerun.params == t.params)
    for log in (tmp_path / "run" / "trials").glob("*/trial.log"):  # no queued segment ran in both processes
        assert log.read_text().count("trial finished") <= 1, log
    owners = {t.system_attrs[OWNER].rsplit(":", 1)[1] for t in complete if t.number not in done_before}
    assert owners == {str(p.pid) for p in survivors.values()}, owners  # both resumed workers ran segments


def test_a_bad_schedule_file_is_refused_before_training(tmp_path):
    import json

    import pytest

    import llmtune
    from llmtune.errors import RecipeError

    d = _pbt_dict(tmp_path)
    bad = tmp_path / "schedule.json"
    cases = [("{not json", "is not JSON"), (json.dumps({"schedule": []}), "is not a llmtune schedule"),
             (json.dumps({"format": "llmtune.schedule/1", "settings": {},
                          "schedule": [{"until": 0.5, "values": {"lora_r": 4}}]}),
              "lora_r cannot change per segment")]
    for text, expected in cases:
        bad.write_text(text)
        with pytest.raises(RecipeError, match=expected):
            llmtune.train(d, schedule=bad, output_dir=tmp_path / "t", in_process=True)
    with pytest.raises(RecipeError, match="cannot read"):
        llmtune.train(d, schedule=tmp_path / "missing.json", in_process=True)


def test_pbt_on_postgres_two_workers(tmp_path, tiny_model_path, tiny_data_path, pg_url):
    """The same search on a PostgreSQL study (skips without LLMTUNE_TEST_POSTGRES_URL): two workers share
    the queue of segments; every segment of every member finishes once, with its lineage."""
    import uuid

    import llmtune

    result = llmtune.search(_pbt_dict(tmp_path, population=2), storage=pg_url, study_name=f"pbt-{uuid.uuid4().hex[:8]}",
                            workers=2)
    segments = _segments(result.study)
    assert sorted(segments) == [(m, k) for m in range(2) for k in range(2)]
    assert sum(t.user_attrs["llmtune.pbt.lineage"]["exploited"] for t in segments.values()) == 1
    assert (tmp_path / "run" / "best" / "schedule.json").is_file()
