"""Data: render prompts, tokenize with loss masks, and plan the training batches (the rows come from
`llmtune.harness.data_sources`; what a row of each format holds is in `llmtune.harness.formats`).

Two rules keep trials comparable (ARCHITECTURE decision 4):
  - eval examples are cut to ``eval_max_length`` for every trial, whatever its ``sequence_len``;
  - the budget counts tokens, examples or epochs, and an optimizer step counts examples
    (``batch_size``), so micro batch size and packing change neither how much data a trial sees nor
    which examples each step learns from. The whole plan of batches is built before training, so the
    scheduler knows the exact number of optimizer steps.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from llmtune.config.sections import Budget, DataConfig
from llmtune.errors import DataError
from llmtune.harness import formats as F

IGNORE = -100
INSTRUCTION_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
INSTRUCTION_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


# ------------------------------------------------------------------------------- rendering, tokenizing


def segments(row: dict[str, Any], cfg: DataConfig, tokenizer: Any) -> list[tuple[str, bool]]:
    """An example as (text, is_completion) pieces; loss goes on completion pieces.

    What a row must hold is `formats`' business (a bad row raises `formats.BadRow`, a `DataError`)."""
    eos = tokenizer.eos_token or ""
    if cfg.format == "text":
        return [(F.parse_text(row, cfg) + eos, True)]
    if cfg.format == "instruction":
        instruction, inp, output = F.parse_instruction(row, cfg)
        template = INSTRUCTION_PROMPT if inp else INSTRUCTION_PROMPT_NO_INPUT
        return [(template.format(instruction=instruction, input=inp), False), (output + eos, True)]
    messages, shape = F.parse_messages(row, cfg)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data.format is chat but the tokenizer has no chat template; use format: instruction or a chat model")

    def render(part: list[dict[str, Any]], **kwargs: Any) -> str:
        try:
            return str(tokenizer.apply_chat_template(part, tokenize=False, **kwargs))
        except Exception as e:  # the template is the model's code: whatever it raises, say which row and why
            raise template_refused(row, messages, shape, tokenizer, e) from None

    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = render(messages[:i], add_generation_prompt=True)
        full = render(messages[: i + 1])
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(f"{F.row_label(row)} (data.format: chat): the chat template does not render conversations "
                            "prefix by prefix; loss masking per turn is not possible (use data.train_on: all)")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return pieces or [(render(messages), False)]


class TemplateRefused(DataError):
    """The tokenizer's chat template raised on a row; ``why`` is what it said."""

    def __init__(self, message: str, why: str):
        self.why = why
        super().__init__(message)


def template_refused(row: dict[str, Any], messages: list[dict[str, Any]], shape: str, tokenizer: Any,
                     error: Exception) -> TemplateRefused:
    """The error for a chat template that raised on this row: the row, the format, what the template said."""
    why = " ".join(str(error).split())[:300] or type(error).__name__
    where = f"{F.row_label(row)} (data.format: chat, messages from {shape})"
    model = getattr(tokenizer, "name_or_path", "") or "the model"
    without_tools = [m for m in messages if m["role"] != "tool"]
    if len(without_tools) < len(messages):
        try:
            tokenizer.apply_chat_template(without_tools, tokenize=False)
        except Exception:  # it fails for another reason too: say what the template said
            pass
        else:
            return TemplateRefused(f"{where} has a 'tool' turn, and the chat template of {model} does not accept the "
                                   f"'tool' role (it says: {why}); remove the tool turns from the data, or use a "
                                   "model whose chat template takes tool messages", why)
    return TemplateRefused(f"{where}: the chat template of {model} refused it (it says: {why}); change the row "
                           "to what the template accepts, remove it, or use a model whose template takes it", why)


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
        return [list(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]
    ids: list[list[int]] = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return ids


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


def plan_batches(examples: list[Example], *, budget: Budget, batch_size: int, micro_batch_size: int,
                 sequence_len: int, packing: bool, pad_id: int, seed: int) -> Plan:
    """Lay out the whole training run before it starts.

    An optimizer step takes the next ``batch_size`` examples of the shuffled stream (fewer only where
    the budget ends): that is what the model learns from, the same for every layout. How a step's
    examples are laid out is execution only (longest first, `_lay_out`): rows of ``micro_batch_size``
    padded examples, or (packing) rows of concatenated examples up to ``sequence_len`` tokens,
    ``micro_batch_size`` rows a forward pass. A step's loss is averaged over its label tokens whatever the layout, so packing, micro batch
    size and gradient checkpointing give the same learning curve (tests/test_execution.py).
    """
    if not examples:
        raise DataError("no training example keeps a trainable token at this sequence_len")
    kind = budget.kind
    total = budget.amount * (len(examples) if kind == "epochs" else 1)  # epochs are counted in examples
    unit = "examples" if kind in ("examples", "epochs") else "tokens"

    stream = _example_stream(examples, seed)
    plan = Plan()
    done = 0
    while done < total:
        chosen: list[Example] = []
        while len(chosen) < batch_size and done < total:
            chosen.append(next(stream)[1])
            done += _units(chosen[-1], unit)
        plan.steps.append(_lay_out(chosen, micro_batch_size, sequence_len, packing, pad_id))
        plan.progress.append(min(1.0, done / total))
    return plan


def _lay_out(examples: list[Example], micro_batch_size: int, sequence_len: int, packing: bool,
             pad_id: int) -> list[Batch]:
    """One step's examples as micro batches, laid out to waste few slots.

    Which examples the step learns from is already decided (`plan_batches`); only their layout is chosen
    here, longest first: padded micro batches then hold examples of similar length (on variable-length
    data this halves the padded slots; the longest micro batch, which sets the peak memory, is the same
    as in any order), and packed rows are filled first-fit decreasing (fewer, fuller rows). The step's loss
    is the sum over its label tokens divided by their count, so the layout changes only float rounding (and,
    where the base model has dropout of its own, as GPT-2's config does, which tokens its masks hit).
    """
    ordered = sorted(examples, key=len, reverse=True)  # stable: ties keep the stream's order
    if not packing:
        return [_pad_batch(ordered[i: i + micro_batch_size], pad_id) for i in range(0, len(ordered), micro_batch_size)]
    rows: list[list[Example]] = []
    free: list[int] = []  # room left in each row
    for e in ordered:  # every example fits an empty row: it was cut to sequence_len
        r = next((r for r, room in enumerate(free) if len(e) <= room), len(rows))
        if r == len(rows):
            rows.append([])
            free.append(sequence_len)
        rows[r].append(e)
        free[r] -= len(e)
    rows.sort(key=lambda row: sum(len(e) for e in row), reverse=True)  # rows of similar width share a micro batch
    return [_packed_batch(rows[i: i + micro_batch_size], pad_id) for i in range(0, len(rows), micro_batch_size)]


def _units(e: Example, unit: str) -> int:
    return 1 if unit == "examples" else len(e)


def eval_batches(examples: list[Example], batch_size: int, pad_id: int) -> list[Batch]:
    """Fixed eval batches; losses are summed per token, so batch size and order do not change the result.

    Examples are grouped by length (stable sort) so a batch pads little: on variable-length data this
    cuts the padded slots of every eval by a third or more, for the same eval tokens.
    """
    ordered = sorted(examples, key=len)
    batches = [_pad_batch(ordered[i: i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)]
    if not sum(b.label_tokens for b in batches):  # a loss over no tokens would read 0 and win the search
        raise DataError("no eval example keeps an answer token within data.eval_max_length (every eval prompt is "
                        "as long or longer), so there is no eval loss to compute; raise data.eval_max_length",
                        field="data.eval_max_length")
    return batches


def padding_share(plan: Plan) -> float:
    t = plan.totals()
    return 0.0 if not t["slots"] else 1 - t["real_tokens"] / t["slots"]
