# syntax=docker/dockerfile:1
# llmtune on NVIDIA GPUs: PyTorch's CUDA build, bitsandbytes (its wheels carry their CUDA kernels), the
# PostgreSQL driver for shared studies, NVML for memory readings. The entry point is `llmtune`.
#
#   docker build -t llmtune .
#   docker run --rm --gpus all -v "$PWD/runs:/work/runs" -v llmtune-cache:/cache llmtune \
#       search recipes/qwen2.5-0.5b-lora.yaml --gpus all --quiet
#
# Several containers on one study: docker-compose.yml and docs/scaling.md.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# python3-dev and gcc: Triton (used by PyTorch and bitsandbytes kernels) compiles a small launcher at run time.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev gcc libc6-dev git ca-certificates \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/llmtune \
    PATH=/opt/llmtune/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    LLMTUNE_HOME=/cache/llmtune
RUN python3 -m venv "$VIRTUAL_ENV" && pip install --upgrade pip

# PyTorch first, in its own layer (the largest and slowest to change). PyPI's Linux x86_64 wheel is the
# CUDA build; pin or pick another CUDA with e.g.
#   --build-arg TORCH="torch==2.13.0" --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH="torch"
ARG TORCH_INDEX_URL=""
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH"

WORKDIR /opt/llmtune-src
COPY pyproject.toml README.md ./
COPY llmtune ./llmtune
# The postgres extra is psycopg2; psycopg (3) is SQLAlchemy 2.1's default PostgreSQL driver. Either works.
RUN pip install ".[postgres]" "psycopg[binary]>=3.1" \
 && python -c "import torch, bitsandbytes, peft, optuna, psycopg, llmtune; \
assert torch.version.cuda, 'torch is a CPU build: pass --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128'; \
print('llmtune', llmtune.__version__, 'torch', torch.__version__, 'CUDA', torch.version.cuda, 'bitsandbytes', bitsandbytes.__version__)"

WORKDIR /work
COPY recipes ./recipes
# runs/ (results) and /cache (model downloads, the tiny model) are meant to be volumes.
VOLUME ["/work/runs", "/cache"]
ENTRYPOINT ["llmtune"]
CMD ["--help"]
