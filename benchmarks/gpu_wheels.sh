#!/usr/bin/env bash
# Wheels of what llmtune needs beyond the device machine's image (torch, transformers, peft, accelerate are
# there; see the device tool's KINDS.md), for Python 3.12 on x86-64, into .whl/ (ignored by git). Name .whl in
# the device run's carry; benchmarks/gpu_check.sh installs them. The carry limit is 64 MiB in all: bitsandbytes
# alone is most of it, so it comes last and is skipped (quantized GPU tests then skip) when it does not fit.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p .whl
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d .whl "$@"
}
get optuna alembic sqlalchemy mako colorlog greenlet datasets dill multiprocess plotly nvidia-ml-py liger-kernel
size=$(du -sm .whl | cut -f1)
if [ "$size" -lt 20 ]; then
  get bitsandbytes || echo "bitsandbytes not fetched" >&2
fi
du -sh .whl
