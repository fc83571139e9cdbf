"""End-to-end searches on the tiny model: real trials in child processes, real SQLite storage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import tiny_recipe_dict

import llmtune
from llmtune.config.recipe import recipe_from_dict
from llmtune.deliver.front import dominates

FAST = {
    "data": {"source": "llmtune/tiny-tasks", "eval_max_length": 128, "max_eval_examples": 16, "max_train_examples": 200},
    "train": {"budget": {"examples": 32}, "eval_points": 1},
    "measure": {"latency_prompts": 1, "max_new_tokens": 2},
}


def fast_recipe(tmp_path: Path, **sections) -> dict:
    return tiny_recipe_dict(tmp_path, **{**FAST, **sections})


@pytest.fixture(autouse=True)
def _tiny_assets(tiny_model_path, tiny_data_path):
    """Build the tiny model once before any search starts trial processes."""


def test_multi_objective_search_records_oom_as_infeasible_and_finds_the_front(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMTUNE_FAULT", "oom@1")
    data = fast_recipe(tmp_path, search={**tiny_recipe_dict(tmp_path)["search"], "lora_r": [2, 4, 16]},
                       objectives={"eval_loss": "minimize", "trainable_params": "minimize", "peak_memory_gb": "minimize"},
                       study={"n_trials": 4, "sampler": "random", "trial_timeout": 300})
    result = llmtune.search(data)
    df = result.trials
    assert len(df) == 4 and set(df["trial"]) == {0, 1, 2, 3}
    oom = df[df.trial == 1].iloc[0]
    assert oom["status"] == "oom" and "out of memory" in oom["reason"] and not oom["feasible"]
    trial1 = result.study.trials[1]
    assert trial1.state == optuna.trial.TrialState.COMPLETE and trial1.user_attrs["llmtune.constraints"]["infeasible"] > 0
    # The front is exactly the non-dominated feasible trials of the recorded metrics.
    done = [t for t in result.study.trials if t.user_attrs["llmtune.status"] == "complete"]
    assert len(done) == 3
    expected = {t.number for t in done if not any(dominates(o.values, t.values, result.directions) for o in done if o is not t)}
    assert {t.number for t in result.pareto_front} == expected
    for t in done:
        metrics = t.user_attrs["llmtune.metrics"]
        assert t.values == [metrics[m] for m in result.objectives]
    assert set(result.objectives) == {"eval_loss", "trainable_params", "peak_memory_gb"}
    # Outputs: the chosen adapter, the table, the report with its plots.
    out = Path(data["output_dir"])
    assert result.best.number in expected
    assert (out / "best" / "adapter" / "adapter_config.json").exists()
    assert len((out / "trials.csv").read_text().splitlines()) == 5
    html = (out / "report.html").read_text()
    assert "Pareto" in html and "plotly" in html.lower()
    # The chosen adapter loads with peft on the tiny base and generates.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmtune.builtin.tiny import ensure_tiny_model

    base = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(log=None))
    tok = AutoTokenizer.from_pretrained(ensure_tiny_model(log=None))
    model = PeftModel.from_pretrained(base, out / "best" / "adapter")
    ids = tok("### Instruction:\nSort the numbers.\n\n### Input:\n3 1 2\n\n### Response:\n", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert ids.shape[1] < gen.shape[1] <= ids.shape[1] + 4  # it generates (and may stop at EOS)
    # load_results reads the same study back.
    again = llmtune.load_results(out)
    assert {t.number for t in again.pareto_front} == expected and again.best.number == result.best.number


def test_a_hanging_trial_is_killed_at_its_timeout(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMTUNE_FAULT", "hang@0")
    data = fast_recipe(tmp_path, search={**tiny_recipe_dict(tmp_path)["search"], "lora_r": [4, 8]},
                       study={"n_trials": 2, "sampler": "grid", "trial_timeout": 45})
    started = time.time()
    result = llmtune.search(data)
    df = result.trials.set_index("trial")
    assert df.loc[0, "status"] == "timeout" and "trial_timeout" in df.loc[0, "reason"]
    assert df.loc[1, "status"] == "complete"
    assert time.time() - started < 45 + 120
    assert result.best.number == 1


def test_constraint_is_never_violated_by_the_chosen_trial(tmp_path):
    data = fast_recipe(tmp_path, search={**tiny_recipe_dict(tmp_path)["search"], "lora_r": [2, 32]},
                       constraints={"trainable_params": {"max": 20000}},
                       study={"n_trials": 2, "sampler": "grid", "trial_timeout": 300})
    result = llmtune.search(data)
    by_rank = {t.params["lora_r"]: t for t in result.study.trials}
    assert set(by_rank) == {2, 32}
    big = by_rank[32]
    assert big.user_attrs["llmtune.metrics"]["trainable_params"] > 20000 and big.user_attrs["llmtune.constraints"]["trainable_params"] > 0
    assert [t.number for t in result.pareto_front] == [by_rank[2].number]
    assert result.best.params["lora_r"] == 2


def _trial_dirs_with_results(out: Path) -> set[str]:
    return {p.parent.name for p in (out / "trials").glob("*/result.json")}


def test_killed_search_resumes_without_losing_or_rerunning_trials(tmp_path):
    data = fast_recipe(tmp_path, study={"n_trials": 3, "sampler": "random", "trial_timeout": 300})
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(data))
    out = Path(data["output_dir"])
    cmd = [sys.executable, "-m", "llmtune.cli", "search", str(recipe_path), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    # Kill the whole search (parent and its trial process) while trial 1 runs.
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "trials" / "0001" / "spec.json").exists():
        time.sleep(0.2)
    assert (out / "trials" / "0000" / "result.json").exists()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first_result = (out / "trials" / "0000" / "result.json").read_text()

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "retrying trial(s) 1" in rerun.stderr
    result = llmtune.load_results(out)
    states = {t.number: (t.state.name, t.user_attrs.get("llmtune.status")) for t in result.study.trials}
    assert states[0] == ("COMPLETE", "complete")
    assert states[1] == ("FAIL", "interrupted")
    finished = [t for t in result.study.trials if t.state.name == "COMPLETE"]
    assert len(finished) == 3  # n_trials completed in the end
    retry = next(t for t in finished if t.user_attrs.get("llmtune.retry_of") == 1)
    assert retry.params == result.study.trials[1].params  # the lost config is what got retried
    assert (out / "trials" / "0000" / "result.json").read_text() == first_result  # trial 0 was not re-run


def test_resume_refuses_a_changed_search_space(tmp_path):
    data = fast_recipe(tmp_path, study={"n_trials": 1, "trial_timeout": 300})
    llmtune.search(data)
    changed = json.loads(json.dumps(data))
    changed["search"]["lora_r"] = [4, 8]
    with pytest.raises(Exception, match="different search space.*--study-name"):
        llmtune.search(changed)
    # The same recipe resumes: nothing new to run, nothing lost.
    again = llmtune.search(data)
    assert len(again.trials) == 1


def test_recipe_round_trips_through_the_study(tmp_path):
    data = fast_recipe(tmp_path)
    r = recipe_from_dict(data)
    assert recipe_from_dict(r.to_dict()).to_dict() == r.to_dict()


def test_memory_gate_skips_configs_predicted_over_budget_without_running_them(tmp_path):
    from llmtune.study.gate import predicted_peak_gb

    search = {**tiny_recipe_dict(tmp_path)["search"], "sequence_len": [64, 1024], "micro_batch_size": [1, 32]}
    r = recipe_from_dict(fast_recipe(tmp_path, search=search))
    small = predicted_peak_gb(r, r.space.complete({"sequence_len": 64, "micro_batch_size": 1}))
    big = predicted_peak_gb(r, r.space.complete({"sequence_len": 1024, "micro_batch_size": 32}))
    assert big > small
    limit = (small + big) / 2
    data = fast_recipe(tmp_path, search=search, constraints={"peak_memory_gb": {"max": limit}},
                       study={"n_trials": 4, "sampler": "grid", "trial_timeout": 300, "memory_gate": "on",
                              "execution": "search"})
    result = llmtune.search(data)
    trials = result.study.trials
    assert len(trials) == 4
    over = [t for t in trials if t.user_attrs["llmtune.status"] == "over_budget"]
    assert {(t.params["sequence_len"], t.params["micro_batch_size"]) for t in over} >= {(1024, 32)}
    for t in over:
        assert "predicted peak memory" in t.user_attrs["llmtune.reason"]
        assert t.user_attrs["llmtune.constraints"]["infeasible"] > 0 and max(t.constraints.values()) > 0
        assert not (Path(t.user_attrs["llmtune.dir"]) / "result.json").exists()  # never ran
        assert t.user_attrs["llmtune.metrics"]["predicted_memory_gb"] > limit
    ran = [t for t in trials if t.user_attrs["llmtune.status"] == "complete"]
    assert ran and all(t.user_attrs["llmtune.metrics"]["predicted_memory_gb"] <= limit for t in ran)
    assert result.best.number in {t.number for t in ran}

    # Under probes (the default) micro_batch_size is an execution setting: the gate skips the variant
    # predicted over budget before its probe; the learning configuration trains in the one that fits.
    data["study"]["execution"], data["output_dir"] = "probe", str(tmp_path / "probed")
    result = llmtune.search(data)
    full = [t for t in result.study.trials if "llmtune.variant_of" not in t.user_attrs]
    assert len(full) == 2 and {t.params["sequence_len"] for t in full} == {64, 1024}
    (big_probe,) = [p for t in full if t.params["sequence_len"] == 1024 for p in t.user_attrs["llmtune.probes"]
                    if p["settings"]["micro_batch_size"] == 32]
    assert big_probe["status"] == "over_budget" and "predicted peak memory" in big_probe["reason"]
    assert all(t.params["micro_batch_size"] == 1 for t in full if t.params["sequence_len"] == 1024)
    probe_dirs = sorted(p.name for p in (tmp_path / "probed" / "trials").glob("*/probe-*"))
    assert len(probe_dirs) == 3  # 2 variants of sequence_len 64, 1 of 1024: the gated one never ran


def test_asha_prunes_weak_trials_in_a_multi_objective_study(tmp_path):
    search = {**tiny_recipe_dict(tmp_path)["search"], "learning_rate": [3e-3, 1e-6], "lora_r": 8}
    data = fast_recipe(tmp_path, search=search, train={"budget": {"examples": 64}, "eval_points": 1},
                       objectives={"eval_loss": "minimize", "latency_ms": "minimize", "ttft_ms": "minimize"},
                       study={"n_trials": 2, "sampler": "grid", "seed": 1, "trial_timeout": 300, "pruner": "asha",
                              # peak memory (RSS) is ranked too; lr does not change it, so a 10% tolerance
                              # keeps its noise from shielding the weak trial
                              "pruner_settings": {"eta": 2, "min_fraction": 0.5, "min_trials_per_rung": 2,
                                                  "metric_tolerance": 0.1}})
    # A fixed order makes the decision certain: the learning rate that trains first, then the one that
    # barely moves the loss (5.68 vs ~4.5 at the rung: far outside any float noise).
    Path(data["output_dir"]).mkdir(parents=True)
    study = optuna.create_study(storage=f"sqlite:///{Path(data['output_dir']) / 'study.db'}",
                                study_name=data["name"], directions=list(data["objectives"].values()))
    for lr in (3e-3, 1e-6):
        study.enqueue_trial({"learning_rate": lr})
    result = llmtune.search(data)
    trials = result.study.trials
    assert [t.params["learning_rate"] for t in trials] == [3e-3, 1e-6]
    pruned = [t for t in trials if t.user_attrs["llmtune.status"] == "pruned"]
    assert [t.number for t in pruned] == [1], [(t.params, t.user_attrs["llmtune.curve"]) for t in trials]
    for t in pruned:
        assert t.state == optuna.trial.TrialState.PRUNED
        assert [f for f, _ in t.user_attrs["llmtune.curve"]] == [0.0, 0.5]  # stopped at the rung
        assert "eval_loss" in t.user_attrs["llmtune.metrics"]  # partial metrics kept
        assert t.number not in {p.number for p in result.pareto_front}
    finished = [t for t in trials if t.user_attrs["llmtune.status"] == "complete"]
    assert [t.number for t in finished] == [0] and finished[0].user_attrs["llmtune.curve"][-1][0] == 1.0


def test_a_trial_process_exits_when_its_search_process_dies(tmp_path):
    spec = tmp_path / "spec.json"
    values = recipe_from_dict(fast_recipe(tmp_path)).space.complete({})
    spec.write_text(json.dumps({"recipe": fast_recipe(tmp_path), "values": values, "out_dir": str(tmp_path / "t"),
                                "fractions": [1.0]}))
    parent = (
        "import os, subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-m', 'llmtune.harness.worker', {str(spec)!r}], start_new_session=True,\n"
        "                     env=dict(os.environ, LLMTUNE_FAULT='hang', LLMTUNE_PARENT_PID=str(os.getpid())),\n"
        "                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=60)
    child = int(out.stdout.strip())
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            assert not (tmp_path / "t" / "result.json").exists()  # it was stopped, it did not crash or finish
            return
        time.sleep(0.5)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the orphaned trial process kept running after its search process died")


def test_a_search_measures_the_untrained_adapter_loss_once_per_base(tmp_path):
    data = fast_recipe(tmp_path, search={**tiny_recipe_dict(tmp_path)["search"], "lora_r": [4, 8, 16]},
                       study={"n_trials": 3, "sampler": "grid", "trial_timeout": 300})
    result = llmtune.search(data)
    trials = sorted(result.study.trials, key=lambda t: t.number)
    reused = [t.user_attrs["llmtune.info"]["base_eval_loss_reused"] for t in trials]
    base = [t.user_attrs["llmtune.curve"][0] for t in trials]
    assert reused == [False, True, True]
    assert base[0][0] == 0.0 and base == [base[0]] * 3
    stored = [v for k, v in result.study.user_attrs.items() if k.startswith("llmtune.base_eval_loss.")]
    assert len(stored) == 1 and stored[0]["loss"] == base[0][1] and stored[0]["context"]["device"] == "cpu"


def test_a_search_whose_first_trials_all_crash_alike_stops_and_exits_nonzero(tmp_path, monkeypatch, capfd,
                                                                             tiny_model_path, tiny_data_path):
    import yaml

    from llmtune.cli import main

    monkeypatch.setenv("LLMTUNE_FAULT", "crash")  # every trial crashes the same way
    recipe = tiny_recipe_dict(tmp_path, study={"n_trials": 8, "trial_timeout": 300},
                              search={"learning_rate": [1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3, 7e-3, 8e-3]})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["search", str(path), "--quiet"]) == 1
    err = capfd.readouterr().err
    assert "the first 3 trials all crashed with the same reason" in err and "Traceback" not in err
    study = llmtune.load_results(recipe["output_dir"]).study
    ended = [t for t in study.trials if t.user_attrs.get("llmtune.status") == "crashed"]
    assert 3 <= len(ended) < 8  # stopped early, not after n_trials
