#!/usr/bin/env bash
# Every GPU-side check of llmtune in one call, for a session that is lent a GPU (H100/H200) for minutes:
#   1. the GPU tests (pytest -m gpu: bf16 / 8-bit / 4-bit trials, paged 8-bit optimizer, two workers on one GPU,
#      Liger's kernels against the plain ones: the same curve)
#   2. predicted vs measured peak GPU memory (benchmarks/memory_accuracy.py), time-capped
#   3. harness speed vs transformers.Trainer + peft, with MFU (benchmarks/harness_speed.py --device cuda)
#   4. a 3-trial QLoRA search through llmtune.search on a Llama-1.1B shape with random weights
#      (benchmarks/qlora_search.py: every trial complete, its base Linear4bit, peak memory vs the estimate)
# Each step has its own time cap (together 8 minutes at most, under the device's 10 minutes a command; the
# steps usually end well before their caps); a step that fails or runs out of
# time is recorded and the next one still runs. Results (logs, JSON, Markdown) go to $OUT when the device
# tool sets it, else to benchmarks/results/gpu_check/; commit them from there.
#
# The device machine has no network: its python3 carries torch, transformers, peft and accelerate; the other
# packages llmtune needs travel as wheels in .whl/ (make them here with benchmarks/gpu_wheels.sh and name
# .whl in the run's carry). Usage there:   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LLMTUNE_HOME=${LLMTUNE_HOME:-/tmp/llmtune-home}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

status() { echo "$1: $2" | tee -a "$RESULTS/summary.txt"; }
: >"$RESULTS/summary.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__)'
  python3 -c 'import bitsandbytes; print("bitsandbytes", bitsandbytes.__version__)' 2>&1 | tail -n 1
  python3 -c 'import llmtune; print("llmtune", llmtune.__version__)' 2>&1 | tail -n 1
} >"$RESULTS/environment.txt" 2>&1
cat "$RESULTS/environment.txt"

step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$RESULTS/$name.log" 2>&1
  local rc=$?
  status "$name" "exit $rc after $((SECONDS - started)) s (cap ${limit} s)"
  tail -n 5 "$RESULTS/$name.log"
}

# The tiny model is built once (CPU, ~1 min on 16 cores), before the clocks of the steps start.
step build_tiny 75 python3 -c 'from llmtune.builtin.tiny import ensure_tiny_model; ensure_tiny_model()'
step gpu_tests 135 env CUDA_VISIBLE_DEVICES=0 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
step memory_accuracy 70 python3 benchmarks/memory_accuracy.py --device cuda --max-seconds 55 \
  --out "$RESULTS/memory_accuracy"
step harness_speed 100 python3 benchmarks/harness_speed.py --device cuda --model llama-1b --rounds 2 \
  --no-overhead --out "$RESULTS/harness_speed_cuda"
step qlora_search 100 python3 benchmarks/qlora_search.py --device cuda --model llama-1b --quantization 4bit \
  --n-trials 3 --examples 128 --out "$RESULTS/qlora_search"
cat "$RESULTS/summary.txt"
