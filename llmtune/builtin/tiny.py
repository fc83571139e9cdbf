"""A tiny Llama model and tokenizer, and an instruction data set, that llmtune builds for itself.

The test suite and the demo must run offline on a small CPU, so instead of downloading a
model llmtune generates one: a byte-level BPE tokenizer and a ~1.1M-parameter Llama, briefly
pretrained on generated English-like text. The text and the instruction tasks come from
`llmtune.builtin.tiny_data`. Everything is deterministic and cached under ``llmtune.builtin.cache.llmtune_home()``,
built once per cache, atomically, under a file lock.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtune.builtin.cache import Log, ensure_built
from llmtune.builtin.names import TINY_DATA, TINY_MODEL
from llmtune.builtin.tiny_data import SEED, build_data, corpus_documents, instruction_rows

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

_MODEL_DIR = "tiny-model-v1"
_DATA_DIR = "tiny-data-v1"
_VOCAB_SIZE = 1536
_SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# Fixed step count (not a time budget) so every machine trains the same model.
_STEPS, _BATCH, _SEQ_LEN, _WARMUP, _LR = 200, 16, 256, 20, 3e-3


# --------------------------------------------------------------------------- builders


def _build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<|bos|>")
    # Llama-style: the tokenizer prepends bos itself (decode with skip_special_tokens to drop it).
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=_SPECIAL[3:],
        model_max_length=1024,
    )
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def _pretrain(model: LlamaForCausalLM, ids: torch.Tensor, log: Callable[[str], None]) -> float:
    """Plain AdamW loop with warmup + cosine decay; returns the mean loss of the last 20 steps."""
    import torch

    n_chunks = ids.numel() // _SEQ_LEN
    chunks = ids[: n_chunks * _SEQ_LEN].view(n_chunks, _SEQ_LEN)
    gen = torch.Generator().manual_seed(SEED)
    order = torch.randperm(n_chunks, generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=_LR, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    losses: list[float] = []
    t0 = time.time()
    for step in range(_STEPS):
        frac = step / _STEPS
        scale = min(1.0, (step + 1) / _WARMUP) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = _LR * scale
        idx = order[(torch.arange(_BATCH) + step * _BATCH) % n_chunks]
        x = chunks[idx]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == _STEPS - 1:  # every ~20 s on a busy 2-core machine
            secs = time.time() - t0
            log(f"[llmtune] pretrain step {step + 1}/{_STEPS} loss {losses[-1]:.3f} ({secs:.0f}s)")
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])


def _tiny_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def _build_model(out: Path, log: Callable[[str], None]) -> dict[str, object]:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    t0 = time.time()
    docs = corpus_documents(random.Random(SEED + 1), 60_000)
    train, _ = instruction_rows()
    # The tokenizer sees the task words too (the eval rows are never used here).
    tok_texts = docs + [" ".join(r.values()) for r in train]
    tokenizer = _build_tokenizer(tok_texts)
    log(f"[llmtune] trained a {len(tokenizer)}-token byte-level BPE tokenizer ({time.time() - t0:.1f}s)")

    enc = tokenizer(docs, add_special_tokens=True)["input_ids"]
    ids = torch.tensor([t for row in enc for t in row + [tokenizer.eos_token_id]], dtype=torch.long)
    config = _tiny_config(tokenizer)
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[llmtune] pretraining a {n_params / 1e6:.2f}M-parameter Llama on {ids.numel()} tokens")
    final_loss = _pretrain(model, ids, log)

    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a shard-writing bar for one 4 MB file is just noise in the log
    try:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    secs = time.time() - t0
    log(f"[llmtune] built tiny model in {secs:.1f}s (final pretraining loss {final_loss:.3f})")
    return {"params": n_params, "pretrain_loss": round(final_loss, 4), "build_seconds": round(secs, 1)}


# --------------------------------------------------------------------------- caching


def _build_threads() -> int:
    """Threads for pretraining: the cores that other processes leave idle right now (1-8).

    On a busy 2-core box two spinning OpenMP threads run ~2.5x slower than one, so measure
    idle time over half a second (Linux ``/proc/stat``) instead of grabbing every core.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    def snapshot() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, total

    try:
        idle0, total0 = snapshot()
        time.sleep(0.5)
        idle1, total1 = snapshot()
        idle = (os.cpu_count() or cores) * (idle1 - idle0) / max(1, total1 - total0)
    except (OSError, ValueError, IndexError):
        idle = float(cores)
    return max(1, min(8, cores, int(idle + 0.25)))


@contextlib.contextmanager
def _torch_threads(log: Callable[[str], None]) -> Iterator[None]:
    """Set torch's thread count for the build, then restore the caller's setting."""
    import torch

    before, threads = torch.get_num_threads(), _build_threads()
    torch.set_num_threads(threads)
    log(f"[llmtune] using {threads} CPU thread(s)")
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ensure_tiny_model(log: Log = print) -> Path:
    """Directory of the tiny Llama + tokenizer, loadable offline with ``from_pretrained``."""

    def build(out: Path, say: Callable[[str], None]) -> dict[str, Any]:
        with _torch_threads(say):
            return _build_model(out, say)

    return ensure_built(_MODEL_DIR, build, log, what=TINY_MODEL,
                        why=f"llmtune makes its offline demo model itself instead of downloading one: a tokenizer and "
                            f"a 1.1M-parameter Llama pretrained for {_STEPS} steps on this CPU (1-7 min, progress below)")


def ensure_tiny_data(log: Log = print) -> Path:
    """Directory with ``train.jsonl`` and ``eval.jsonl`` of the tiny instruction tasks."""
    return ensure_built(_DATA_DIR, build_data, log, what=TINY_DATA,
                        why="generated instruction tasks, so that llmtune runs offline (seconds)")
