"""Pause and resume instead of kill (study/promotion.py): a trial the pruner stops keeps its state, continues bit
for bit when promoted, is promoted exactly once when its rung later ranks it among the kept (or the rung is seen
not to rank), across processes; a configuration counts once in a rung's population."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import resumable_recipe, tiny_recipe_dict
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from safetensors.torch import load_file

from llmtune.config.recipe import recipe_from_dict
from llmtune.harness.resume import STATE_FILE, WHOLE_RUN
from llmtune.harness.train import run_trial
from llmtune.study import promotion, rungs
from llmtune.study.attrs import CURVE, PAUSED, RESUME_OF, SETTINGS, STATUS
from llmtune.study.loop import Search
from llmtune.study.pruners import ASHAPruner, make_pruner
from llmtune.study.storage import counted, open_storage


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def test_a_paused_trial_continues_bit_for_bit_where_it_stopped(tmp_path, tiny_model_path, tiny_data_path):
    """Stopped at the rung with its state saved, then continued from it: the same curve and the same adapter,
    to the bit, as the run that was never stopped (dropout on, so the RNG state matters too)."""
    recipe = resumable_recipe(tmp_path)
    values = recipe.space.complete({})
    whole = run_trial(recipe, values, tmp_path / "whole", fractions=[1 / 3, 1.0])
    stop_at_rung = lambda event: event.get("event") == "eval"  # noqa: E731  (the pruner's "stop")
    paused = run_trial(recipe, values, tmp_path / "paused", fractions=[1 / 3, 1.0], on_event=stop_at_rung,
                       pause=str(tmp_path / "state"))
    assert paused.status == "pruned" and paused.info["paused"]["fraction"] == pytest.approx(1 / 3)
    assert (tmp_path / "state" / STATE_FILE).is_file() and not (tmp_path / "paused" / "adapter").exists()
    rest = run_trial(recipe, values, tmp_path / "rest", fractions=[1.0],
                     segment={"schedule": WHOLE_RUN, "start": paused.info["paused"]["fraction"],
                              "resume": str(tmp_path / "state")})
    assert whole.status == rest.status == "complete", (whole.reason, rest.reason)
    assert whole.curve == paused.curve + rest.curve  # the rung's loss and the final one, exactly
    a, b = _adapter(tmp_path / "whole"), _adapter(tmp_path / "rest")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Killed, not paused (pause off): nothing is kept.
    killed = run_trial(recipe, values, tmp_path / "killed", fractions=[1 / 3, 1.0], on_event=stop_at_rung)
    assert killed.status == "pruned" and "paused" not in killed.info


def _trial(study, number_loss_at_rung: float, *, state=TrialState.COMPLETE, final: float | None = None,
           paused: bool = False, **attrs):
    curve = [[1 / 3, number_loss_at_rung]] + ([[1.0, final]] if final is not None else [])
    user = {CURVE: curve, STATUS: "complete" if state == TrialState.COMPLETE else "pruned",
            SETTINGS: {"learning_rate": 1e-3}, **attrs}
    if paused:
        user[PAUSED] = {"fraction": 1 / 3, "state": "/nowhere"}
    study.add_trial(create_trial(state=state, values=[final] if state == TrialState.COMPLETE else None,
                                 params={"x": number_loss_at_rung}, distributions={"x": FloatDistribution(0, 100)},
                                 user_attrs=user))
    return study.trials[-1]


def test_a_paused_trial_is_promoted_once_its_rung_ranks_it_among_the_kept():
    """ASHA's promotion rule, asked again with the rung's population as it is now: paused at 1 of 2 (keep 1),
    not yet promotable at 2 of 3, promotable at 2 of 4 (keep 2); queued once; its continuation carries the
    curve to the rung, is one entry of the rung (with its paused trial) and counts for no n_trials."""
    study = optuna.create_study()
    pruner = ASHAPruner(eta=2, min_fraction=1 / 3, min_trials_per_rung=1)
    _trial(study, 1.0, final=0.9)
    paused = _trial(study, 2.0, state=TrialState.PRUNED, paused=True)
    assert promotion.promotable(study, pruner.should_prune) == []
    _trial(study, 3.0, state=TrialState.PRUNED)
    assert promotion.promotable(study, pruner.should_prune) == []
    _trial(study, 4.0, state=TrialState.PRUNED)
    assert [t.number for t in promotion.promotable(study, pruner.should_prune)] == [paused.number]
    assert promotion.promote(study, pruner.should_prune, log=lambda line: None) == 1
    assert promotion.promotable(study, pruner.should_prune) == []  # queued once
    assert promotion.waiting(study)
    cont = study.get_trials(states=(TrialState.WAITING,))[0]
    assert cont.user_attrs[CURVE] == [[1 / 3, 2.0]] and cont.user_attrs[RESUME_OF]["first"] == paused.number
    assert rungs.configuration(cont) == paused.number
    assert counted(study) == (4, 0)  # the paused trial counted; its continuation does not
    # One entry of the rung: a fifth configuration sees 4 peers, not 5 (with 5, keep would rise to 2).
    assert pruner.should_prune(study, 99, 1 / 3, 2.5)


def test_a_rung_that_does_not_rank_the_final_losses_promotes_every_trial_it_paused():
    """Once 4 finished trials show the rung ranking the final losses backwards (rho < 0.5), the trials it
    paused are promoted: a stop by mistake is not final."""
    study = optuna.create_study()
    pruner = ASHAPruner(eta=3, min_fraction=1 / 3, min_trials_per_rung=1)
    for early, final in [(1.0, 0.9), (1.1, 0.8)]:
        _trial(study, early, final=final)
    paused = [_trial(study, 1.2 + i / 10, state=TrialState.PRUNED, paused=True) for i in range(2)]
    assert promotion.promotable(study, pruner.should_prune) == []
    for early, final in [(1.4, 0.7), (1.5, 0.6)]:  # later trials: worse at the rung, better at the end
        _trial(study, early, final=final)
    rho, pairs = rungs.rung_agreement(study, 1 / 3)
    assert pairs == 4 and rho is not None and rho < rungs.MIN_AGREEMENT
    assert {t.number for t in promotion.promotable(study, pruner.should_prune)} == {t.number for t in paused}


def test_pause_is_a_pruner_setting():
    assert make_pruner("asha").pause and not make_pruner("asha", pause=False).pause
    assert not make_pruner("none").pause
    with pytest.raises(ValueError, match="'pause'='maybe'"):
        make_pruner("hyperband", pause="maybe")


def test_a_paused_trial_is_promoted_by_two_other_processes_and_continued_once(tmp_path, tiny_model_path,
                                                                             tiny_data_path, pg_url):
    """One process pauses trial 1 (worse than trial 0 at the rung, keep 1 of 2) and stops at n_trials 2. Two
    processes then join with n_trials 4 and two worse configurations: once both reached the rung, trial 1 ranks
    2nd of 4 (keep 2) and is promoted; both processes see it, exactly one continuation trains, from the state
    the first process saved (its curve is trial 1's up to the rung, then its own)."""
    name = f"promo-{uuid.uuid4().hex[:8]}"
    data = tiny_recipe_dict(tmp_path, **{
        "train": {"budget": {"examples": 96}, "eval_points": 1, "threads": 1},
        "measure": {"latency": False},
        "search": {"learning_rate": {"low": 1e-7, "high": 1e-2, "log": True}, "lora_r": 8, "sequence_len": 128,
                   "micro_batch_size": 8, "lora_dropout": 0.0},
        "objectives": ["eval_loss"],  # ranked on the loss alone (a dict would add to the tiny recipe's objectives)
        "study": {"n_trials": 2, "trial_timeout": 300, "sampler": "random", "pruner": "asha", "storage": pg_url,
                  "study_name": name, "pruner_settings": {"eta": 2, "min_fraction": 0.5, "min_trials_per_rung": 1}}})
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(data))
    study = Search(recipe_from_dict(data), log=lambda line: None).prepare()  # created as the CLI would
    for lr in (3e-3, 3e-4):
        study.enqueue_trial({"learning_rate": lr})
    cmd = [sys.executable, "-m", "llmtune.cli", "search", str(recipe_path), "--quiet"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    one = optuna.load_study(study_name=name, storage=open_storage(pg_url)).trials[1]
    assert one.state == TrialState.PRUNED and PAUSED in one.user_attrs, one.user_attrs
    for lr in (1e-6, 1e-7):
        study.enqueue_trial({"learning_rate": lr})
    more = [c for c in cmd if c != "--quiet"] + ["--n-trials", "4"]
    procs = [subprocess.Popen(more, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trials = optuna.load_study(study_name=name, storage=open_storage(pg_url)).trials
    continuations = [t for t in trials if RESUME_OF in t.user_attrs and t.user_attrs.get(STATUS) != "surplus"]
    assert [t.user_attrs[RESUME_OF]["trial"] for t in continuations] == [1], outs
    cont = continuations[0]
    assert cont.state == TrialState.COMPLETE and cont.params == one.params
    assert cont.user_attrs["llmtune.info"]["resumed_from"] == {"trial": 1, "fraction": 0.5}
    curve = one.user_attrs[CURVE]
    assert cont.user_attrs[CURVE][:len(curve)] == curve and cont.user_attrs[CURVE][-1][0] == 1.0
    assert not Path(one.user_attrs[PAUSED]["state"]).exists()  # freed once its continuation ended
    assert counted(optuna.load_study(study_name=name, storage=open_storage(pg_url))) == (4, 0)


def test_a_continuation_under_probes_finds_the_variant_its_paused_trial_trained_in(tmp_path):
    """Under `study.execution: probe` the paused trial's probes (PROBES) come back for its continuation, which
    adds the other variants as trials once it completes, as the full trial would have."""
    from llmtune.study.probes import Probes

    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path, search={"sample_packing": [False, True]}))
    records = [{"settings": {"learning_rate": 1e-3, "sample_packing": packing}, "status": "complete", "reason": "",
                "feasible": True, "metrics": {"train_time_s": 2.0 - packing, "peak_memory_gb": 1.0}, "wall_s": 1.0}
               for packing in (False, True)]
    prober = Probes.restored(recipe, records)
    chosen = prober.variant({"learning_rate": 1e-3, "sample_packing": True})
    assert chosen is not None and chosen.settings["sample_packing"] is True and chosen.feasible
    assert [p.settings["sample_packing"] for p in prober.found] == [False, True]
    empty = Probes.restored(recipe, None)
    assert empty.variant({"sample_packing": True}) is None and empty.found == []
