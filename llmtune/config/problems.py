"""How problems with the input are worded: the bad value, the allowed ones, a "did you mean".

Shared by the recipe, the search space and the API's checks of values, so every message reads alike.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

# What users write for a choice when they mean another name of the same thing (other tools' spellings).
# A suggestion by spelling alone would be wrong here: 'adam' is closest to 'adamw_8bit', 'bayes' to 'cmaes'.
MEANINGS = {
    "adam": "adamw_torch", "adamw": "adamw_torch", "adamw_hf": "adamw_torch", "torch_adamw": "adamw_torch",
    "adam8bit": "adamw_8bit", "adamw_bnb_8bit": "adamw_8bit", "paged_adamw": "paged_adamw_8bit",
    "bayes": "tpe", "bayesian": "tpe", "optuna": "tpe", "nsgaii": "nsga2", "nsga-ii": "nsga2", "genetic": "nsga2",
    "evolutionary": "nsga2", "gaussian_process": "gp", "cma": "cmaes", "cma-es": "cmaes", "grid_search": "grid",
    "random_search": "random", "successive_halving": "asha",
    "qlora": "4bit", "nf4": "4bit", "fp4": "4bit", "int4": "4bit", "int8": "8bit", "llm.int8": "8bit",
    "bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
    "flash": "flash_attention_2", "flash_attn": "flash_attention_2", "flash_attention": "flash_attention_2",
    "fa2": "flash_attention_2", "gpu": "cuda",
    "alpaca": "instruction", "sharegpt": "chat", "conversation": "chat", "conversations": "chat", "messages": "chat",
    "openai": "chat", "completion": "text", "raw": "text", "plain": "text", "pretraining": "text",
    "loss": "eval_loss", "val_loss": "eval_loss", "validation_loss": "eval_loss", "memory": "peak_memory_gb",
    "vram": "peak_memory_gb", "speed": "train_throughput", "throughput": "train_throughput", "latency": "latency_ms",
    "ttft": "ttft_ms",
}


def suggest(value: str, options: list[str]) -> str | None:
    """The option the user most likely meant: by meaning (`MEANINGS`), by a close spelling, or the one
    option that starts with (or holds) what they wrote; None when nothing is really close."""
    text = str(value)
    low = text.lower().strip()
    meant = MEANINGS.get(low)
    if meant in options:
        return meant
    close = difflib.get_close_matches(text, options, n=1, cutoff=0.75)
    if close:
        return close[0]
    if len(low) < 2:
        return None
    for found in ([o for o in options if o.lower().startswith(low)],
                  [o for o in options if low in o.lower() or (len(o) >= 3 and o.lower() in low)]):
        if len(found) == 1:
            return found[0]
        if found:
            return None
    return None


def did_you_mean(value: str, options: list[str]) -> str:
    """"; did you mean 'x'?" for the option meant (`suggest`), or "" when none is close."""
    close = suggest(value, options)
    return f"; did you mean '{close}'?" if close else ""


def fmt(value: Any) -> str:
    """A value as the user wrote it: strings quoted, everything else as JSON."""
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)


def one_of(value: Any, options: list[str]) -> str:
    """"'x' is not one of a, b, c; did you mean 'b'?"."""
    return f"{fmt(value)} is not one of {', '.join(options)}{did_you_mean(str(value), options)}"
