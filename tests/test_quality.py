"""Quality objectives: the built-in metrics on generations against hand-computed values, a user's metric,
forgetting against the base model, and their checks before any trial (issue 22)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe_dict

from llmtune.config.recipe import recipe_from_dict
from llmtune.errors import RecipeError
from llmtune.harness import quality as Q

# ------------------------------------------------------------------------------------ the built-in metrics


def test_exact_match_normalises_case_space_and_trailing_punctuation():
    assert Q.normalize("  The   Answer is 42.!  ") == "the answer is 42"
    assert Q.exact_match(["Paris.", " paris ", "Lyon", "PARIS?"], ["paris"] * 4) == 0.75
    assert Q.exact_match(["4,2"], ["42"]) == 0.0  # only trailing punctuation goes


def test_contains():
    assert Q.contains(["It is Paris.", "no idea"], ["paris", "yes"]) == 0.5


def test_rouge_l_is_the_lcs_f1_over_words():
    # LCS of "the cat sat on the mat" and "the cat is on the mat" is 5 words of 6 and 6: F1 = 10 / 12.
    assert Q.rouge_l(["The cat sat on the mat."], ["the cat is on the mat"]) == pytest.approx(10 / 12)
    assert Q.rouge_l(["", "a b"], ["x", "b a"]) == pytest.approx((0 + 2 * 1 / 4) / 2)


def test_chrf_by_hand():
    # "ab" vs "abc": 1-grams 2 of 2 match (ref 3), 2-grams 1 of 1 (ref 2), higher orders have none in "ab".
    # P = mean(1, 1) = 1, R = mean(2/3, 1/2) = 7/12, F2 = 5 P R / (4 P + R) = 7/11.
    assert Q.chrf(["ab"], ["abc"]) == pytest.approx(7 / 11)
    assert Q.chrf(["a b c d e f g"], ["abcdefg"]) == pytest.approx(1.0)  # whitespace is not scored
    assert Q.chrf(["xyz"], ["abc"]) == 0.0


def test_bleu_by_hand():
    # All four orders match fully; 4 words against 5: brevity penalty exp(1 - 5/4).
    assert Q.bleu(["a b c d"], ["a b c d e"]) == pytest.approx(math.exp(-0.25))
    # Three words: no 4-gram, smoothed to 1 / (2 x 1); geometric mean 0.5 ** (1/4), no brevity penalty.
    assert Q.bleu(["a b c"], ["a b c"]) == pytest.approx(0.5 ** 0.25)
    assert Q.bleu(["the cat, the dog"], ["the cat, the dog"]) == pytest.approx(1.0)
    assert Q.bleu([""], ["a"]) == 0.0


def test_json_valid_and_length_ok():
    assert Q.json_valid(['{"a": 1}', " [1, 2] ", "{a: 1}", ""], ["", "", "", ""]) == 0.5
    # reference "4" (1 char): up to max(2, 11) = 11 characters is fine, an empty answer never is.
    assert Q.length_ok(["4", "", "x" * 11, "x" * 12], ["4"] * 4) == 0.5


# ------------------------------------------------------------------------------------------ user metrics


def test_user_metric_is_loaded_called_and_checked(tmp_path):
    assert Q.user_metric("first_letter_match", "quality_metrics:first_letter_match", ["Paris", "x"], ["paris", "y"],
                         [{}, {}]) == {"first_letter_match": 0.5}
    assert Q.user_metric("answer_chars", "quality_metrics:answer_chars", ["ab", "abcd"], ["", ""], [{}, {}]) == {
        "answer_chars": 3.0, "rows_seen": 2.0}
    with pytest.raises(Q.MetricError, match=r"metric bad \(quality_metrics:broken\) raised ValueError: no score today"):
        Q.user_metric("bad", "quality_metrics:broken", ["a"], ["a"], [{}])
    with pytest.raises(Q.MetricError, match="without 'other'"):
        Q.user_metric("other", "quality_metrics:answer_chars", ["a"], ["a"], [{}])
    assert Q.metric_problem("quality_metrics:first_letter_match") is None
    assert "must take (predictions, references, rows)" in (Q.metric_problem("quality_metrics:two_args") or "")
    assert "ModuleNotFoundError" in (Q.metric_problem("no_such_module_xyz:score") or "")
    assert "has no nope" in (Q.metric_problem("quality_metrics:nope") or "")
    script = tmp_path / "score.py"
    script.write_text("def score(predictions, references, rows):\n    return 0.25\n")
    assert Q.user_metric("s", f"{script}:score", ["a"], ["b"], [{}]) == {"s": 0.25}


def test_objectives_take_user_metrics_and_task_metrics_as_constraints_and_select(tmp_path):
    d = tiny_recipe_dict(tmp_path, objectives={"exact_match": None, "my_score": {
        "metric": "quality_metrics:first_letter_match", "direction": "maximize"}},
        constraints={"exact_match": {"min": 0.6}, "my_score": {"min": 0.1}}, select={"by": "exact_match"})
    r = recipe_from_dict(d)
    assert {k: r.objectives[k] for k in ("exact_match", "my_score")} == {"exact_match": "maximize", "my_score": "maximize"}
    assert r.measure.metrics == {"my_score": "quality_metrics:first_letter_match"}
    assert r.constraints == {"exact_match": {"min": 0.6}, "my_score": {"min": 0.1}}
    assert recipe_from_dict(r.to_dict()).objectives == r.objectives  # what a trial process reads back
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(tiny_recipe_dict(tmp_path, objectives={"exact_match": None, "s": {"metric": "no_colon"},
                                                                "eval_loss": {"metric": "m:f"}}))
    text = str(e.value)
    assert "objectives.s.metric" in text and "module:function" in text and "built-in metric" in text


def test_a_bad_user_metric_stops_validate_with_exit_2(tmp_path, tiny_model_path, tiny_data_path):
    from llmtune import api
    from llmtune.cli import main

    d = tiny_recipe_dict(tmp_path, objectives={"eval_loss": None,
                                               "missing": {"metric": "no_such_module_xyz:score"},
                                               "wrong": {"metric": "quality_metrics:two_args"}})
    with pytest.raises(RecipeError) as e:
        api.validate(d)
    assert e.value.exit_code == 2
    text = str(e.value)
    assert "objectives.missing" in text and "no_such_module_xyz" in text
    assert "objectives.wrong" in text and "(predictions, references, rows)" in text
    recipe = tmp_path / "recipe.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(d))
    assert main(["validate", str(recipe)]) == 2


# ------------------------------------------------------------------------ trials on the tiny model


def _recipe(tmp_path, **sections):
    return recipe_from_dict(tiny_recipe_dict(Path(tmp_path), **sections))


def test_identity_adapter_forgets_nothing(tmp_path, tiny_model_path, tiny_data_path):
    from llmtune.harness import model as M
    from llmtune.harness.generate import forgetting

    r = _recipe(tmp_path, measure={"max_new_tokens": 6})
    settings = {**r.space.complete({}), "lora_r": 8}
    from llmtune.config.settings import TrialSettings

    s = TrialSettings.of(settings)
    model = M.apply_lora(M.load_base(r.model, s, "cpu", torch.float32), s)  # B = 0: the identity
    value, info = forgetting(model, M.load_tokenizer(r.model), r, "cpu")
    assert value == 0.0 and info["forgetting_base_loss"] > 0 and info["forgetting_sequences"] == 16


def test_trial_scores_its_answers_saves_them_and_an_overtrained_adapter_forgets(tmp_path, tiny_model_path,
                                                                                tiny_data_path):
    from llmtune.harness.train import run_trial

    r = _recipe(tmp_path, objectives={"eval_loss": None, "exact_match": None, "forgetting": None,
                                      "answer_chars": {"metric": "quality_metrics:answer_chars", "direction": "minimize"}},
                constraints={"rouge_l": {"min": 0.0}}, measure={"latency": False, "generation_examples": 6,
                                                                "max_new_tokens": 8},
                train={"budget": {"examples": 256}, "eval_points": 1, "lr_scheduler": "constant"})
    res = run_trial(r, r.space.complete({"learning_rate": 1e-2}), tmp_path / "t", save_adapter=False)
    assert res.status == "complete", res.reason
    answers = [json.loads(line) for line in (tmp_path / "t" / "generations.jsonl").read_text().splitlines()]
    assert len(answers) == 6 and all({"prompt", "prediction", "reference"} <= set(a) for a in answers)
    assert all(a["prompt"].endswith("### Response:\n") for a in answers)  # the rows' prompts, answered
    preds, refs = [a["prediction"] for a in answers], [a["reference"] for a in answers]
    assert res.metrics["exact_match"] == Q.exact_match(preds, refs)
    assert res.metrics["rouge_l"] == Q.rouge_l(preds, refs)  # a constraint's metric is measured too
    assert res.metrics["answer_chars"] == pytest.approx(sum(map(len, preds)) / 6)
    assert res.metrics["rows_seen"] == 6.0
    # lr 1e-2 at a constant rate over 256 examples: the base's own answers get clearly less likely.
    assert res.metrics["forgetting"] > 0.3, res.info
    assert res.info["generation_s"] > 0 and res.info["forgetting_s"] > 0 and res.info["generation_examples"] == 6


def test_a_user_metric_that_raises_is_the_trials_reason(tmp_path, tiny_model_path, tiny_data_path):
    from llmtune.harness.train import run_trial

    r = _recipe(tmp_path, objectives={"eval_loss": None, "bad": {"metric": "quality_metrics:broken"}},
                measure={"latency": False, "generation_examples": 2, "max_new_tokens": 4},
                train={"budget": {"examples": 16}, "eval_points": 1})
    res = run_trial(r, r.space.complete({}), tmp_path / "t", save_adapter=False)
    assert res.status == "crashed"
    assert "metric bad (quality_metrics:broken) raised ValueError: no score today" in res.reason
    assert len((tmp_path / "t" / "generations.jsonl").read_text().splitlines()) == 2  # saved before scoring


# ------------------------------------------------------------------------------ what the user gets


def test_report_table_and_card_carry_task_and_user_metrics(tmp_path):
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    from llmtune.deliver.modelcard import card_metadata, render_card
    from llmtune.deliver.report import write_report
    from llmtune.deliver.results import SearchResult

    r = recipe_from_dict({
        "name": "quality-report", "model": {"name": "llmtune/tiny"}, "data": {"source": "llmtune/tiny-tasks"},
        "search": {"learning_rate": {"low": 1e-4, "high": 1e-2}},
        "objectives": {"exact_match": None, "forgetting": None,
                       "my_score": {"metric": "quality_metrics:first_letter_match"}},
        "select": {"by": "exact_match"}, "output_dir": str(tmp_path)})
    study = optuna.create_study(directions=list(r.objectives.values()))
    for n, em in enumerate((0.25, 0.75)):
        folder = tmp_path / f"trial-{n}"
        folder.mkdir()
        (folder / "generations.jsonl").write_text("".join(
            json.dumps({"prompt": f"Q{n}-{i}?", "prediction": f"<answer {n}-{i}>", "reference": f"ref {i}"}) + "\n"
            for i in range(12)))
        metrics = {"exact_match": em, "forgetting": 0.1 * n, "my_score": 0.5, "eval_loss": 1.0}
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, values=[em, 0.1 * n, 0.5], params={"learning_rate": 1e-3 * (n + 1)},
            distributions={"learning_rate": FloatDistribution(1e-4, 1e-2, log=True)},
            user_attrs={"llmtune.status": "complete", "llmtune.metrics": metrics, "llmtune.dir": str(folder),
                        "llmtune.settings": {"learning_rate": 1e-3 * (n + 1)}, "llmtune.curve": []},
            constraints={"infeasible": 0.0}))
    result = SearchResult(study, r)
    assert result.best.number == 1  # select.by: exact_match
    assert {"exact_match", "forgetting", "my_score"} <= set(result.trials.columns)  # trials.csv's columns
    text = write_report(result, tmp_path / "report.html").read_text()
    start = text.index('id="generations"')
    table = text[start:text.index("</table>", start)]
    assert "&lt;answer 1-0&gt;" in table and "ref 0" in table and "Q1-0?" in table and "answer 0-" not in table
    assert table.count("<tr>") == 1 + 8  # head and SHOWN_GENERATIONS answers
    meta = card_metadata(result, result.best, None, {})
    names = [m["name"] for m in meta["model-index"][0]["results"][0]["metrics"]] if "model-index" in meta else []
    assert {"exact_match", "forgetting", "my_score"} <= set(names), meta
    card = render_card(result, result.best)
    assert "user metric on generations (quality_metrics:first_letter_match)" in card


def test_a_search_optimises_a_user_metric_from_a_file_and_a_task_metric(tmp_path, tiny_model_path, tiny_data_path):
    """In trial processes (forked): the user's file imports there, the study names the metrics, trials.csv has them."""
    import llmtune

    script = tmp_path / "score.py"
    script.write_text("def score(predictions, references, rows):\n"
                      "    return sum(len(p) for p in predictions) / len(predictions)\n")
    data = tiny_recipe_dict(tmp_path, objectives={"eval_loss": None, "peak_memory_gb": None, "contains": None,
                                                  "chars": {"metric": f"{script}:score", "direction": "minimize"}},
                            constraints={"exact_match": {"min": 0.0}},
                            measure={"latency": False, "generation_examples": 4, "max_new_tokens": 4},
                            train={"budget": {"examples": 32}, "eval_points": 1},
                            study={"n_trials": 1, "trial_timeout": 300, "sampler": "random"})
    result = llmtune.search(data)
    assert result.study.metric_names == ["eval_loss", "peak_memory_gb", "contains", "chars"]
    row = result.trials.iloc[0]
    assert row["status"] == "complete", row["reason"]
    assert 0 <= row["contains"] <= 1 and row["chars"] >= 0 and row["exact_match"] >= 0
    trial_dir = result.trial_dir(0)
    assert len((trial_dir / "generations.jsonl").read_text().splitlines()) == 4
    assert "chars" in (Path(data["output_dir"]) / "trials.csv").read_text().splitlines()[0]
