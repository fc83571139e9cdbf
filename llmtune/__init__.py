"""llmtune: find good LoRA / QLoRA hyperparameters, trading eval loss against memory, speed and latency.

The public API is what ``__all__`` lists; `llmtune.api` holds the functions (the CLI calls them too).
Names are loaded on first use (PEP 562), so importing a leaf module (``llmtune.trial.endings``, say)
loads neither optuna nor torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from llmtune._version import __version__

# public name -> the module that defines it
_WHERE = {
    **dict.fromkeys(("estimate_memory", "estimate_space", "export_adapter", "init_recipe", "load_results", "push_to_hub",
                     "report", "search", "train", "validate"), "llmtune.api"),
    **dict.fromkeys(("Recipe", "load_recipe", "recipe_from_dict"), "llmtune.config.recipe"),
    "SearchResult": "llmtune.deliver.results",
    **dict.fromkeys(("DataError", "HubError", "LlmtuneError", "MissingDependency", "RecipeError", "SearchError"),
                    "llmtune.errors"),
    "TrialResult": "llmtune.trial.result",
}

__all__ = [
    "__version__", "init_recipe", "search", "train", "validate", "report", "estimate_memory", "estimate_space", "load_results",
    "export_adapter", "push_to_hub", "load_recipe", "recipe_from_dict", "Recipe", "SearchResult", "TrialResult",
    "LlmtuneError", "RecipeError", "DataError", "SearchError", "HubError", "MissingDependency",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value  # once: later lookups do not come here
        return value
    raise AttributeError(f"module 'llmtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)  # the public names, not this module's helpers (importlib, Any, ...)


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from llmtune.api import (
        estimate_memory,
        estimate_space,
        export_adapter,
        init_recipe,
        load_results,
        push_to_hub,
        report,
        search,
        train,
        validate,
    )
    from llmtune.config.recipe import Recipe, load_recipe, recipe_from_dict
    from llmtune.deliver.results import SearchResult
    from llmtune.errors import DataError, HubError, LlmtuneError, MissingDependency, RecipeError, SearchError
    from llmtune.trial.result import TrialResult
