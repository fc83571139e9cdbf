"""What quality on generations costs a trial: seconds spent generating and scoring (exact_match on
``measure.generation_examples`` eval rows, greedy, batched) and measuring forgetting, against seconds spent
training, in the same trial.

Each round runs one trial in this process (`llmtune.harness.train.run_trial`, as a trial process runs it)
with objectives eval_loss, exact_match and forgetting; the table holds the median over rounds of the
training loop's seconds (`info.train_loop_s`), the evaluations' (`eval_s`), generating the answers
(`generation_s`), scoring them (`scoring_s`) and forgetting (`forgetting_s`: the base's greedy answers to
16 general prompts, then the loss of both models on them), and generating / training.

    python benchmarks/generation_cost.py                       # tiny model, CPU
    python benchmarks/generation_cost.py --model llmtune/smollm2-135m --data llmtune/tiny-chat --format chat
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llmtune/tiny")
    ap.add_argument("--data", default="llmtune/tiny-tasks")
    ap.add_argument("--format", default="instruction")
    ap.add_argument("--examples", type=int, default=256, help="training examples per trial")
    ap.add_argument("--generation-examples", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generation_cost.json"))
    args = ap.parse_args()

    from llmtune.config.recipe import recipe_from_dict
    from llmtune.harness.train import run_trial

    keys = ("train_loop_s", "eval_s", "generation_s", "scoring_s", "forgetting_s")
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe_from_dict({
            "name": "generation-cost", "model": {"name": args.model},
            "data": {"source": args.data, "format": args.format, "eval_max_length": 192, "max_eval_examples": 128},
            "train": {"budget": {"examples": args.examples}, "eval_points": 1, "eval_batch_size": 16,
                      **({"threads": args.threads} if args.threads else {})},
            "measure": {"latency": False, "generation_examples": args.generation_examples,
                        "max_new_tokens": args.max_new_tokens},
            "search": {"learning_rate": 2e-3, "lora_r": 8, "sequence_len": 128, "micro_batch_size": 8,
                       "lora_target_modules": "all-linear", "lora_dropout": 0.0},
            "objectives": {"eval_loss": None, "exact_match": None, "forgetting": None},
            "output_dir": str(Path(tmp) / "run")})
        for i in range(args.rounds):
            res = run_trial(recipe, recipe.space.complete({}), Path(tmp) / f"t{i}", save_adapter=False)
            if res.status != "complete":
                raise SystemExit(f"round {i}: trial ended {res.status}: {res.reason}")
            row = {k: float(res.info[k]) for k in keys}
            row.update(exact_match=res.metrics["exact_match"], forgetting=res.metrics["forgetting"],
                       generated_tokens=float(res.info["generated_tokens"]))
            rounds.append(row)
            print(f"round {i}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()), flush=True)
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    ratio = (median["generation_s"] + median["scoring_s"]) / median["train_loop_s"]
    print(f"\n{args.model}, {args.examples} training examples, {args.generation_examples} answers of at most "
          f"{args.max_new_tokens} tokens (median of {args.rounds}):")
    print(f"  training {median['train_loop_s']:.2f} s | evals {median['eval_s']:.2f} s | generating + scoring "
          f"{median['generation_s'] + median['scoring_s']:.2f} s ({ratio:.2f}x training) | forgetting "
          f"{median['forgetting_s']:.2f} s ({median['forgetting_s'] / median['train_loop_s']:.2f}x training)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rounds": rounds, "median": median,
                                          "generating_over_training": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
