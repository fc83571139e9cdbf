"""Data loading: files, folders of split files, held-out fractions, clear errors (no model needed)."""

from __future__ import annotations

import json

import pytest

from llmtune.config.recipe import recipe_from_dict
from llmtune.errors import DataError
from llmtune.harness.data_sources import load_splits


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def rows(n, tag):
    return [{"instruction": f"{tag} {i}", "input": "", "output": str(i)} for i in range(n)]


def data_cfg(**data):
    return recipe_from_dict({"model": {"name": "m"}, "data": data}).data


def test_folder_with_named_eval_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", rows(20, "train"))
    write_jsonl(tmp_path / "test.jsonl", rows(5, "test"))
    auto = load_splits(data_cfg(source=str(tmp_path)))
    assert len(auto.train) == 20 and [r["instruction"] for r in auto.eval][0] == "test 0"
    named = load_splits(data_cfg(source=str(tmp_path), eval_split="test"))
    assert named.eval == auto.eval and named.fingerprint == auto.fingerprint
    with pytest.raises(DataError, match="no 'dev' split file"):
        load_splits(data_cfg(source=str(tmp_path), eval_split="dev"))


def test_single_file_holds_out_a_seeded_fraction(tmp_path):
    f = tmp_path / "all.jsonl"
    write_jsonl(f, rows(100, "x"))
    a = load_splits(data_cfg(source=str(f), eval_fraction=0.2, split_seed=3))
    b = load_splits(data_cfg(source=str(f), eval_fraction=0.2, split_seed=3))
    c = load_splits(data_cfg(source=str(f), eval_fraction=0.2, split_seed=4))
    assert len(a.eval) == 20 and len(a.train) == 80
    assert a.eval == b.eval and a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint  # other data, other fingerprint: results never mix
    assert not {r["instruction"] for r in a.eval} & {r["instruction"] for r in a.train}


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist; check data.source"):
        load_splits(data_cfg(source=str(tmp_path / "nope.jsonl")))


def test_local_json_reads_like_datasets_without_importing_it(tmp_path):
    from datasets import load_dataset

    from llmtune.harness.data_sources import _load_file

    rows_ = [{"instruction": "a", "output": 1}, {"instruction": "b", "input": "x", "output": 2}]
    (tmp_path / "a.json").write_text(json.dumps(rows_))
    write_jsonl(tmp_path / "b.jsonl", rows_)
    for name in ("a.json", "b.jsonl"):
        expected = [dict(r) for r in load_dataset("json", data_files=str(tmp_path / name), split="train")]
        assert _load_file(tmp_path / name) == expected  # missing keys become None, values keep their types
    assert _load_file(tmp_path / "b.jsonl")[0] == {"instruction": "a", "output": 1, "input": None}


def test_broken_json_lines_is_a_clear_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a"}\n{"instruction": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl.*not valid JSON.*fix the file"):
        load_splits(data_cfg(source=str(tmp_path / "bad.jsonl")))


def test_a_json_object_file_is_read_by_datasets_not_refused(tmp_path):
    from llmtune.harness.data_sources import _load_file

    path = tmp_path / "columns.json"
    path.write_text(json.dumps({"text": ["a b", "c d"]}, indent=2))  # one object over several lines
    assert _load_file(path)  # handed to `datasets` as before, no "not valid JSON" error


def test_an_eval_set_without_answer_tokens_is_an_error_not_a_zero_loss():
    """Every eval prompt longer than data.eval_max_length leaves no token to score: the loss over it would
    read 0 and win the search, so the harness refuses to compute it (the preflight refuses the recipe first)."""
    import torch

    from llmtune.harness import data as D
    from llmtune.harness.train import evaluate

    prompt_only = [D.Example([1, 5, 6, 7], [D.IGNORE] * 4, True) for _ in range(3)]
    with pytest.raises(DataError, match="data.eval_max_length") as info:
        D.eval_batches(prompt_only, 2, 0)
    assert info.value.field == "data.eval_max_length"
    with pytest.raises(DataError, match="no answer token"):
        evaluate(torch.nn.Linear(1, 1), [], "cpu")
    scored = D.eval_batches(prompt_only + [D.Example([1, 5, 6], [D.IGNORE, 5, 6], False)], 2, 0)
    assert sum(b.label_tokens for b in scored) == 2


def _recipe_with(tmp_path, data_rows, **data):
    from llmtune.config.recipe import recipe_from_dict

    write_jsonl(tmp_path / "d.jsonl", data_rows)
    return recipe_from_dict({"model": {"name": "llmtune/tiny"}, "data": {"source": str(tmp_path / "d.jsonl"), **data},
                             "search": {"sequence_len": [64, 512]}, "output_dir": str(tmp_path / "run")})


def test_the_preflight_warns_of_rows_a_short_sequence_len_drops(tmp_path, tiny_model_path):
    """Some prompts fill the shortest sequence_len searched: a warning (those trials drop them), not a problem."""
    from llmtune.preflight import preflight

    long = [{"instruction": "the river " * 60, "input": "", "output": "yes"} for _ in range(5)]
    recipe = _recipe_with(tmp_path, long + rows(20, "short"), eval_fraction=0.2, split_seed=1)
    warnings = preflight(recipe, study=False, log=None).warnings
    assert any(w.startswith("search.sequence_len: at sequence_len 64") for w in warnings), warnings
