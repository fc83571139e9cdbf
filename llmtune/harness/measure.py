"""Measure what the objectives name: peak memory, real-token throughput, generation latency.

Peak memory on a GPU is the larger of torch's reserved peak and what NVML sees for the process
(NVML includes the CUDA context, which torch does not count). On CPU it is the peak resident set
size, which Linux lets us reset between phases (``/proc/self/clear_refs``).
"""

from __future__ import annotations

import resource
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from llmtune import hardware

GiB = 2**30


def _read_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5 = reset the peak RSS counter to the current RSS
        return True
    except OSError:
        return False


class _NvmlSampler(threading.Thread):
    """Polls NVML for this process's GPU memory: NVML has no peak counter of its own."""

    def __init__(self, index: int, interval: float = 0.02):
        super().__init__(daemon=True)
        self.index, self.interval, self.peak = index, interval, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            used = hardware.process_gpu_memory_bytes(self.index)
            if used is not None:
                self.peak = max(self.peak, used)
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join(timeout=1)
        used = hardware.process_gpu_memory_bytes(self.index)
        return max(self.peak, used or 0)


@dataclass
class MemoryPeak:
    bytes: int = 0
    torch_reserved: int | None = None
    torch_allocated: int | None = None
    nvml: int | None = None
    source: str = ""

    @property
    def gb(self) -> float:
        return self.bytes / GiB


def release_memory(device: str) -> None:
    """Give back what earlier work (an evaluation) left cached, so a peak measured next starts clean:
    torch's cached CUDA blocks, and on Linux the C heap's free pages (the resident set). No gc.collect:
    tensors are freed by reference counting, and a full collection costs ~0.2 s with torch loaded."""
    if device == "cuda":
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def track_peak_memory(device: str) -> Iterator[MemoryPeak]:
    """Measure the peak memory of the block; yields a MemoryPeak filled on exit."""
    peak = MemoryPeak()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        sampler = _NvmlSampler(hardware.nvml_index_of_current_device())
        sampler.start()
        try:
            yield peak
        finally:
            torch.cuda.synchronize()
            peak.torch_reserved = int(torch.cuda.max_memory_reserved())
            peak.torch_allocated = int(torch.cuda.max_memory_allocated())
            nvml = sampler.stop()
            peak.nvml = nvml or None
            peak.bytes = max(peak.torch_reserved, nvml)
            peak.source = "nvml" if nvml >= peak.torch_reserved else "torch_reserved"
    else:
        reset = _reset_hwm()
        try:
            yield peak
        finally:
            hwm = _read_hwm_bytes() if reset else None
            if hwm is None:  # no /proc: lifetime peak of the process (trial processes are fresh)
                hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                peak.source = "ru_maxrss"
            else:
                peak.source = "rss"
            peak.bytes = hwm


def peak_so_far_bytes(device: str) -> int:
    """The training peak up to now, while `track_peak_memory` runs (for pruning at a rung): torch's reserved
    peak on CUDA (without the CUDA context NVML adds at the end), the resident high-water mark on CPU."""
    if device == "cuda":
        return int(torch.cuda.max_memory_reserved())
    return _read_hwm_bytes() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Latency:
    ttft_ms: float
    ms_per_token: float
    prompts: int
    new_tokens: int
    memory: MemoryPeak


@torch.no_grad()
def measure_latency(model: Any, prompts: list[list[int]], max_new_tokens: int, device: str) -> Latency:
    """Greedy generation with the KV cache, timed per prompt (batch 1, as a chat user sees it).

    Every prompt generates exactly max_new_tokens (no stop at EOS) so all trials do the same work.
    Reports medians over prompts: time to first token, and ms per later token.
    """
    from transformers import DynamicCache

    model.eval()

    def generate(ids: list[int], n: int) -> tuple[float, float]:
        x = torch.tensor([ids], device=device)
        cache = DynamicCache()
        sync(device)
        start = time.perf_counter()
        out = model(input_ids=x, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        sync(device)
        first = time.perf_counter()
        for _ in range(n - 1):
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        sync(device)
        end = time.perf_counter()
        return (first - start) * 1000, (end - first) * 1000 / max(1, n - 1)

    generate(prompts[0], 2)  # warm-up: kernels, allocator, lazy init are not latency
    ttfts, per_token = [], []
    with track_peak_memory(device) as mem:
        for ids in prompts:
            t, p = generate(ids, max_new_tokens)
            ttfts.append(t)
            per_token.append(p)
    return Latency(statistics.median(ttfts), statistics.median(per_token), len(prompts), max_new_tokens, mem)
