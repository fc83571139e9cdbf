"""llmtune: find good LoRA / QLoRA hyperparameters, trading eval loss against memory, speed and latency.

The public API is what ``__all__`` lists; `llmtune.api` holds the functions (the CLI calls them too).
"""

from llmtune._version import __version__
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

__all__ = [
    "__version__", "init_recipe", "search", "train", "validate", "report", "estimate_memory", "estimate_space", "load_results",
    "export_adapter", "push_to_hub", "load_recipe", "recipe_from_dict", "Recipe", "SearchResult", "TrialResult",
    "LlmtuneError", "RecipeError", "DataError", "SearchError", "HubError", "MissingDependency",
]
