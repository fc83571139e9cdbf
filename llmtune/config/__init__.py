"""Stage 1: the recipe, its search space, and how problems with them are worded."""
