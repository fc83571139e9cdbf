"""Quality after training: the adapter answers eval rows (greedy, batched), the answers are scored against
the references (`llmtune.harness.quality`) and saved, and forgetting is measured against the base model.

Runs in the trial process, from `harness/train.py`'s `_finish`, only for a full run or a segment that ends,
and only when an objective or constraint names a metric measured here: probes never generate.

Forgetting is the mean per-token cross-entropy (nats) of the adapted model minus the base model's on a
reference set, both in the same process: peft's ``disable_adapter()`` gives the base for free. The
reference set is ``data.reference_source`` (general text; every token after the first is scored) or, by
default, the base model's own greedy answers to `GENERAL_PROMPTS` (their answer tokens are scored): a
model that has not forgotten still predicts what it used to say. A LoRA adapter that is the identity
(B = 0, as before training) adds exactly zero to every layer, so its forgetting is exactly 0.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from llmtune.config.objectives import TASK_METRICS
from llmtune.config.recipe import Recipe
from llmtune.config.sections import DataConfig
from llmtune.errors import DataError
from llmtune.files import write_atomic
from llmtune.harness import data as D
from llmtune.harness import formats as F
from llmtune.harness.quality import BUILTIN, user_metric
from llmtune.trial.result import GENERATIONS_FILE

# General questions and sentence openings whose answers a base model already knows (the default reference
# of forgetting): facts, arithmetic, language, common sense. Fixed, so that every trial is measured alike.
GENERAL_PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "The largest planet in our solar system is",
    "Two plus two equals",
    "The author of Romeo and Juliet is",
    "The chemical symbol for gold is",
    "A week has seven days: Monday, Tuesday,",
    "The opposite of hot is",
    "Photosynthesis is the process by which plants",
    "The first person to walk on the Moon was",
    "In computer science, a list that is sorted can be searched quickly with",
    "The Pacific Ocean is the",
    "To make a cup of tea, first",
    "The square root of eighty-one is",
    "Shakespeare was born in the year",
    "The color of a clear sky on a sunny day is",
)


def pick_rows(rows: list[dict[str, Any]], n: int | None, seed: int) -> list[dict[str, Any]]:
    """The eval rows each trial answers: all, or a fixed subset of ``n`` drawn with ``seed`` (in row order)."""
    if n is None or n >= len(rows):
        return list(rows)
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]


def reference_of(row: dict[str, Any], cfg: DataConfig, tokenizer: Any, prompt: list[int]) -> str:
    """The answer a row holds for its prompt (`data.prompt_ids`): the output (instruction), the first assistant
    turn (chat), or the text after the prompt's tokens (text)."""
    if cfg.format == "instruction":
        return F.parse_instruction(row, cfg)[2]
    if cfg.format == "chat":
        messages, _ = F.parse_messages(row, cfg)
        return next((str(m["content"]) for m in messages if m["role"] == "assistant"), "")
    ids = tokenizer(F.parse_text(row, cfg), add_special_tokens=False)["input_ids"]
    start = len(prompt) - (1 if tokenizer.bos_token_id is not None else 0)
    return str(tokenizer.decode(ids[start:], skip_special_tokens=True))


@torch.no_grad()
def greedy(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, device: str,
           batch_size: int) -> list[list[int]]:
    """Greedy answers to token prompts, batched (left padding, prompts of like length together), each cut after
    its first end-of-sequence token (kept). Returns the new tokens of each, in the prompts' order."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk], device=device)
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                   num_beams=1, pad_token_id=pad, eos_token_id=eos, temperature=None, top_p=None,
                                   top_k=None)
        for i, row in zip(chunk, generated[:, width:].tolist(), strict=True):
            out[i] = row[: row.index(eos) + 1] if eos is not None and eos in row else row
    return out


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, skip_special_tokens=True)).strip()


def answer(model: Any, tokenizer: Any, recipe: Recipe, rows: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """The adapter's greedy answer to each row's prompt (chat rows through the chat template), beside the reference."""
    cfg = recipe.data
    prompts = [D.prompt_ids(r, cfg, tokenizer, cfg.eval_max_length) for r in rows]
    new = greedy(model, tokenizer, prompts, recipe.measure.max_new_tokens, device, recipe.train.eval_batch_size)
    return [{"prompt": str(tokenizer.decode(p, skip_special_tokens=False)), "prediction": _decode(tokenizer, n),
             "reference": reference_of(r, cfg, tokenizer, p), "new_tokens": len(n)}
            for r, p, n in zip(rows, prompts, new, strict=True)]


# ----------------------------------------------------------------------------------------------- forgetting


def reference_texts(path: str) -> list[str]:
    """General text from ``data.reference_source``: a .jsonl file (its rows' 'text') or plain text, one a line."""
    p = Path(path).expanduser()
    try:
        lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"data.reference_source: cannot read {path}: {e}", field="data.reference_source") from None
    if p.suffix == ".jsonl":
        try:
            texts = [str(json.loads(line)["text"]) for line in lines]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"data.reference_source: {path} must hold one JSON object with a 'text' field a line "
                            f"({type(e).__name__}: {e})", field="data.reference_source") from None
    else:
        texts = lines
    if not texts:
        raise DataError(f"data.reference_source: {path} holds no text", field="data.reference_source")
    return texts


@torch.no_grad()
def _mean_loss(model: Any, sequences: list[list[int]], starts: list[int], device: str, batch_size: int) -> float:
    """Token-weighted mean next-token cross-entropy of each sequence's tokens from ``starts[i]`` on."""
    total, count = 0.0, 0
    for b in range(0, len(sequences), batch_size):
        seqs, begin = sequences[b:b + batch_size], starts[b:b + batch_size]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        labels = torch.tensor([[D.IGNORE] * st + s[st:] + [D.IGNORE] * (width - len(s)) for s, st in zip(seqs, begin, strict=True)],
                              device=device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        target = labels[:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten(),
                                                         ignore_index=D.IGNORE, reduction="sum"))
        count += int((target != D.IGNORE).sum())
    return total / max(count, 1)


def forgetting(model: Any, tokenizer: Any, recipe: Recipe, device: str) -> tuple[float, dict[str, Any]]:
    """How much worse the adapted model predicts the reference set than its base (see the module's doc)."""
    batch = recipe.train.eval_batch_size
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if recipe.data.reference_source:
        texts = reference_texts(recipe.data.reference_source)
        sequences = [(bos + tokenizer(t, add_special_tokens=False)["input_ids"])[: recipe.data.eval_max_length]
                     for t in texts]
        starts = [0] * len(sequences)
        source = recipe.data.reference_source
    else:
        chat = recipe.data.format == "chat" and getattr(tokenizer, "chat_template", None)
        if chat:
            prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                               add_generation_prompt=True),
                                 add_special_tokens=False)["input_ids"] for p in GENERAL_PROMPTS]
        else:
            prompts = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in GENERAL_PROMPTS]
        with model.disable_adapter():
            answers = greedy(model, tokenizer, prompts, recipe.measure.max_new_tokens, device, batch)
        sequences = [p + a for p, a in zip(prompts, answers, strict=True)]
        starts = [len(p) - 1 for p in prompts]  # the loss of each answer token, the first included
        source = "base greedy answers to GENERAL_PROMPTS"
    with model.disable_adapter():
        base = _mean_loss(model, sequences, starts, device, batch)
    adapted = _mean_loss(model, sequences, starts, device, batch)
    return adapted - base, {"forgetting_base_loss": base, "forgetting_adapted_loss": adapted,
                            "forgetting_reference": source, "forgetting_sequences": len(sequences)}


# ------------------------------------------------------------------------------------------------ the step


def measure_quality(model: Any, tokenizer: Any, recipe: Recipe, eval_rows: list[dict[str, Any]], device: str,
                    out: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """The metrics that the recipe's objectives and constraints measure on generations and on the base model.
    The answers go to ``out/generations.jsonl`` before they are scored, so a metric that fails can be read
    against them. Raises `quality.MetricError` for a user metric that fails."""
    named = set(recipe.objectives) | set(recipe.constraints)
    task = [m for m in TASK_METRICS if m in named]
    users = {n: spec for n, spec in recipe.measure.metrics.items() if n in named}
    metrics: dict[str, float] = {}
    info: dict[str, Any] = {}
    if task or users:
        t = time.perf_counter()
        rows = pick_rows(eval_rows, recipe.measure.generation_examples, recipe.data.split_seed)
        answers = answer(model, tokenizer, recipe, rows, device)
        info.update(generation_s=time.perf_counter() - t, generation_examples=len(rows),
                    generated_tokens=sum(a["new_tokens"] for a in answers))
        write_atomic(out / GENERATIONS_FILE, "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers))
        predictions, references = [a["prediction"] for a in answers], [a["reference"] for a in answers]
        t = time.perf_counter()
        for name in task:
            metrics[name] = BUILTIN[name](predictions, references)
        for name, spec in users.items():
            metrics.update(user_metric(name, spec, predictions, references, rows))
        info["scoring_s"] = time.perf_counter() - t
    if "forgetting" in named:
        t = time.perf_counter()
        metrics["forgetting"], details = forgetting(model, tokenizer, recipe, device)
        info.update(details, forgetting_s=time.perf_counter() - t)
    return metrics, info
