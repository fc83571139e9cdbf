"""llmtune: find good LoRA / QLoRA hyperparameters."""
