"""User metrics for tests/test_quality.py: loaded by 'quality_metrics:...' from the recipe."""

from __future__ import annotations


def answer_chars(predictions, references, rows):
    """Mean characters per answer, with the row count as a second entry."""
    return {"answer_chars": sum(len(p) for p in predictions) / len(predictions), "rows_seen": float(len(rows))}


def first_letter_match(predictions, references, rows):
    return sum(p[:1].lower() == r[:1].lower() for p, r in zip(predictions, references, strict=True)) / len(predictions)


def broken(predictions, references, rows):
    raise ValueError("no score today")


def two_args(predictions, references):
    return 0.0
