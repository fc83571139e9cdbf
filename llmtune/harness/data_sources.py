"""Where the rows come from: a JSON/JSONL/CSV/parquet file, a folder of split files or a Hub dataset,
split into train and eval as the recipe asks, with a fingerprint of exactly that data.

Each row is a `formats.Row` that knows its number in its file, and every source is screened by
`formats.screen` before the split: bad rows are dropped with a warning, too many of them are an error."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtune.builtin.cache import llmtune_home
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


# Compressed files: `datasets` could read some, but the preflight and the trials read rows with the standard
# library (`_read_json_rows`), so they are refused with how to decompress them.
COMPRESSED = {".gz": "gunzip -c", ".bz2": "bunzip2 -c", ".xz": "unxz -c", ".zst": "unzstd -c", ".zip": "unzip -p"}
MAGIC = {b"\x1f\x8b": ".gz", b"BZh": ".bz2", b"\xfd7zXZ\x00": ".xz", b"\x28\xb5\x2f\xfd": ".zst", b"PK\x03\x04": ".zip"}


def _not_a_regular_path(path: Path, field: str) -> str | None:
    """Why ``path`` exists but is neither a file nor a folder llmtune can read (a broken or looping symbolic
    link, a named pipe, a device), or None."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError as e:
        if not path.is_symlink():
            return None  # it does not exist: said where it was looked for
        import errno

        if e.errno == errno.ELOOP:
            return f"data source {str(path)!r} is a symbolic link loop (it leads back to itself); point {field} at the file"
        return (f"data source {str(path)!r} is a symbolic link to {os.readlink(path)!r}, which does not exist; "
                f"fix the link, or point {field} at the file")
    if stat.S_ISFIFO(mode):
        return (f"data source {str(path)!r} is a named pipe (FIFO), not a file: the data is read once by the check "
                f"and again by every trial, and a pipe gives it only once; write it to a file and point {field} there")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return f"data source {str(path)!r} is a device or socket, not a file; point {field} at a data file"
    return None


def _compressed(path: Path, how: str, field: str) -> DataError:
    """``how``: the compression's suffix (from the name, or from the file's first bytes)."""
    inner = path.name.removesuffix(how) if path.suffix == how else f"{path.stem}-plain{path.suffix}"
    return DataError(f"data file {str(path)!r} is compressed ({how.lstrip('.')}); decompress it "
                     f"({COMPRESSED[how]} {path.name} > {inner}) and point {field} at {inner!r}", field=field)


def _load_file(path: Path, field: str = "data.source") -> list[dict[str, Any]]:
    kind = DATA_SUFFIXES.get(path.suffix)
    if path.suffix in COMPRESSED:
        raise _compressed(path, path.suffix, field)
    if kind is None:
        raise DataError(f"data file {str(path)!r} has the unsupported type {path.suffix or '(no suffix)'!r}; "
                        f"use one of {', '.join(DATA_SUFFIXES)}", field=field)
    rows: list[dict[str, Any]] | None = None
    if kind in ("json", "csv"):
        text = _utf8_text(path, field)
        if not text.strip():
            rows = []
        elif kind == "json":
            rows = _read_json_rows(path, text, field)
    if rows is None:
        rows = _read_with_datasets(path, kind, field)
    if not rows:
        raise DataError(f"data file {str(path)!r} has no rows; give one row per line, e.g. {EXAMPLE_ROW}", field=field)
    return _numbered(rows, path.name)


def _read_with_datasets(path: Path, kind: str, field: str) -> list[dict[str, Any]]:
    from datasets import load_dataset
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    # `datasets` logs a failure itself (traceback and all) and draws a progress bar: the message is ours alone
    logger = logging.getLogger("datasets")
    level, bars = logger.level, not are_progress_bars_disabled()
    logger.setLevel(logging.CRITICAL)
    disable_progress_bars()
    try:
        # its Arrow cache under $LLMTUNE_HOME (not ~/.cache/huggingface): reading a file for `validate` or a
        # trial leaves nothing outside llmtune's own cache; HF_DATASETS_CACHE, when set, wins
        cache = None if os.environ.get("HF_DATASETS_CACHE") else str(llmtune_home() / "datasets")
        return list(load_dataset(kind, data_files=str(path), split="train", cache_dir=cache))
    except Exception as e:  # pyarrow, pandas and datasets each raise their own types: say which file and why
        root: BaseException = e
        while root.__cause__ is not None or root.__context__ is not None:  # the parser's own words
            root = root.__cause__ or root.__context__  # type: ignore[assignment]
        why = " ".join(str(root).split())[:300]
        raise DataError(f"data file {str(path)!r} cannot be read as {KIND_NAMES[kind]} ({type(root).__name__}: {why}); "
                        "fix the file, or give the rows as JSON lines", field=field) from None
    finally:
        logger.setLevel(level)
        if bars:
            enable_progress_bars()


KIND_NAMES = {"json": "JSON", "csv": "CSV", "parquet": "Parquet"}
EXAMPLE_ROW = '{"instruction": "...", "output": "..."}'


def _utf8_text(path: Path, field: str) -> str:
    data = path.read_bytes()
    packed = next((suffix for magic, suffix in MAGIC.items() if data.startswith(magic)), None)
    if packed:
        raise _compressed(path, packed, field)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"data file {str(path)!r} is not UTF-8 text: line {line} has the byte 0x{data[e.start]:02x}; "
                        "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 OLD > NEW)", field=field) from None


def _what(value: Any) -> str:
    return {"int": "a number", "float": "a number", "str": "a string", "list": "a list", "bool": "true or false",
            "NoneType": "null"}.get(type(value).__name__, type(value).__name__)


def _read_json_rows(path: Path, text: str, field: str) -> list[dict[str, Any]] | None:
    """Rows of a JSON-lines or JSON-array file with the standard library: a trial process then never
    imports `datasets` (~2 s) for local data. Keys missing from a row become None, as `datasets` does.
    None when the file is one JSON object of columns (then `datasets` reads it)."""
    if text.lstrip().startswith("[") and not _lines_of_json(text):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"data file {str(path)!r} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; "
                            "fix the file", field=field) from None
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"data file {str(path)!r}: item {i + 1} of its array is {_what(row)} ({type(row).__name__}), "
                                f"not an object; each row is an object like {EXAMPLE_ROW}", field=field)
    else:
        rows = []
        for number, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a string
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if _one_object(text):
                    return None  # one JSON object over several lines (e.g. columns): `datasets` reads those
                raise DataError(f"data file {str(path)!r}: line {number} is not valid JSON ({e.msg} at column {e.colno}); "
                                "fix the file, or remove that line", field=field) from None
            if not isinstance(row, dict):
                raise DataError(f"data file {str(path)!r}: line {number} holds {_what(row)} ({type(row).__name__}), not "
                                f"a JSON object; give one row per line, like {EXAMPLE_ROW}", field=field)
            rows.append(row)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in keys} for r in rows]


def _lines_of_json(text: str) -> bool:
    """Whether the first line is a whole JSON value of its own (JSON lines, not one JSON array)."""
    first = text.lstrip().split("\n", 1)
    if len(first) < 2 or not first[1].strip():
        return False
    try:
        json.loads(first[0])
        return True
    except json.JSONDecodeError:
        return False


def _one_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _split_files(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix in DATA_SUFFIXES and p.stem not in files:
            files[p.stem] = p
    return files


def load_source(source: str, split: str | None, field: str = "data.source",
                split_field: str = "data.train_split") -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Rows of ``split`` from a file, a folder of split files, or a Hub dataset, plus the other splits
    a folder offers (so an eval split can be found). Hub loading honours HF_HUB_OFFLINE. Errors name
    ``field``, the recipe field that gave the source (and ``split_field``, the one that gave the split)."""
    from llmtune.builtin.names import resolve_data_source

    resolved = resolve_data_source(source, log=None)
    path = Path(resolved).expanduser()
    odd = _not_a_regular_path(path, field)
    if odd:
        raise DataError(odd, field=field)
    if path.is_file():
        return _load_file(path, field), {}
    if path.is_dir():
        files = _split_files(path)
        want = split or "train"
        if want not in files:
            raise DataError(f"data folder {str(path)!r} has no {want!r} split file ({split_field}: {want!r}); it has "
                            f"{', '.join(map(repr, sorted(files))) or 'no data files'}; name the file {want}.jsonl, or "
                            f"set {split_field}", field=field)
        others = {name: f for name, f in files.items() if name != want}
        return _load_file(files[want], field), {name: _load_file(f, field) for name, f in others.items()
                                                 if name in EVAL_SPLIT_NAMES}
    if path.suffix in DATA_SUFFIXES or path.suffix in COMPRESSED or resolved.startswith((".", "/", "~")):
        where = "" if path.is_absolute() else f" (looked for {str(path.absolute())!r}: a relative path is read from " \
                                              "the folder the command runs in)"
        raise DataError(f"data file {resolved!r} does not exist{where}; check {field}", field=field)
    from datasets import load_dataset

    try:
        ds = load_dataset(resolved, split=split or "train")
    except Exception as e:  # the Hub client raises many types; one clear message is what helps
        why = " ".join(str(e).split())[:300]
        raise DataError(f"could not load Hub dataset {resolved!r} split {split or 'train'!r} ({type(e).__name__}: "
                        f"{why}); check the name, or give a local file", field=field) from None
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
        eval_rows, _ = load_source(cfg.eval_source, cfg.eval_split, "data.eval_source", "data.eval_split")
    elif cfg.eval_split:  # a split file of a folder, or a Hub split
        eval_rows, _ = load_source(cfg.source, cfg.eval_split, "data.source", "data.eval_split")
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
            raise DataError(f"{len(rows)} usable row{'s' if len(rows) != 1 else ''} in {cfg.source!r}: too few to hold "
                            f"out data.eval_fraction {cfg.eval_fraction} for eval and train on the rest; give more rows, "
                            "or set data.eval_source to a separate eval file", field="data.source")
        eval_rows, train = rows[:n_eval], rows[n_eval:]
    if cfg.max_train_examples:
        train = train[: cfg.max_train_examples]
    if cfg.max_eval_examples:
        eval_rows = eval_rows[: cfg.max_eval_examples]
    if not train:
        raise DataError(f"{cfg.source!r} has no training rows", field="data.source")
    if not eval_rows:
        raise DataError("no eval rows; set data.eval_source or data.eval_fraction", field="data.eval_source")
    digest = hashlib.sha256()
    for part in (train, eval_rows):
        for row in part:
            digest.update(json.dumps(row, sort_keys=True, default=str).encode())
        digest.update(b"|")
    return Splits(train, eval_rows, digest.hexdigest()[:16], warnings)
