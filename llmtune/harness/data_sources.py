"""Where the rows come from: a JSON/JSONL/CSV/parquet file, a folder of split files or a Hub dataset,
split into train and eval as the recipe asks, with a fingerprint of exactly that data.

Each row is a `formats.Row` that knows its number in its file, and every source is screened by
`formats.screen` before the split: bad rows are dropped with a warning, too many of them are an error."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtune.config.sections import DataConfig
from llmtune.errors import DataError
from llmtune.harness.formats import Row, TooManyBadRows, screen

DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
EVAL_SPLIT_NAMES = ("eval", "validation", "valid", "dev", "test")


def _numbered(rows: Any, origin: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, r in enumerate(rows):
        row = Row(r)
        row.number, row.origin = i + 1, origin
        out.append(row)
    return out


def _load_file(path: Path) -> list[dict[str, Any]]:
    kind = DATA_SUFFIXES.get(path.suffix)
    if kind is None:
        raise DataError(f"data file {str(path)!r}: unsupported type {path.suffix!r}; use {', '.join(DATA_SUFFIXES)}")
    if kind == "json":
        rows = _read_json_rows(path)
        if rows is not None:
            return _numbered(rows, path.name)
    from datasets import load_dataset

    ds = load_dataset(kind, data_files=str(path), split="train")
    return _numbered(ds, path.name)


def _read_json_rows(path: Path) -> list[dict[str, Any]] | None:
    """Rows of a JSON-lines or JSON-array file with the standard library: a trial process then never
    imports `datasets` (~2 s) for local data. Keys missing from a row become None, as `datasets` does.
    None when the file is not a list of objects (then `datasets` reads it)."""
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        try:  # one JSON object over several lines (e.g. columns): `datasets` reads those
            json.loads(text)
            return None
        except json.JSONDecodeError:
            pass
        raise DataError(f"data file {str(path)!r} is not valid JSON / JSON lines ({e}); fix the file") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return None
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in keys} for r in rows]


def _split_files(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix in DATA_SUFFIXES and p.stem not in files:
            files[p.stem] = p
    return files


def load_source(source: str, split: str | None) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Rows of ``split`` from a file, a folder of split files, or a Hub dataset, plus the other splits
    a folder offers (so an eval split can be found). Hub loading honours HF_HUB_OFFLINE."""
    from llmtune.builtin.names import resolve_data_source

    resolved = resolve_data_source(source, log=None)
    path = Path(resolved).expanduser()
    if path.is_file():
        return _load_file(path), {}
    if path.is_dir():
        files = _split_files(path)
        want = split or "train"
        if want not in files:
            raise DataError(f"data folder {str(path)!r} has no {want!r} split file; it has {sorted(files) or 'none'}")
        others = {name: f for name, f in files.items() if name != want}
        return _load_file(files[want]), {name: _load_file(f) for name, f in others.items() if name in EVAL_SPLIT_NAMES}
    if path.suffix in DATA_SUFFIXES or resolved.startswith((".", "/", "~")):
        raise DataError(f"data file {resolved!r} does not exist; check data.source")
    from datasets import load_dataset

    try:
        ds = load_dataset(resolved, split=split or "train")
    except Exception as e:  # the Hub client raises many types; one clear message is what helps
        raise DataError(f"could not load Hub dataset {resolved!r} split {split or 'train'!r}: {e}") from None
    return _numbered(ds, f"{resolved} split {split or 'train'}"), {}


@dataclass
class Splits:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    fingerprint: str
    warnings: list[str] = field(default_factory=list)  # rows dropped as bad (`formats.screen`)


def load_splits(cfg: DataConfig) -> Splits:
    """Train and eval rows as the recipe asks, without bad rows, and a fingerprint of exactly that data.

    Raises `TooManyBadRows` (a `DataError`) when more than half the rows of the training or eval source
    are bad."""
    train, others = load_source(cfg.source, cfg.train_split)
    eval_rows: list[dict[str, Any]] | None
    if cfg.eval_source:
        eval_rows, _ = load_source(cfg.eval_source, cfg.eval_split)
    elif cfg.eval_split:
        eval_rows, _ = load_source(cfg.source, cfg.eval_split)  # a split file of a folder, or a Hub split
    elif others:
        eval_rows = others[next(n for n in EVAL_SPLIT_NAMES if n in others)]
    else:
        eval_rows = None  # held out of the training rows, once the bad ones are gone
    train, warnings, problems = screen(train, cfg, "data.source")
    if eval_rows:
        eval_rows, w, p = screen(eval_rows, cfg, "data.eval_source" if cfg.eval_source else "data.source")
        warnings, problems = warnings + w, problems + p
    if problems:
        raise TooManyBadRows(problems)
    if eval_rows is None:
        rows = list(train)
        random.Random(cfg.split_seed).shuffle(rows)
        n_eval = max(1, int(round(len(rows) * cfg.eval_fraction)))
        if n_eval >= len(rows):
            raise DataError(f"data.source has {len(rows)} rows: too few to hold out eval_fraction {cfg.eval_fraction}")
        eval_rows, train = rows[:n_eval], rows[n_eval:]
    if cfg.max_train_examples:
        train = train[: cfg.max_train_examples]
    if cfg.max_eval_examples:
        eval_rows = eval_rows[: cfg.max_eval_examples]
    if not train:
        raise DataError(f"data.source {cfg.source!r} has no training rows")
    if not eval_rows:
        raise DataError("no eval rows; set data.eval_source or data.eval_fraction")
    digest = hashlib.sha256()
    for part in (train, eval_rows):
        for row in part:
            digest.update(json.dumps(row, sort_keys=True, default=str).encode())
        digest.update(b"|")
    return Splits(train, eval_rows, digest.hexdigest()[:16], warnings)
