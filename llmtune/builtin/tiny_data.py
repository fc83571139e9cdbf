"""The tiny demo's text, generated: a pretraining corpus and a family of small instruction tasks.

The corpus is English-like sentences over a small vocabulary plus the task skills written as prose;
the instruction tasks (reverse, sort, add, count, uppercase, continue a sequence, list a range) use
the same words. Pretraining on the corpus teaches words, numbers and the skills, but never the
instruction prompt format, so a short LoRA fine-tune on the tasks has something real to learn.
Everything is seeded, so every machine generates the same text (`llmtune.builtin.tiny` caches it).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path

SEED = 1234  # also seeds the tiny model's corpus sample, init and pretraining order (llmtune.builtin.tiny)
_N_TRAIN, _N_EVAL = 3000, 300

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


def corpus_documents(rng: random.Random, n_docs: int) -> list[str]:
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


def instruction_rows(seed: int = SEED) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Deterministic (train, eval) rows; eval's (instruction, input) pairs never occur in train."""
    rng, seen = random.Random(seed), set()
    rows: list[dict[str, str]] = []
    while len(rows) < _N_TRAIN + _N_EVAL:
        instr, inp, out = _instruction_task(rng)
        if (instr, inp) not in seen:
            seen.add((instr, inp))
            rows.append({"instruction": instr, "input": inp, "output": out})
    return rows[_N_EVAL:], rows[:_N_EVAL]


def build_data(out: Path, log: Callable[[str], None]) -> dict[str, object]:
    """Write the tasks' ``train.jsonl`` and ``eval.jsonl`` into ``out``; returns what the build marker records."""
    train, evals = instruction_rows()
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        with open(out / name, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(r, ensure_ascii=True) + "\n" for r in rows)
    log(f"[llmtune] wrote {len(train)} train and {len(evals)} eval rows")
    return {"train_rows": len(train), "eval_rows": len(evals), "seed": SEED}


def as_chat(row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """One task as a conversation: the instruction (and input) from the user, the answer from the assistant."""
    prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]}


def build_chat_data(out: Path, log: Callable[[str], None]) -> dict[str, object]:
    """The same tasks as `build_data`, as chat rows (``messages``), for chat models such as SmolLM2."""
    train, evals = instruction_rows()
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        with open(out / name, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(as_chat(r), ensure_ascii=True) + "\n" for r in rows)
    log(f"[llmtune] wrote {len(train)} train and {len(evals)} eval conversations")
    return {"train_rows": len(train), "eval_rows": len(evals), "seed": SEED}
