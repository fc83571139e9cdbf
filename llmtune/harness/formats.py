"""What a data row must hold in each ``data.format``, and what happens to a row that does not: one place,
used by the preflight and by every trial (through `data_sources.load_splits`), so both drop the same rows.

The formats (field names are the defaults; ``data.*_field`` renames them):

- ``text``: ``{"text": "..."}``; loss on every token.
- ``instruction`` (Alpaca): ``{"instruction": "...", "input": "..." (optional), "output": "..."}``; loss on
  the output.
- ``chat``: ``{"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "..."}, ...]}``,
  rendered with the tokenizer's chat template; loss on the assistant turns. Other keys of a message
  (``tool_calls``, ``name``, ``tool_call_id``) go to the template as given. ``messages`` may also be a JSON
  string of that list.

ShareGPT rows (``{"conversations": [{"from": "human" | "gpt" | "system" | "tool", "value": "..."}]}``) are
read by ``chat`` too, detected per message: a message with ``from``/``value`` instead of ``role``/``content``
is mapped (human→user, gpt→assistant, system→system, tool/function/observation→tool), and a row without
``messages`` is read from ``conversations`` (while ``data.messages_field`` is the default). Why not a
``sharegpt`` format of its own: the two shapes cannot be mistaken for each other, they mean the same thing
(a conversation rendered with the chat template), and a second format name would be one more setting a user
has to get right before anything trains — the failure users met was exactly ShareGPT data under the wrong
setting.

The bad-row policy (`screen`): a row is bad when a field its format needs is missing, null or empty, has the
wrong type, or names an unknown role, or when it has no assistant turn while ``data.train_on: completions``
(nothing to learn from). A bad row is never rendered as the text "None": it is dropped, and the drop is
reported (count per reason, the first row numbers, the fix). When more than half the rows of a source are
bad, the data and the recipe disagree (a wrong format or field name, most likely), so nothing is dropped:
that is a problem the preflight reports and the trial refuses.

Rows are numbered from 1 in file order (a JSONL file's line numbers when it has no blank lines), in the split
for Hub datasets.
"""

from __future__ import annotations

import json
from typing import Any

from llmtune.config.sections import DataConfig
from llmtune.errors import DataError, Problem

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}
MAX_BAD_SHARE = 0.5    # more bad rows than this share of a source: a problem, not a drop
SHOWN_ROWS = 5         # row numbers quoted per reason
# Bump when the rendering of a row changes: the token cache keys on it (token_cache.py).
RENDER_VERSION = 2


class Row(dict[str, Any]):
    """A data row that remembers where it came from, so a message can name it ("row 12 of train.jsonl")."""

    number: int = 0
    origin: str = ""


def row_label(row: dict[str, Any]) -> str:
    number, origin = getattr(row, "number", 0), getattr(row, "origin", "")
    if not number:
        return "a data row"
    return f"row {number} of {origin}" if origin else f"row {number}"


class BadRow(DataError):
    """A row its format cannot use. ``reason`` groups rows in reports (it reads after "rows with ..."),
    ``setting`` is the recipe field the fix is about, ``fix`` says what to do."""

    def __init__(self, row: dict[str, Any], reason: str, fix: str, setting: str = "data.source"):
        self.reason, self.fix, self.setting = reason, fix, setting
        super().__init__(f"{row_label(row)} has {reason}; {fix}")


class TooManyBadRows(DataError):
    """More than `MAX_BAD_SHARE` of a source's rows are bad: one `Problem` per source."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# ---------------------------------------------------------------------------------------------- fields


def _fields(row: dict[str, Any]) -> str:
    return ", ".join(k for k, v in row.items() if v is not None) or "none"


def _looks_like(row: dict[str, Any], cfg: DataConfig) -> tuple[str, str] | None:
    """(format, field) when the row looks like another format's data."""
    has = [k for k in (cfg.messages_field, "messages", "conversations") if row.get(k) is not None]
    if has and cfg.format != "chat":
        return "chat", has[0]
    if row.get(cfg.instruction_field) is not None and row.get(cfg.output_field) is not None and cfg.format != "instruction":
        return "instruction", cfg.instruction_field
    if row.get(cfg.text_field) is not None and cfg.format != "text":
        return "text", cfg.text_field
    return None


def _missing(row: dict[str, Any], cfg: DataConfig, name: str, setting: str, what: str) -> BadRow:
    other = _looks_like(row, cfg)
    if other is not None:
        return BadRow(row, f"no '{name}' but a field '{other[1]}'", f"these look like {other[0]} rows; set "
                      f"data.format: {other[0]}", "data.format")
    return BadRow(row, f"no '{name}'", f"give each such row its {what}, or remove it; if the {what} is in another "
                  f"field, set data.{setting} (fields here: {_fields(row)})", f"data.{setting}")


def _text(row: dict[str, Any], cfg: DataConfig, name: str, setting: str, what: str, required: bool = True) -> str:
    value = row.get(name)
    if value is None:
        if not required:
            return ""
        raise _missing(row, cfg, name, setting, what)
    if isinstance(value, (dict, list, tuple)):
        raise BadRow(row, f"a {type(value).__name__} in '{name}', not text", f"give the {what} as a string",
                     f"data.{setting}")
    text = str(value)
    if required and not text.strip():
        raise BadRow(row, f"an empty '{name}'", f"give each such row its {what}, or remove it", f"data.{setting}")
    return text


def parse_text(row: dict[str, Any], cfg: DataConfig) -> str:
    """The text of a ``text`` row."""
    return _text(row, cfg, cfg.text_field, "text_field", "text")


def parse_instruction(row: dict[str, Any], cfg: DataConfig) -> tuple[str, str, str]:
    """(instruction, input, output) of an ``instruction`` row; input may be empty."""
    return (_text(row, cfg, cfg.instruction_field, "instruction_field", "instruction"),
            _text(row, cfg, cfg.input_field, "input_field", "input", required=False),
            _text(row, cfg, cfg.output_field, "output_field", "answer"))


def parse_messages(row: dict[str, Any], cfg: DataConfig) -> tuple[list[dict[str, Any]], str]:
    """The conversation of a ``chat`` row as [{role, content, ...}] with roles from `ROLES`, and how the row
    gave it (for messages: "'messages'", "'conversations' (ShareGPT)", "'messages' as a JSON string")."""
    name = cfg.messages_field
    value = row.get(name)
    if value is None and name == "messages" and row.get("conversations") is not None:
        name, value = "conversations", row["conversations"]
    if value is None:
        raise _missing(row, cfg, cfg.messages_field, "messages_field", "conversation")
    shape = f"'{name}'"
    fix_list = (f"give '{name}' as a list of {{role, content}} messages (or ShareGPT {{from, value}}), "
                "or remove the row")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BadRow(row, f"a '{name}' string that is not JSON", fix_list, f"data.{_messages_setting(name)}") from None
        shape += " as a JSON string"
    if not isinstance(value, list):
        raise BadRow(row, f"a '{name}' that is not a list", fix_list, f"data.{_messages_setting(name)}")
    if not value:
        raise BadRow(row, f"an empty '{name}' list", "give the row its conversation, or remove it")
    messages, sharegpt = [], False
    for msg in value:
        if not isinstance(msg, dict):
            raise BadRow(row, "a message that is not an object", fix_list)
        if msg.get("role") is None and msg.get("from") is not None:
            sharegpt = True
            given, content, extra = msg["from"], msg.get("value"), {}
            role = SHAREGPT_ROLES.get(str(given).lower())
        else:
            given = role = msg.get("role")
            content = msg.get("content")
            extra = {k: v for k, v in msg.items() if k not in ("role", "content") and v is not None}
        if given is None:
            raise BadRow(row, "a message without a role", "give every message a role (system, user, assistant, "
                         "tool) or a ShareGPT 'from'")
        if role not in ROLES:
            meant = SHAREGPT_ROLES.get(str(given).lower()) if not sharegpt else None
            hint = f"role {meant!r} ({given!r} is a ShareGPT name, given with 'from' and 'value')" if meant else \
                f"the roles {', '.join(ROLES)} (ShareGPT: {', '.join(SHAREGPT_ROLES)})"
            raise BadRow(row, f"the unknown role {given!r}", f"use {hint}, or remove the row")
        if content is None and extra.get("tool_calls"):
            content = ""  # an assistant turn that only calls a tool (OpenAI style: content null)
        if content is None:
            raise BadRow(row, "a message without content", "give every message its content (or ShareGPT 'value'), "
                         "or remove the row")
        if not isinstance(content, str):
            raise BadRow(row, "message content that is not text", "give each message's content as a string "
                         "(content parts are for multimodal models)")
        messages.append({"role": role, "content": content, **extra})
    return messages, shape + (" (ShareGPT)" if sharegpt else "")


def _messages_setting(name: str) -> str:
    return "messages_field" if name != "conversations" else "format"


def check(row: dict[str, Any], cfg: DataConfig) -> BadRow | None:
    """Why this row cannot be trained on as the recipe says, or None."""
    try:
        if cfg.format == "text":
            parse_text(row, cfg)
        elif cfg.format == "instruction":
            parse_instruction(row, cfg)
        else:
            messages, _ = parse_messages(row, cfg)
            if cfg.train_on == "completions" and not any(m["role"] == "assistant" for m in messages):
                return BadRow(row, "no assistant turn", "add the answer as an assistant turn, or remove the row "
                              "(data.train_on: all trains on the whole conversation)")
    except BadRow as e:
        return e
    return None


# ---------------------------------------------------------------------------------------------- policy


def _numbers(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:SHOWN_ROWS])
    more = len(numbers) - SHOWN_ROWS
    return f"row{'s' if len(numbers) > 1 else ''} {shown}" + (f" and {more} more" if more > 0 else "")


def screen(rows: list[dict[str, Any]], cfg: DataConfig, where: str) -> tuple[list[dict[str, Any]], list[str], list[Problem]]:
    """The rows to train on, a warning per reason rows were dropped for, and the problem when too many are bad.

    ``where`` is the recipe field the rows come from (data.source, data.eval_source)."""
    kept: list[dict[str, Any]] = []
    bad: dict[str, list[int]] = {}
    first: dict[str, BadRow] = {}
    for i, row in enumerate(rows):
        problem = check(row, cfg)
        if problem is None:
            kept.append(row)
            continue
        bad.setdefault(problem.reason, []).append(getattr(row, "number", 0) or i + 1)
        first.setdefault(problem.reason, problem)
    if not bad:
        return kept, [], []
    origin = getattr(rows[0], "origin", "")
    of = f" of {origin}" if origin else ""
    reasons = sorted(bad, key=lambda r: -len(bad[r]))
    n_bad = len(rows) - len(kept)
    if n_bad > MAX_BAD_SHARE * len(rows):
        parts = "; ".join(f"{len(bad[r])} with {r} ({_numbers(bad[r])}): {first[r].fix}" for r in reasons)
        return kept, [], [Problem(first[reasons[0]].setting, f"{n_bad} of {len(rows)} rows{of} ({where}) are bad, "
                                  f"more than half, so llmtune stops instead of dropping them: {parts}")]
    warnings = [f"{where}: dropped {len(bad[r])} of {len(rows)} rows{of} with {r} ({_numbers(bad[r])}); "
                f"{first[r].fix}" for r in reasons]
    return kept, warnings, []
