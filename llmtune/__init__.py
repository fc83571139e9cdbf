"""llmtune: find good LoRA / QLoRA hyperparameters, trading eval loss against memory, speed and latency."""

__version__ = "0.1.0"

from llmtune.api import estimate_memory, load_results, search, train  # noqa: E402
from llmtune.hub import HubError, export_adapter, push_to_hub  # noqa: E402
from llmtune.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict  # noqa: E402
from llmtune.result import TrialResult  # noqa: E402
from llmtune.results import SearchResult  # noqa: E402

__all__ = [
    "__version__", "search", "train", "estimate_memory", "load_results", "load_recipe", "recipe_from_dict",
    "Recipe", "RecipeError", "SearchResult", "TrialResult", "export_adapter", "push_to_hub", "HubError",
]
