"""A tiny Llama model, tokenizer and instruction data set that llmtune builds for itself.

The test suite and the demo must run offline on a small CPU, so instead of downloading a
model llmtune generates one: a byte-level BPE tokenizer and a ~1.1M-parameter Llama,
briefly pretrained on generated English-like text, plus a family of small instruction tasks
over the same vocabulary. Pretraining teaches words, numbers and (in prose form) the task
skills, but never the instruction prompt format, so a short LoRA fine-tune has something
real to learn. Everything is deterministic and cached under ``llmtune_home()``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

try:
    import fcntl
except ImportError:  # pragma: no cover - no flock on Windows; the atomic rename still protects readers
    fcntl = None  # type: ignore[assignment]

TINY_MODEL = "llmtune/tiny"
TINY_DATA = "llmtune/tiny-tasks"

Log = Callable[[str], None] | None

_MODEL_DIR = "tiny-model-v1"
_DATA_DIR = "tiny-data-v1"
_MARKER = "llmtune-build.json"  # written last inside the temp dir, so its presence means "complete"
_SEED = 1234
_N_TRAIN, _N_EVAL = 3000, 300
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

_W = {
    "color": "red blue green yellow black white orange purple brown gray pink silver".split(),
    "animal": "cat dog fox bird fish horse mouse lion tiger bear wolf frog duck goat sheep owl".split(),
    "thing": (
        "apple pear plum grape lemon melon cherry bread cake box cup book lamp chair table "
        "stone key ring coin shoe hat door ball bag"
    ).split(),
    "place": "river hill forest garden city house road lake field market village beach".split(),
    "adj": "small big old young quick slow happy quiet bright dark warm cold tall short soft loud".split(),
    "verb": "sees finds takes likes carries watches follows holds moves pushes wants paints".split(),
    "name": "Anna Ben Clara David Emma Felix Grace Henry Iris Jack Kate Leo Mia Noah Olive Paul".split(),
}
_NOUNS = _W["animal"] + _W["thing"]


def llmtune_home() -> Path:
    """Root of llmtune's cache: ``$LLMTUNE_HOME`` if set, else ``~/.cache/llmtune``."""
    env = os.environ.get("LLMTUNE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmtune"


# --------------------------------------------------------------------------- text generation


def _plural(word: str, n: int) -> str:
    if n == 1 or word in ("sheep", "fish"):
        return word
    irregular = {"mouse": "mice", "wolf": "wolves", "cherry": "cherries"}
    if word in irregular:
        return irregular[word]
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def _num(rng: random.Random) -> int:
    """Mostly small numbers, sometimes up to 999, so both are common tokens."""
    return rng.randrange(100) if rng.random() < 0.6 else rng.randrange(1000)


def _length(rng: random.Random, lo: int = 2, hi: int = 90) -> int:
    """Log-uniform list length: many short items, a long tail (packing and truncation need both)."""
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def _sentence(rng: random.Random) -> str:
    c, n, m = rng.choice, _num(rng), _num(rng)
    k = rng.randrange(8)
    if k == 0:
        s = f"the {c(_W['adj'])} {c(_W['animal'])} {c(_W['verb'])} the {c(_W['color'])} {c(_W['thing'])}."
    elif k == 1:
        a, b = c(_NOUNS), c(_NOUNS)
        s = f"{c(_W['name'])} has {n} {_plural(a, n)} and {m} {_plural(b, m)}."
    elif k == 2:
        a = c(_W["animal"])
        s = f"in the {c(_W['place'])} there are {n} {c(_W['color'])} {_plural(a, n)}."
    elif k == 3:
        s = f"{c(_W['name'])} walks to the {c(_W['place'])} with a {c(_W['adj'])} {c(_W['animal'])}."
    elif k == 4:
        items = [c(_NOUNS) for _ in range(_length(rng, 2, 12))]
        s = f"{c(_W['name'])} writes down {', '.join(items)}."
    elif k == 5:
        nums = [str(_num(rng)) for _ in range(_length(rng, 2, 16))]
        s = f"the numbers on the board are {' '.join(nums)}."
    elif k == 6:
        a = c(_NOUNS)
        s = f"yesterday {c(_W['name'])} saw {n} {_plural(a, n)}, and today {c(_W['name'])} saw {m}."
    else:
        s = f"the {c(_W['thing'])} is {c(_W['color'])} and the {c(_W['animal'])} is {c(_W['adj'])}."
    return s[0].upper() + s[1:]


def _phrase(rng: random.Random, n_words: int) -> list[str]:
    """``n_words`` words of natural-looking text (cut from generated sentences)."""
    words: list[str] = []
    while len(words) < n_words:
        words += _sentence(rng).split()
    return words[:n_words]


def _sequence(rng: random.Random, n: int) -> list[int]:
    start, step = rng.randrange(60), rng.randint(1, 12)
    return [start + i * step for i in range(n + 1)]


def _prose_task(rng: random.Random) -> str:
    """The task skills written as ordinary prose: knowledge transfers, the prompt format does not."""
    k, n = rng.randrange(7), _length(rng, 2, 24)
    if k == 0:
        w = _phrase(rng, n)
        return f"Read backwards, the words {' '.join(w)} become {' '.join(reversed(w))}."
    if k == 1:
        xs = [_num(rng) for _ in range(n)]
        return f"In order from small to large, {' '.join(map(str, xs))} becomes {' '.join(map(str, sorted(xs)))}."
    if k == 2:
        a, b = rng.randrange(10 ** rng.randint(1, 3)), rng.randrange(10 ** rng.randint(1, 3))
        return f"{a} plus {b} is {a + b}."
    if k == 3:
        return f"The phrase {' '.join(_phrase(rng, n))} has {n} words."
    if k == 4:
        text = " ".join(_phrase(rng, n))
        return f"In capital letters, {text} is written {text.upper()}."
    if k == 5:
        seq = _sequence(rng, max(n, 3))
        return f"After {' '.join(map(str, seq[:-1]))} comes {seq[-1]}."
    a = rng.randrange(50)
    return f"Counting from {a} to {a + n - 1} gives {' '.join(map(str, range(a, a + n)))}."


def _corpus_documents(rng: random.Random, n_docs: int) -> list[str]:
    """Pretraining documents: ~70% plain paragraphs, ~30% prose-form tasks."""
    docs = []
    for _ in range(n_docs):
        if rng.random() < 0.3:
            docs.append(_prose_task(rng))
        else:
            docs.append(" ".join(_sentence(rng) for _ in range(rng.randint(1, 4))))
    return docs


def _instruction_task(rng: random.Random) -> tuple[str, str, str]:
    """One (instruction, input, output) example from one of seven task families."""
    c, k, n = rng.choice, rng.randrange(7), _length(rng)
    if k == 0:
        w = _phrase(rng, n)
        instr = c(["Reverse the order of the words.", "Write the words in reverse order."])
        return instr, " ".join(w), " ".join(reversed(w))
    if k == 1:
        xs = [_num(rng) for _ in range(n)]
        instr = c(["Sort the numbers from smallest to largest.", "Sort these numbers in ascending order."])
        return instr, ", ".join(map(str, xs)), ", ".join(map(str, sorted(xs)))
    if k == 2:
        a, b = rng.randrange(10 ** rng.randint(1, 4)), rng.randrange(10 ** rng.randint(1, 4))
        if rng.random() < 0.5:
            return f"What is {a} plus {b}?", "", str(a + b)
        return "Add the two numbers.", f"{a} + {b}", str(a + b)
    if k == 3:
        instr = c(["Count the words in the input.", "How many words are there?"])
        return instr, " ".join(_phrase(rng, n)), str(n)
    if k == 4:
        text = " ".join(_phrase(rng, n))
        instr = c(["Convert the text to uppercase.", "Rewrite the input in capital letters."])
        return instr, text, text.upper()
    if k == 5:
        seq = _sequence(rng, max(n, 3))
        return "What number comes next in the sequence?", ", ".join(map(str, seq[:-1])), str(seq[-1])
    a = rng.randrange(50)
    return f"List the numbers from {a} to {a + n - 1}.", "", " ".join(map(str, range(a, a + n)))


def _instruction_rows(seed: int = _SEED) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Deterministic (train, eval) rows; eval's (instruction, input) pairs never occur in train."""
    rng, seen = random.Random(seed), set()
    rows: list[dict[str, str]] = []
    while len(rows) < _N_TRAIN + _N_EVAL:
        instr, inp, out = _instruction_task(rng)
        if (instr, inp) not in seen:
            seen.add((instr, inp))
            rows.append({"instruction": instr, "input": inp, "output": out})
    return rows[_N_EVAL:], rows[:_N_EVAL]


# --------------------------------------------------------------------------- builders


def _build_data(out: Path, log: Callable[[str], None]) -> dict[str, object]:
    train, evals = _instruction_rows()
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        with open(out / name, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(r, ensure_ascii=True) + "\n" for r in rows)
    log(f"[llmtune.builtin.tiny] wrote {len(train)} train and {len(evals)} eval rows")
    return {"train_rows": len(train), "eval_rows": len(evals), "seed": _SEED}


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
    gen = torch.Generator().manual_seed(_SEED)
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
        if step % 25 == 0 or step == _STEPS - 1:
            secs = time.time() - t0
            log(f"[llmtune.builtin.tiny] pretrain step {step + 1}/{_STEPS} loss {losses[-1]:.3f} ({secs:.0f}s)")
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
    docs = _corpus_documents(random.Random(_SEED + 1), 60_000)
    train, _ = _instruction_rows()
    # The tokenizer sees the task words too (the eval rows are never used here).
    tok_texts = docs + [" ".join(r.values()) for r in train]
    tokenizer = _build_tokenizer(tok_texts)
    log(f"[llmtune.builtin.tiny] trained a {len(tokenizer)}-token byte-level BPE tokenizer ({time.time() - t0:.1f}s)")

    enc = tokenizer(docs, add_special_tokens=True)["input_ids"]
    ids = torch.tensor([t for row in enc for t in row + [tokenizer.eos_token_id]], dtype=torch.long)
    config = _tiny_config(tokenizer)
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(_SEED)
        model = LlamaForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[llmtune.builtin.tiny] pretraining a {n_params / 1e6:.2f}M-parameter Llama on {ids.numel()} tokens")
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
    log(f"[llmtune.builtin.tiny] built tiny model in {secs:.1f}s (final pretraining loss {final_loss:.3f})")
    return {"params": n_params, "pretrain_loss": round(final_loss, 4), "build_seconds": round(secs, 1)}


# --------------------------------------------------------------------------- caching


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock; a second process blocks here until the first is done."""
    with open(path, "a+") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


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
    log(f"[llmtune.builtin.tiny] using {threads} CPU thread(s)")
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _ensure_built(name: str, build: Callable[[Path, Callable[[str], None]], dict], log: Log) -> Path:
    """Return ``llmtune_home()/name``, building it once, atomically, under a file lock."""
    say = log or (lambda _msg: None)
    home = llmtune_home()
    final = home / name
    if (final / _MARKER).is_file():
        return final
    home.mkdir(parents=True, exist_ok=True)
    with _file_lock(home / f".{name}.lock"):
        if (final / _MARKER).is_file():  # another process built it while we waited
            return final
        say(f"[llmtune.builtin.tiny] building {name} in {home} (one-time)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=home))
        try:
            info = build(tmp, say)
            (tmp / _MARKER).write_text(json.dumps({"name": name, **info}, indent=1) + "\n")
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be shared like ~/.cache
            if final.exists():  # a half-copied or foreign directory without the marker
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def ensure_tiny_model(log: Log = print) -> Path:
    """Directory of the tiny Llama + tokenizer, loadable offline with ``from_pretrained``."""

    def build(out: Path, say: Callable[[str], None]) -> dict:
        with _torch_threads(say):
            return _build_model(out, say)

    return _ensure_built(_MODEL_DIR, build, log)


def ensure_tiny_data(log: Log = print) -> Path:
    """Directory with ``train.jsonl`` and ``eval.jsonl`` of the tiny instruction tasks."""
    return _ensure_built(_DATA_DIR, _build_data, log)


def resolve_model_name(name: str, log: Log = print) -> str:
    """Local path for ``TINY_MODEL`` (built if needed); any other name is returned unchanged."""
    return str(ensure_tiny_model(log)) if name == TINY_MODEL else name


def resolve_data_source(source: str, log: Log = print) -> str:
    """Local data directory for ``TINY_DATA`` (built if needed); anything else unchanged."""
    return str(ensure_tiny_data(log)) if source == TINY_DATA else source
