"""The one door to hardware and optional libraries: CUDA, bitsandbytes, NVML, trackers.

Everything here is cached and cheap. The search process (the parent) may call `gpu_count` and
`gpu_memory_bytes`, which use NVML and never create a CUDA context: only trial processes do.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import MutableMapping
from typing import Any

from llmtune.errors import MissingDependency


@functools.lru_cache(maxsize=1)
def _nvml() -> Any:
    """Initialised pynvml module, or None when there is no NVIDIA driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no library, no driver, no device: all mean "no NVML"
        return None


def gpu_count() -> int:
    """Visible NVIDIA GPUs, without touching CUDA (safe in the parent process)."""
    nvml = _nvml()
    if nvml is None:
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    n = int(nvml.nvmlDeviceGetCount())
    if visible is not None:
        return len([v for v in visible.split(",") if v.strip() and v.strip() != "-1"])
    return n


def gpu_memory_bytes(index: int = 0) -> int | None:
    """Total memory of a GPU (NVML index), or None without NVML."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        return int(nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index)).total)
    except Exception:
        return None


def cuda_available() -> bool:
    """CUDA usable by torch in this process (call only inside trial processes)."""
    import torch

    return torch.cuda.is_available()


ALLOCATOR_SETTINGS = "expandable_segments:True"


def configure_cuda_allocator() -> None:
    """Expandable segments for torch's CUDA caching allocator, unless the user configured it themselves.

    With fixed segments, trials whose tensor sizes churn (a 128k-vocabulary logits tensor, then activations)
    reserved up to 45% more than they allocated on an H100 (benchmarks/memory_accuracy.py): memory a trial
    cannot use, that makes configs OOM and the peak unpredictable. Expandable segments keep reserved close to
    allocated. Trial processes get it from the runner before they start; this covers in-process trials
    (``llmtune.train(..., in_process=True)``) and must run before the process's first CUDA allocation.
    """
    set_allocator_default(os.environ)  # read when the allocator starts


def set_allocator_default(env: MutableMapping[str, str]) -> None:
    """Put ALLOCATOR_SETTINGS into an environment that has no allocator configuration of its own."""
    if not (env.get("PYTORCH_CUDA_ALLOC_CONF") or env.get("PYTORCH_ALLOC_CONF")):
        env["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_SETTINGS


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX or AVX512-BF16): there bf16 LoRA steps ran 1.8x fp32's."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask; containers often allow fewer than exist)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def trial_threads(concurrent_trials: int = 1, requested: int | None = None) -> int:
    """Threads for each trial: ``LLMTUNE_THREADS``, else ``requested`` (train.threads), else the usable
    cores minus one (the search process, its heartbeat and progress view, tokenizers) shared by the
    trials that run at once. Oversubscribed OpenMP threads spin-wait on each other: on a 2-core machine a
    search with torch's default thread count ran 5-9x slower than with one thread per trial."""
    env = os.environ.get("LLMTUNE_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    if requested:
        return requested
    cores = usable_cores()
    return max(1, (cores - 1 if cores > 1 else 1) // max(1, concurrent_trials))


def resolve_device(requested: str) -> str:
    """cpu or cuda, as the recipe's ``train.device`` asks; configures the CUDA allocator when it picks cuda."""
    if requested == "cpu":
        return "cpu"
    if cuda_available():
        configure_cuda_allocator()
        return "cuda"
    if requested == "cuda":
        raise MissingDependency("train.device is cuda but torch sees no CUDA GPU; install a CUDA build of torch or set train.device: auto")
    return "cpu"


def bitsandbytes_ready(device: str) -> None:
    """Raise a clear error when 8/4-bit quantization cannot run on this device."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependency("quantization 8bit/4bit needs bitsandbytes: pip install bitsandbytes")
    if device == "cpu":
        return  # bitsandbytes >= 0.45 ships CPU kernels for 4-bit and 8-bit layers
    import bitsandbytes  # noqa: F401  (fails early with its own message when its CUDA library is broken)


@functools.lru_cache(maxsize=1)
def bnb_cpu_packs_4bit() -> bool:
    """Whether bitsandbytes repacks 4-bit weights for its CPU kernel here (a CPU with AVX512-BF16): it does so
    at the first evaluation of a trial on the CPU, and that packing needs out_features in blocks of 32 and an
    even in_features (bitsandbytes 0.50 `_convert_weight_packed_for_cpu`)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    try:
        from bitsandbytes.functional import has_avx512bf16

        return bool(has_avx512bf16())
    except Exception:  # an older bitsandbytes without that kernel, or a broken install: no packing
        return False


def installed(module: str) -> bool:
    """Whether an optional library can be imported here (found without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module with no spec
        return False


def liger_model_types() -> frozenset[str] | str:
    """The model types Liger-Kernel has kernels for (`liger_kernels: true`), or why it cannot be asked: not
    installed, or an import that fails (its Triton kernels need a CUDA build of torch)."""
    if not installed("liger_kernel"):
        return "liger-kernel is not installed: pip install 'liger-kernel>=0.7'"
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception as e:
        return f"liger-kernel does not import here ({type(e).__name__}: {str(e)[:160]})"
    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def module_ready(module: str, why: str, pip_name: str | None = None) -> None:
    """Raise a clear error when an optional library a setting needs (``why``) is not installed."""
    if not installed(module):
        raise MissingDependency(f"{why}, which needs {module}: pip install {pip_name or module}")


def process_gpu_memory_bytes(device_index: int = 0) -> int | None:
    """GPU memory NVML sees used by this process on a device (includes the CUDA context)."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(device_index)
        pid = os.getpid()
        for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
        # In containers pids differ from the host's: fall back to the device's used memory.
        return int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:
        return None


def nvml_index_of_current_device() -> int:
    """NVML index of CUDA device 0 of this process (CUDA_VISIBLE_DEVICES maps them)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    first = visible.split(",")[0].strip() if visible else "0"
    return int(first) if first.isdigit() else 0
