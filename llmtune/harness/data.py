"""Data: load rows, render prompts, tokenize with loss masks, and plan the training batches.

Two rules keep trials comparable (ARCHITECTURE decision 4):
  - eval examples are cut to ``eval_max_length`` for every trial, whatever its ``sequence_len``;
  - the budget counts tokens, examples or epochs, so micro batch size and packing do not change how
    much data a trial sees. The whole plan of batches is built before training, so the scheduler
    knows the exact number of optimizer steps.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtune.config.recipe import Budget, DataConfig
from llmtune.errors import DataError

IGNORE = -100
INSTRUCTION_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
INSTRUCTION_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
EVAL_SPLIT_NAMES = ("eval", "validation", "valid", "dev", "test")


# ------------------------------------------------------------------------------------------- loading


def _load_file(path: Path) -> list[dict[str, Any]]:
    kind = DATA_SUFFIXES.get(path.suffix)
    if kind is None:
        raise DataError(f"data file {str(path)!r}: unsupported type {path.suffix!r}; use {', '.join(DATA_SUFFIXES)}")
    if kind == "json":
        rows = _read_json_rows(path)
        if rows is not None:
            return rows
    from datasets import load_dataset

    ds = load_dataset(kind, data_files=str(path), split="train")
    return [dict(r) for r in ds]


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
    from llmtune.builtin.tiny import resolve_data_source

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
    return [dict(r) for r in ds], {}


@dataclass
class Splits:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    fingerprint: str


def load_splits(cfg: DataConfig) -> Splits:
    """Train and eval rows as the recipe asks, and a fingerprint of exactly that data."""
    train, others = load_source(cfg.source, cfg.train_split)
    if cfg.eval_source:
        eval_rows, _ = load_source(cfg.eval_source, cfg.eval_split)
    elif cfg.eval_split:
        eval_rows, _ = load_source(cfg.source, cfg.eval_split)  # a split file of a folder, or a Hub split
    elif others:
        eval_rows = others[next(n for n in EVAL_SPLIT_NAMES if n in others)]
    else:
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
    return Splits(train, eval_rows, digest.hexdigest()[:16])


# ------------------------------------------------------------------------------- rendering, tokenizing


def segments(row: dict[str, Any], cfg: DataConfig, tokenizer: Any) -> list[tuple[str, bool]]:
    """An example as (text, is_completion) pieces; loss goes on completion pieces."""
    def need(name: str) -> Any:
        if name not in row:
            raise DataError(f"data row has no field {name!r} (fields: {sorted(row)}); set data.{_field_setting(cfg, name)}")
        return row[name]

    eos = tokenizer.eos_token or ""
    if cfg.format == "text":
        return [(str(need(cfg.text_field)) + eos, True)]
    if cfg.format == "instruction":
        instruction = str(need(cfg.instruction_field))
        inp = row.get(cfg.input_field) or ""
        template = INSTRUCTION_PROMPT if inp else INSTRUCTION_PROMPT_NO_INPUT
        return [(template.format(instruction=instruction, input=inp), False), (str(need(cfg.output_field)) + eos, True)]
    messages = need(cfg.messages_field)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data.format is chat but the tokenizer has no chat template; use format: instruction or a chat model")
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError("the chat template does not render conversations prefix by prefix; loss masking per turn is not possible (use data.train_on: all)")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return pieces or [(tokenizer.apply_chat_template(messages, tokenize=False), False)]


def _field_setting(cfg: DataConfig, name: str) -> str:
    for setting in ("text_field", "instruction_field", "input_field", "output_field", "messages_field"):
        if getattr(cfg, setting) == name:
            return setting
    return "format"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(row: dict[str, Any], cfg: DataConfig, tokenizer: Any, max_len: int) -> Example:
    """Tokenize one row, masking prompt tokens when training on completions, cut to max_len."""
    return _encode_rows([row], cfg, tokenizer, max_len)[0]


def _encode_rows(rows: list[dict[str, Any]], cfg: DataConfig, tokenizer: Any, max_len: int) -> list[Example]:
    # Every piece of every row goes to the tokenizer in one call: a fast tokenizer batches it natively,
    # several times quicker than a call per piece, with the same ids.
    pieces = [segments(r, cfg, tokenizer) for r in rows]
    flat = [text for row in pieces for text, _ in row]
    encoded = iter(_token_ids(tokenizer, flat) if flat else [])
    bos = tokenizer.bos_token_id if cfg.format != "chat" else None
    out = []
    for row in pieces:
        ids: list[int] = [] if bos is None else [bos]
        labels: list[int] = [] if bos is None else [IGNORE]
        for _, is_completion in row:
            piece = list(next(encoded))
            ids += piece
            labels += piece if (is_completion or cfg.train_on == "all") else [IGNORE] * len(piece)
        out.append(Example(ids[:max_len], labels[:max_len], len(ids) > max_len))
    return out


def _token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and backend.truncation is None and backend.padding is None:
        # The Rust tokenizer directly: the same ids, without building an offsets/mask dict per text
        # (that conversion costs as much as tokenizing).
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_all(rows: list[dict[str, Any]], cfg: DataConfig, tokenizer: Any, max_len: int) -> tuple[list[Example], int]:
    """Encoded examples that still carry a trainable token after truncation, and how many were dropped."""
    out = _encode_rows(rows, cfg, tokenizer, max_len)
    kept = [e for e in out if any(t != IGNORE for t in e.labels[1:])]
    return kept, len(out) - len(kept)


def prompt_ids(row: dict[str, Any], cfg: DataConfig, tokenizer: Any, max_len: int) -> list[int]:
    """The prompt part of a row (for latency measurement): everything before the first completion."""
    ids: list[int] = [tokenizer.bos_token_id] if (cfg.format != "chat" and tokenizer.bos_token_id is not None) else []
    for text, is_completion in segments(row, cfg, tokenizer):
        if is_completion and cfg.format != "text":
            break
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if cfg.format == "text":
            ids = ids[: max(4, len(ids) // 2)]  # plain text: continue from its first half
            break
    return ids[-max_len:]


# --------------------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """One micro batch, as plain lists (tensors are made at train time)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]] | None   # set for packed rows: restarting positions mark boundaries
    attention_mask: list[list[int]] | None  # set for padded rows
    real_tokens: int                        # non-padding tokens
    label_tokens: int                       # tokens that carry loss (after the shift)
    examples: int

    @property
    def slots(self) -> int:
        return sum(len(r) for r in self.input_ids)


def _pad_batch(examples: list[Example], pad_id: int) -> Batch:
    width = max(len(e) for e in examples)
    ids, labels, mask = [], [], []
    for e in examples:
        pad = width - len(e)
        ids.append(e.input_ids + [pad_id] * pad)
        labels.append(e.labels + [IGNORE] * pad)
        mask.append([1] * len(e) + [0] * pad)
    return Batch(ids, labels, None, mask, sum(len(e) for e in examples),
                 sum(sum(1 for t in e.labels[1:] if t != IGNORE) for e in examples), len(examples))


def _packed_batch(rows: list[list[Example]], pad_id: int) -> Batch:
    """Rows of concatenated examples; position ids restart per example so attention stays inside it.

    The first token of each example gets no loss: after the shift it would be predicted from the
    previous example. That keeps the loss identical to training the examples one by one.
    """
    width = max(sum(len(e) for e in row) for row in rows)
    ids, labels, positions = [], [], []
    real = label_tokens = n = 0
    for row in rows:
        r_ids: list[int] = []
        r_labels: list[int] = []
        r_pos: list[int] = []
        for e in row:
            r_ids += e.input_ids
            r_labels += [IGNORE] + e.labels[1:]
            r_pos += list(range(len(e)))
            real += len(e)
            label_tokens += sum(1 for t in e.labels[1:] if t != IGNORE)
            n += 1
        pad = width - len(r_ids)
        # Padding forms its own pseudo-example (positions from 0) so no real token attends to it.
        ids.append(r_ids + [pad_id] * pad)
        labels.append(r_labels + [IGNORE] * pad)
        positions.append(r_pos + list(range(pad)))
    return Batch(ids, labels, positions, None, real, label_tokens, n)


def _example_stream(examples: list[Example], seed: int) -> Iterator[tuple[int, Example]]:
    """Endless shuffled passes over the data: (epoch, example)."""
    order = list(range(len(examples)))
    epoch = 0
    while True:
        random.Random(seed + epoch).shuffle(order)
        for i in order:
            yield epoch, examples[i]
        epoch += 1


@dataclass
class Plan:
    """Every micro batch of a trial, grouped into optimizer steps, with budget progress per step."""

    steps: list[list[Batch]] = field(default_factory=list)
    progress: list[float] = field(default_factory=list)  # fraction of the budget done after each step

    @property
    def micro_batches(self) -> list[Batch]:
        return [b for step in self.steps for b in step]

    def totals(self) -> dict[str, int]:
        mbs = self.micro_batches
        return {"steps": len(self.steps), "micro_batches": len(mbs), "real_tokens": sum(b.real_tokens for b in mbs),
                "slots": sum(b.slots for b in mbs), "examples": sum(b.examples for b in mbs),
                "label_tokens": sum(b.label_tokens for b in mbs)}

    def step_at(self, fraction: float) -> int:
        """Index of the first step after which at least `fraction` of the budget is done."""
        for i, p in enumerate(self.progress):
            if p >= fraction - 1e-9:
                return i
        return len(self.progress) - 1


def plan_batches(examples: list[Example], *, budget: Budget, micro_batch_size: int, grad_accum: int,
                 sequence_len: int, packing: bool, pad_id: int, seed: int) -> Plan:
    """Lay out the whole training run before it starts."""
    if not examples:
        raise DataError("no training example keeps a trainable token at this sequence_len")
    kind = budget.kind
    total = budget.amount * (len(examples) if kind == "epochs" else 1)  # epochs are counted in examples
    unit = "examples" if kind in ("examples", "epochs") else "tokens"

    stream = _example_stream(examples, seed)
    plan = Plan()
    done = 0.0
    step: list[Batch] = []
    pending: Example | None = None
    while done < total:
        units = 0  # budget units taken into this micro batch so far
        if packing:
            rows: list[list[Example]] = []
            for _ in range(micro_batch_size):
                row: list[Example] = []
                used = 0
                while done + units < total:
                    e = pending if pending is not None else next(stream)[1]
                    pending = None
                    if row and used + len(e) > sequence_len:
                        pending = e  # does not fit: opens the next row
                        break
                    row.append(e)
                    used += len(e)
                    units += _units(e, unit)
                if row:
                    rows.append(row)
                if done + units >= total:
                    break
            batch = _packed_batch(rows, pad_id)
        else:
            chosen: list[Example] = []
            while len(chosen) < micro_batch_size and done + units < total:
                chosen.append(next(stream)[1])
                units += _units(chosen[-1], unit)
            batch = _pad_batch(chosen, pad_id)
        done += batch.examples if unit == "examples" else batch.real_tokens
        step.append(batch)
        if len(step) == grad_accum or done >= total:
            plan.steps.append(step)
            plan.progress.append(min(1.0, done / total))
            step = []
    return plan


def _units(e: Example, unit: str) -> int:
    return 1 if unit == "examples" else len(e)


def eval_batches(examples: list[Example], batch_size: int, pad_id: int) -> list[Batch]:
    """Fixed eval batches; losses are summed per token, so batch size and order do not change the result.

    Examples are grouped by length (stable sort) so a batch pads little: on variable-length data this
    cuts the padded slots of every eval by a third or more, for the same eval tokens.
    """
    ordered = sorted(examples, key=len)
    return [_pad_batch(ordered[i: i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)]


def padding_share(plan: Plan) -> float:
    t = plan.totals()
    return 0.0 if not t["slots"] else 1 - t["real_tokens"] / t["slots"]


