"""Stage 2: the Optuna study that searches: the ask/tell loop, samplers, pruners, the memory gate, storage, progress.

Named `study`, not `search`, so that it never shadows the public function `llmtune.search`."""
