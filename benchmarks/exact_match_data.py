"""Chat rows whose answers can be checked exactly, for a search on `exact_match` (recipes/smollm2-exact-match-cpu.yaml).

Two kinds of question, half each, every answer one short word or number:
  - two-digit addition:  "What is 37 + 45? Answer with the number only."           -> "82"
  - weekday arithmetic:  "Which day of the week is 3 days after Monday? Answer with the day only." -> "Thursday"
Seeded, so every machine writes the same files; no eval question is also a training question.

    python benchmarks/exact_match_data.py                 # writes benchmarks/data/exact_match/{train,eval}.jsonl
    python benchmarks/exact_match_data.py --train 320 --eval 48 --seed 22 --out DIR
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}? Answer with the number only.", str(a + b)


def weekday(rng: random.Random) -> tuple[str, str]:
    start, k = rng.randrange(7), rng.randint(1, 20)  # 7 x 20 x 2 = 280 distinct questions
    after = rng.random() < 0.5
    day = DAYS[(start + k) % 7] if after else DAYS[(start - k) % 7]
    unit = "day" if k == 1 else "days"
    return (f"Which day of the week is {k} {unit} {'after' if after else 'before'} {DAYS[start]}? "
            "Answer with the day only.", day)


def rows(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``n_train`` and ``n_eval`` distinct questions, alternating addition and weekday; eval drawn first."""
    if (n_train + n_eval + 1) // 2 > 280:
        raise SystemExit(f"at most 560 rows: there are 280 distinct weekday questions, {n_train + n_eval} rows asked")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict] = []
    makers = (addition, weekday)
    while len(out) < n_train + n_eval:
        question, answer = makers[len(out) % 2](rng)
        if question in seen:
            continue
        seen.add(question)
        out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return out[n_eval:], out[:n_eval]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=320)
    ap.add_argument("--eval", type=int, default=48)
    ap.add_argument("--seed", type=int, default=22)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "data" / "exact_match"))
    args = ap.parse_args()
    train, evals = rows(args.train, args.eval, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("eval", evals)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        print(f"{out / f'{name}.jsonl'}: {len(part)} rows")


if __name__ == "__main__":
    main()
