"""Every error llmtune reports to a user, under one root.

`LlmtuneError` carries the CLI's exit code; the CLI catches it alone and prints the message without a
traceback, so a bug anywhere else keeps its traceback. Each subclass also derives from the builtin
error a caller would expect (ValueError for bad input, RuntimeError for an environment that cannot do
what was asked), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class LlmtuneError(Exception):
    """Root of the errors llmtune reports to users: the message says what is wrong and the fix."""

    exit_code = 2

    def __init__(self, message: str = "", code: int | None = None):
        super().__init__(message)
        if code is not None:
            self.exit_code = code

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle rebuilds an exception as ``cls(*self.args)``; a subclass whose __init__ takes other
        # arguments (RecipeError takes problems) would get the message there and garble it ("337 problems:
        # - i - z ..."). Rebuild without calling __init__: the message and every attribute as they were.
        return _rebuild, (type(self), self.args, dict(self.__dict__))


def _rebuild(cls: type[LlmtuneError], args: tuple[Any, ...], state: dict[str, Any]) -> LlmtuneError:
    """An error as it was pickled (`LlmtuneError.__reduce__`), without running its __init__."""
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: where (a dotted field path, or empty) and what, with the fix."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class RecipeError(LlmtuneError, ValueError):
    """Every problem found in a recipe (or in the values given for it), reported at once."""

    def __init__(self, problems: list[Problem], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(problems)} problem{'s' if len(problems) != 1 else ''}{where}:"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


class DataError(LlmtuneError, ValueError):
    """The data cannot be used as the recipe describes (names the field and the fix). ``field`` is the recipe
    field the data came from (data.source, data.eval_source), where the message is about the whole source."""

    def __init__(self, message: str = "", code: int | None = None, *, field: str = ""):
        super().__init__(message, code)
        self.field = field


class SearchError(LlmtuneError, RuntimeError):
    """The search cannot start, resume or be read as asked (storage, study, workers)."""


class HubError(LlmtuneError, RuntimeError):
    """Export or push cannot go on as asked. A failed upload exits 1, bad input 2."""

    @property
    def code(self) -> int:
        return self.exit_code


class MissingDependency(LlmtuneError, RuntimeError):
    """An optional library a setting needs is not installed or not usable here (says how to install it)."""


__all__ = ["LlmtuneError", "Problem", "RecipeError", "DataError", "SearchError", "HubError", "MissingDependency"]
