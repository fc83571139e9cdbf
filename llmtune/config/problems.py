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


# A printed value is cut to this many characters: a message names the value, it does not reproduce it (a
# value from a file may be megabytes).
MAX_SHOWN = 200


def fmt(value: Any) -> str:
    """A value as the user wrote it: strings quoted, everything else as JSON; cut to `MAX_SHOWN` characters."""
    if isinstance(value, str):
        text = repr(value[: MAX_SHOWN + 1])
    else:
        try:
            text = json.dumps(value, default=str)
        except (ValueError, RecursionError):  # a structure that holds itself (given through the API)
            text = f"<a {type(value).__name__} that holds itself>"
    return shorten(text, len(value) if isinstance(value, str) else None)


def shorten(text: str, chars: int | None = None) -> str:
    """``text`` cut to `MAX_SHOWN` characters with how much was left out (``chars``: the whole value's length)."""
    if len(text) <= MAX_SHOWN and (chars is None or chars <= MAX_SHOWN):
        return text
    return f"{text[:MAX_SHOWN]}... ({chars if chars is not None else len(text):,} characters)"


def one_of(value: Any, options: list[str]) -> str:
    """"'x' is not one of a, b, c; did you mean 'b'?"."""
    return f"{fmt(value)} is not one of {', '.join(options)}{did_you_mean(str(value), options)}"


def yaml_bool_hint(value: Any, meant: str = "") -> str:
    """Why a text setting got true/false: YAML 1.1 reads unquoted yes/no/on/off as booleans ("" otherwise).
    ``meant``: the value to suggest instead (e.g. none for ``quantization: no``)."""
    if not isinstance(value, bool):
        return ""
    word = "yes" if value else "no"
    fix = f"write {meant}" if meant else f"quote it (e.g. '{word}') if you meant the text"
    return (f" (YAML reads an unquoted {'yes, on' if value else 'no, off'} or {str(value).lower()} as "
            f"{str(value).lower()}); {fix}")
