"""Draw the README's Pareto figure (docs/images/pareto.png) from a search on the tiny model.

    python scripts/readme_figures.py                 # runs a small search (CPU, a few minutes), then draws
    python scripts/readme_figures.py runs/my-search  # draws from an existing search's output_dir

The PNG is drawn with matplotlib from the same traces as the report's interactive plotly figure
(plotly's own PNG export needs kaleido and a Chrome build, which llmtune does not require).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import llmtune
from llmtune.deliver.figures import pareto_png

ROOT = Path(__file__).resolve().parent.parent

RECIPE = {
    "name": "tiny-lora-rank-vs-loss",
    "model": {"name": "llmtune/tiny"},
    "data": {"source": "llmtune/tiny-tasks", "eval_max_length": 192, "max_eval_examples": 48, "max_train_examples": 600},
    "train": {"budget": {"examples": 160}, "eval_points": 2, "eval_batch_size": 16},
    "measure": {"latency_prompts": 1, "max_new_tokens": 2},
    "search": {"learning_rate": {"low": 5e-4, "high": 5e-3, "log": True}, "lora_r": [2, 4, 8, 16],
               "lora_target_modules": ["attention", "all-linear"], "sequence_len": 128, "micro_batch_size": 8},
    "objectives": {"eval_loss": "minimize", "trainable_params": "minimize"},
    "select": {"by": "knee"},
    "study": {"n_trials": 10, "sampler": "random", "seed": 1, "trial_timeout": 600},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output_dir", nargs="?", help="output_dir of an existing search (default: run a small one)")
    p.add_argument("--out", default=str(ROOT / "docs" / "images" / "pareto.png"))
    p.add_argument("--n-trials", type=int, default=RECIPE["study"]["n_trials"])
    args = p.parse_args(argv)
    if args.output_dir:
        result = llmtune.load_results(args.output_dir)
    else:
        result = llmtune.search({**RECIPE, "output_dir": str(ROOT / "runs" / "readme-figures")}, n_trials=args.n_trials, quiet=False)
    path = pareto_png(result, args.out)
    print(f"{path}: {len(result.all_trials)} trials, front {[t.number for t in result.pareto_front]}, "
          f"chosen {result.best.number if result.best else None}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
