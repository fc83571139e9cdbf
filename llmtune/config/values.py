"""Reading one plain value (from YAML, ``--set`` or a JSON spec) as a bool, a whole number, a number or text.

The one coercer of the recipe's fields (`llmtune.config.recipe`), the searchable settings
(`llmtune.config.space`) and the pruner's settings (`llmtune.config.pruner_settings`). Each ``to_*`` returns
the value read and why it is not one (None when it is); on a problem the value comes back as given.

A number written as text is a number: YAML 1.1 reads ``1e-4`` (no dot) as text, and ``--set`` or a spec may
hand over ``"3"``, ``"0.05"`` or a fraction ``"1/9"``. Text ``true`` / ``false`` is a bool; ``yes``, ``no``,
``on`` and ``off`` are not (`yaml_bool_hint` says why they arrive as bools). Infinities and NaN are refused:
every comparison with NaN is false, so no range check would hold.
"""

from __future__ import annotations

import math
from typing import Any

from llmtune.config.problems import fmt, yaml_bool_hint


def text_number(text: str) -> int | float | None:
    """The number ``text`` spells, or None: ``"3"`` and ``"3.0"`` give 3, ``"0.05"`` and ``"1e-4"`` a float,
    ``"1/9"`` the float 1/9 (``"6/3"`` gives 2); ``"nan"``, ``"inf"`` and ``"1e400"`` give a non-finite float."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        top, slash, bottom = text.partition("/")
        if not slash:
            return None
        try:
            num, den = int(top), int(bottom)
        except ValueError:
            return None
        if den == 0:
            return None
        return num // den if num % den == 0 else num / den
    return int(number) if number.is_integer() else number


def as_number(value: Any) -> Any:
    """``value`` as a number when it is text that spells a finite one; anything else as it is, for the
    caller's own check to name."""
    if not isinstance(value, str):
        return value
    number = text_number(value)
    return value if number is None or not math.isfinite(number) else number


def to_bool(value: Any) -> tuple[Any, str | None]:
    """True or false, or the text ``true`` / ``false``."""
    if isinstance(value, bool):
        return value, None
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true", None
    return value, f"{fmt(value)} is not true or false"


def to_int(value: Any) -> tuple[Any, str | None]:
    """A whole number: an int, a float without a fraction (3.0) or text that spells one."""
    number = text_number(value) if isinstance(value, str) else value
    if isinstance(number, int) and not isinstance(number, bool):
        return number, None
    if isinstance(number, float) and number.is_integer():
        return int(number), None
    return value, f"{fmt(value)} is not a whole number"


def to_float(value: Any, like: Any = None) -> tuple[Any, str | None]:
    """A finite number as a float (an int, a float, or text that spells one). ``like``: an example the
    message for a non-finite value gives (a float default)."""
    number = text_number(value) if isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        return value, f"{fmt(value)} is not a number"
    try:
        number = float(number)
    except OverflowError:  # an int past the largest float (YAML reads 1e400 written out in digits as one)
        number = math.inf
    if not math.isfinite(number):
        example = f" like {like:g}" if isinstance(like, float) else ""
        return value, f"{fmt(value)} is not a finite number; give a number{example}"
    return number, None


def to_str(value: Any, meant: str = "") -> tuple[Any, str | None]:
    """Text. ``meant``: what to suggest when YAML turned an unquoted word into a bool (`yaml_bool_hint`)."""
    if isinstance(value, str):
        return value, None
    return value, f"{fmt(value)} is not text{yaml_bool_hint(value, meant)}"


def coerce(value: Any, kind: type, like: Any = None) -> tuple[Any, str | None]:
    """``value`` read as ``kind`` (bool, int, float or str) and why it is not one (`to_bool`, `to_int`,
    `to_float`, `to_str`)."""
    if kind is bool:
        return to_bool(value)
    if kind is int:
        return to_int(value)
    if kind is float:
        return to_float(value, like)
    if kind is str:
        return to_str(value)
    raise TypeError(f"no coercion to {kind!r}")  # a programming error: a setting of another type
