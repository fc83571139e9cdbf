"""A step's layout, before and after: llmtune with each step's micro batches in the stream's order (before
2026-12-07) and longest first (`llmtune.harness.data._lay_out`), unpacked and packed, against transformers'
Trainer + DataCollatorWithFlattening; the tiny model, harness_speed.py's settings, interleaved rounds, each
run in its own forked process. Prints real tokens/s (wall and per CPU second of the optimizer steps) and
the eval loss, which must agree to float error (the same examples a step; only the layout differs).

    python benchmarks/harness_layout_ab.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness_speed as hs  # noqa: E402

from llmtune.harness import data as D  # noqa: E402


def in_stream_order(examples: list[D.Example], micro_batch_size: int, sequence_len: int, packing: bool,
                    pad_id: int) -> list[D.Batch]:
    """The layout before 2026-12-07: micro batches, and packed rows filled greedily, in the stream's order."""
    if not packing:
        return [D._pad_batch(examples[i: i + micro_batch_size], pad_id) for i in range(0, len(examples), micro_batch_size)]
    rows: list[list[D.Example]] = []
    used = 0
    for e in examples:
        if not rows or used + len(e) > sequence_len:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += len(e)
    return [D._packed_batch(rows[i: i + micro_batch_size], pad_id) for i in range(0, len(rows), micro_batch_size)]


def llmtune_in_order(recipe: Any, packing: bool, work: Path) -> dict[str, Any]:
    D._lay_out = in_stream_order  # in the forked child only
    return hs.run_llmtune(recipe, packing, work)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--examples", type=int, default=256)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["LLMTUNE_THREADS"] = "1"
    torch.set_num_threads(1)
    from llmtune.config.recipe import recipe_from_dict

    args = argparse.Namespace(device="cpu", examples=a.examples, lora_r=8, sequence_len=256, micro_batch=8, batch_size=None,
                              model="tiny")
    work = Path(hs.tempfile.mkdtemp(prefix="llmtune-layout-ab-"))
    recipe = recipe_from_dict(hs.bench_recipe(args, hs.build_model("tiny", "cpu"), work))
    names = ["in_order", "longest_first", "trainer_flat", "in_order_packed", "longest_first_packed"]
    rows: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    print("load average before", os.getloadavg())
    for rnd in range(a.rounds):
        for n in names[rnd % len(names):] + names[:rnd % len(names)]:  # rotated: no contestant always first
            if n == "trainer_flat":
                r = hs.isolated(hs.run_trainer, recipe, "cpu", work, "trainer_flat")
            else:
                r = hs.isolated(llmtune_in_order if n.startswith("in_order") else hs.run_llmtune, recipe,
                                n.endswith("packed"), work)
            rows[n].append(r)
            print(f"round {rnd + 1} {n:<21} {r['tokens_per_s']:6.0f} real tokens/s wall, {r['step_tokens_per_cpu_s']:6.0f} "
                  f"per CPU s, padding {r.get('padding_share', 0.0):.1%}, eval loss {r['eval_loss']:.7f}", flush=True)
    print("load average after", os.getloadavg())

    def ratio(x: str, y: str, key: str) -> float:
        return statistics.median(u[key] / v[key] for u, v in zip(rows[x], rows[y], strict=True))

    print("\n| ratio (median of within-round ratios) | wall | optimizer steps, CPU s | wall, per round |\n| --- | --- | --- | --- |")
    for x, y in (("longest_first", "in_order"), ("longest_first", "trainer_flat"), ("in_order", "trainer_flat"),
                 ("longest_first_packed", "in_order_packed"), ("longest_first_packed", "trainer_flat"),
                 ("in_order_packed", "trainer_flat")):
        per_round = ", ".join(f"{u['tokens_per_s'] / v['tokens_per_s']:.2f}" for u, v in zip(rows[x], rows[y], strict=True))
        print(f"| {x} / {y} | {ratio(x, y, 'tokens_per_s'):.2f}x | {ratio(x, y, 'step_tokens_per_cpu_s'):.2f}x | {per_round} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
