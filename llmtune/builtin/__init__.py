"""Models and data the package builds itself, offline: the tiny demo model and data, SmolLM2."""
