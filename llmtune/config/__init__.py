"""Stage 1: the recipe (its sections and objectives), its search space, and how problems with them are worded."""
