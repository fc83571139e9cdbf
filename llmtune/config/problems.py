"""How problems with the input are worded: the bad value, the allowed ones, a "did you mean".

Shared by the recipe, the search space and the API's checks of values, so every message reads alike.
"""

from __future__ import annotations

import difflib
import json
from typing import Any


def did_you_mean(value: str, options: list[str]) -> str:
    """"; did you mean 'x'?" for the closest option, or "" when none is close."""
    close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def fmt(value: Any) -> str:
    """A value as the user wrote it: strings quoted, everything else as JSON."""
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)


def one_of(value: Any, options: list[str]) -> str:
    """"'x' is not one of a, b, c; did you mean 'b'?"."""
    return f"{fmt(value)} is not one of {', '.join(options)}{did_you_mean(str(value), options)}"
