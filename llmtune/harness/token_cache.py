"""Tokenized data, kept on disk for the next trial of the same search.

Every trial tokenizes the same rows with the same tokenizer; only the cut to ``sequence_len`` differs,
and only a few lengths are searched. On a real data set that is seconds to minutes a trial, so the
first trial with a given (data, format, tokenizer, length) writes its examples under
``<output_dir>/.cache/tokens/`` and the later ones read them (milliseconds). The key covers everything
the encoding depends on: the data's fingerprint, the data section of the recipe, the tokenizer's whole
definition (vocabulary, merges, normalizer, template, special tokens), the length and the version of the
rendering (`formats.RENDER_VERSION`), so a changed input is a new file, never a stale read. Files are
plain integer arrays (``.npz``, no pickle) written atomically; a file that cannot be read is encoded
again. Slow (Python) tokenizers are not cached: their definition has no cheap, complete fingerprint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from llmtune.config.sections import DataConfig
from llmtune.harness.data import Example, encode_all
from llmtune.harness.formats import RENDER_VERSION


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """A hash of everything the tokenizer's ids depend on, or None where that is not known cheaply.

    Kept on the tokenizer: a trial asks for its train and eval splits, and serializing a large
    vocabulary takes ~0.1 s."""
    if hasattr(tokenizer, "_llmtune_fingerprint"):
        return str(tokenizer._llmtune_fingerprint) if tokenizer._llmtune_fingerprint else None
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    fingerprint = None
    if backend is not None:
        special = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        parts = [backend.to_str(), json.dumps(special), str(getattr(tokenizer, "chat_template", None))]
        fingerprint = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    tokenizer._llmtune_fingerprint = fingerprint
    return fingerprint


def encode_cached(rows: list[dict[str, Any]], cfg: DataConfig, tokenizer: Any, max_len: int, *, cache_dir: Path | None,
                  data_fingerprint: str, split: str) -> tuple[list[Example], int]:
    """`encode_all`, read from ``cache_dir`` when an earlier trial wrote the same encoding there."""
    tok = tokenizer_fingerprint(tokenizer) if cache_dir is not None else None
    if cache_dir is None or tok is None:
        return encode_all(rows, cfg, tokenizer, max_len)
    key = json.dumps({"data": data_fingerprint, "cfg": asdict(cfg), "tokenizer": tok, "max_len": max_len,
                      "rows": len(rows), "split": split, "render": RENDER_VERSION}, sort_keys=True, default=str)
    path = cache_dir / f"{split}-{max_len}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"
    cached = _read(path)
    if cached is not None:
        return cached
    examples, dropped = encode_all(rows, cfg, tokenizer, max_len)
    _write(path, examples, dropped)
    return examples, dropped


def _read(path: Path) -> tuple[list[Example], int] | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            ids, labels, lengths, truncated, dropped = f["ids"], f["labels"], f["lengths"], f["truncated"], int(f["dropped"])
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # absent, or cut short: encode again
        return None
    ends = np.cumsum(lengths)
    starts = ends - lengths
    ids_list, labels_list = ids.tolist(), labels.tolist()
    return [Example(ids_list[a:b], labels_list[a:b], bool(t)) for a, b, t in zip(starts.tolist(), ends.tolist(), truncated.tolist(), strict=True)], dropped


def _write(path: Path, examples: list[Example], dropped: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            # int32: token ids (and the -100 label mask) fit, at half the disk of int64
            np.savez(f, ids=np.array([t for e in examples for t in e.input_ids], dtype=np.int32),
                     labels=np.array([t for e in examples for t in e.labels], dtype=np.int32),
                     lengths=np.array([len(e.input_ids) for e in examples], dtype=np.int64),
                     truncated=np.array([e.truncated for e in examples], dtype=bool), dropped=np.array(dropped))
        os.replace(tmp, path)  # atomic: a parallel trial reads the whole file or none
    except OSError:  # a read-only or full disk costs speed, never the trial
        with contextlib.suppress(OSError):
            tmp.unlink()
