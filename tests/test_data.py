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
