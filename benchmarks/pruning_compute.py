"""Training compute to reach the same Pareto-front hypervolume, with and without ASHA pruning.

Runs two real searches on the offline tiny CPU task, side by side in one process: the same recipe,
sampler and seed, once with `pruner: none` and once with `pruner: asha`. Objectives: eval loss and
trainable parameters (both deterministic on CPU, so the comparison is not blurred by timing noise).
For each search it accumulates the trials' training seconds in trial order and tracks the
hypervolume of the feasible front found so far; it prints the seconds each needs to reach 90% and
100% of the hypervolume that the unpruned search ends with, and their ratio.

    python benchmarks/pruning_compute.py [--trials 16] [--out benchmarks/results/pruning_compute.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from optuna._hypervolume import compute_hypervolume

import llmtune
from llmtune.deliver.front import pareto_front

SEARCH = {
    "learning_rate": {"low": 1.0e-5, "high": 1.0e-2, "log": True},
    "lora_r": [2, 4, 8, 16, 32],
    "lora_target_modules": ["qv", "all-linear"],
    "sequence_len": 128,
    "micro_batch_size": 8,
    "lora_dropout": 0.0,
}


def recipe(out: Path, pruner: str, trials: int) -> dict:
    return {
        "name": f"bench-{pruner}",
        "model": {"name": "llmtune/tiny"},
        "data": {"source": "llmtune/tiny-tasks", "eval_max_length": 160, "max_eval_examples": 48},
        "train": {"budget": {"examples": 256}, "eval_points": 1},
        "measure": {"latency": False},
        "search": SEARCH,
        "objectives": {"eval_loss": "minimize", "trainable_params": "minimize"},
        "study": {"n_trials": trials, "sampler": "tpe", "seed": 7, "trial_timeout": 900, "pruner": pruner,
                  "pruner_settings": {"eta": 3, "min_fraction": 1 / 9, "min_trials_per_rung": 3} if pruner != "none" else {}},
        "output_dir": str(out / pruner),
    }


def hv_curve(result, reference: np.ndarray) -> list[tuple[float, float]]:
    """(cumulative trial seconds, hypervolume of the front so far) after each trial."""
    trials = sorted(result.all_trials, key=lambda t: t.number)
    spent, curve = 0.0, []
    for i, t in enumerate(trials):
        spent += t.duration.total_seconds() if t.duration else 0.0
        front = pareto_front(trials[: i + 1], result.directions)
        points = np.array([t.values for t in front]) if front else np.empty((0, 2))
        hv = compute_hypervolume(points, reference) if len(points) else 0.0
        curve.append((spent, float(hv)))
    return curve


def seconds_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((s for s, hv in curve if hv >= target - 1e-12), None)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--out", default="benchmarks/results/pruning_compute.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmtune-bench-"))
    results, wall = {}, {}
    for pruner in ("none", "asha"):
        t0 = time.time()
        results[pruner] = llmtune.search(recipe(work, pruner, args.trials))
        wall[pruner] = time.time() - t0
    values = np.array([t.values for r in results.values() for t in pareto_front(r.all_trials, r.directions)])
    reference = values.max(axis=0) * 1.1
    curves = {k: hv_curve(r, reference) for k, r in results.items()}
    final = curves["none"][-1][1]
    rows = []
    for level in (0.9, 1.0):
        a, b = seconds_to(curves["none"], level * final), seconds_to(curves["asha"], level * final)
        rows.append({"target": f"{int(level * 100)}% of unpruned final HV", "seconds_no_pruning": a,
                     "seconds_asha": b, "ratio_asha_over_none": (b / a) if a and b else None})
    summary = {
        "machine": platform.platform(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
        "trials": args.trials, "wall_s": wall,
        "pruned": sum(1 for t in results["asha"].all_trials if t.user_attrs.get("llmtune.status") == "pruned"),
        "summed_trial_s": {k: c[-1][0] for k, c in curves.items()},
        "final_hv": {k: c[-1][1] for k, c in curves.items()}, "rows": rows,
    }
    print(f"{'target':<30} {'no pruning (s)':>15} {'ASHA (s)':>10} {'ratio':>8}")
    for r in rows:
        fmt = lambda v: "never" if v is None else f"{v:.1f}"  # noqa: E731
        ratio = "—" if r["ratio_asha_over_none"] is None else f"{r['ratio_asha_over_none']:.2f}"
        print(f"{r['target']:<30} {fmt(r['seconds_no_pruning']):>15} {fmt(r['seconds_asha']):>10} {ratio:>8}")
    print(f"pruned {summary['pruned']}/{args.trials} trials; summed trial seconds: "
          f"none {summary['summed_trial_s']['none']:.1f}, asha {summary['summed_trial_s']['asha']:.1f}; "
          f"final HV none {summary['final_hv']['none']:.4g}, asha {summary['final_hv']['asha']:.4g}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
