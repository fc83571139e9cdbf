"""The exact-match benchmark's data: the committed files are what the seeded generator writes, and every
answer is right."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("exact_match_data", ROOT / "benchmarks" / "exact_match_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_data_is_the_generators_and_correct():
    gen = _generator()
    train, evals = gen.rows(320, 48, 22)
    for name, part in (("train", train), ("eval", evals)):
        lines = (ROOT / "benchmarks" / "data" / "exact_match" / f"{name}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == part
    questions = [r["messages"][0]["content"] for r in train + evals]
    assert len(set(questions)) == len(questions)  # no eval question is also a training question
    for row in train + evals:
        question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        words = question.replace("?", "").split()
        if question.startswith("What is"):
            assert int(answer) == int(words[2]) + int(words[4])
        else:
            k, direction, day = int(words[6]), words[8], gen.DAYS.index(words[9])
            assert answer == gen.DAYS[(day + (k if direction == "after" else -k)) % 7]
