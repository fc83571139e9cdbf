"""Population-based training against ASHA and random search at equal training compute, on the tiny task.

For each seed, three real searches on the offline tiny CPU task with a long budget (1200 examples, 150
optimizer steps of 8), one thread per trial process: ``strategy: pbt`` (population 4, a segment every
quarter of the budget: 16 segment trials = 4 trials' worth of training), ``pruner: asha`` with llmtune's
default sampler, and random search without pruning. The compute of a method is the summed training CPU
seconds of its trials (`train_cpu_s`: what other jobs on a shared machine blur least). PBT spends what it
spends; ASHA and random run more trials than they need and are cut afterwards to the prefix of their trials
(in the order they ran, one worker) whose compute is closest to PBT's, so each is judged at PBT's compute.

Per seed it records the final eval loss of the chosen trial (lowest eval loss on the front) and the
hypervolume of the (eval loss, trainable parameters) front, reference point (the untrained model's eval
loss, 1.1 x the largest adapter), and prints both as PBT / ASHA and PBT / random ratios (loss: < 1 is PBT
better; hypervolume: > 1 is PBT better). Wall seconds (trial processes, model loading included) are kept
too: PBT pays one model load per segment.

    python benchmarks/pbt_vs_asha.py [--seeds 5] [--jobs 2] [--out benchmarks/results/pbt_vs_asha]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SEARCH = {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}, "lora_r": [4, 8, 16],
          "lora_dropout": {"low": 0.0, "high": 0.2}, "sequence_len": 128, "micro_batch_size": 8,
          "lora_target_modules": "all-linear"}
OBJECTIVES = {"eval_loss": "minimize", "trainable_params": "minimize"}
METHODS = {
    "pbt": {"strategy": "pbt", "pruner": "none", "sampler": "auto", "n_trials": 16,
            "pbt_settings": {"population": 4, "interval": 0.25, "quantile": 0.25}},
    "asha": {"pruner": "asha", "sampler": "auto", "n_trials": 14,
             "pruner_settings": {"eta": 3, "min_fraction": 1 / 9, "min_trials_per_rung": 3}},
    "random": {"pruner": "none", "sampler": "random", "n_trials": 6},
}


BUDGET = int(os.environ.get("LLMTUNE_BENCH_EXAMPLES", "1200"))  # smaller only to smoke-test this script


def recipe(method: str, seed: int, out: Path) -> dict:
    return {
        "name": f"{method}-{seed}", "model": {"name": "llmtune/tiny"},
        "data": {"source": "llmtune/tiny-tasks", "eval_max_length": 160, "max_eval_examples": 48},
        "train": {"budget": {"examples": BUDGET}, "eval_points": 3, "threads": 1, "seed": 100 + seed},
        "measure": {"latency": False}, "search": SEARCH, "objectives": OBJECTIVES,
        "study": {"seed": seed, "trial_timeout": 1800, **METHODS[method]}, "output_dir": str(out / f"{method}-{seed}"),
    }


def run_one(method: str, seed: int, out: Path) -> dict:
    """One search (in this process); every trial's status, values and compute, in the order they ran."""
    import llmtune
    from llmtune.study.attrs import DIR, INFO, LINEAGE, METRICS_KEY, STATUS

    started = time.time()
    result = llmtune.search(recipe(method, seed, out), workers=1)
    rows = []
    for t in sorted(result.study.get_trials(), key=lambda t: t.number):
        status = t.user_attrs.get(STATUS)
        if status in (None, "surplus", "running"):
            continue
        info = {}
        path = Path(t.user_attrs.get(DIR, "")) / "result.json"
        if path.exists():
            info = json.loads(path.read_text()).get("info", {})
        curve = t.user_attrs.get("llmtune.curve") or []
        rows.append({"trial": t.number, "status": status, "params": t.params,
                     "metrics": t.user_attrs.get(METRICS_KEY) or {}, "cpu_s": info.get("train_cpu_s", 0.0),
                     "train_s": info.get("train_loop_s", 0.0),
                     "wall_s": (t.user_attrs.get(INFO) or {}).get("process_wall_s", 0.0),
                     "base_loss": next((loss for f, loss in curve if f == 0.0), None),
                     "lineage": {k: v for k, v in (t.user_attrs.get(LINEAGE) or {}).items() if k != "schedule"}})
    return {"method": method, "seed": seed, "trials": rows, "search_wall_s": time.time() - started}


def hypervolume(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by the points (both minimised) inside the reference box."""
    area, best_y = 0.0, ref[1]
    for x, y in sorted(p for p in points if p[0] < ref[0] and p[1] < ref[1]):
        if y < best_y:  # a horizontal strip from this point to the reference
            area += (ref[0] - x) * (best_y - y)
            best_y = y
    return area


def summarize(run: dict, budget: float | None, ref: tuple[float, float]) -> dict:
    """Chosen loss, hypervolume and compute of a run, cut at ``budget`` CPU seconds (None: all of it)."""
    trials = run["trials"]
    if budget is not None:  # the prefix whose compute is closest to the budget
        best_n, best_gap, total = 0, budget, 0.0
        for n, t in enumerate(trials, 1):
            total += t["cpu_s"]
            if abs(total - budget) < best_gap:
                best_n, best_gap = n, abs(total - budget)
        trials = trials[:best_n]
    done = [t for t in trials if t["status"] == "complete" and math.isfinite(t["metrics"].get("eval_loss", math.nan))]
    points = [(t["metrics"]["eval_loss"], t["metrics"]["trainable_params"]) for t in done]
    return {"trials": len(trials), "complete": len(done), "cpu_s": sum(t["cpu_s"] for t in trials),
            "wall_s": sum(t["wall_s"] for t in trials),
            "chosen_loss": min((p[0] for p in points), default=math.nan), "hypervolume": hypervolume(points, ref)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=2, help="searches run at once (each trial uses one thread)")
    ap.add_argument("--work", default="/tmp/llmtune-pbt-bench")
    ap.add_argument("--out", default="benchmarks/results/pbt_vs_asha")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    if args.one:
        method, seed = args.one[0], int(args.one[1])
        (work / f"{method}-{seed}.json").write_text(json.dumps(run_one(method, seed, work / "runs")))
        return
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    jobs = [(m, s) for s in range(args.seeds) for m in METHODS]

    def launch(job: tuple[str, int]) -> None:
        m, s = job
        if (work / f"{m}-{s}.json").exists():
            return
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        log = (work / f"{m}-{s}.log").open("w")
        subprocess.run([sys.executable, __file__, "--work", str(work), "--one", m, str(s)], env=env, stdout=log,
                       stderr=subprocess.STDOUT, check=False)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(launch, jobs))
    runs = {(m, s): json.loads((work / f"{m}-{s}.json").read_text()) for m, s in jobs if (work / f"{m}-{s}.json").exists()}
    per_seed = []
    for s in range(args.seeds):
        if not all((m, s) in runs for m in METHODS):
            continue
        every = [t for m in METHODS for t in runs[(m, s)]["trials"]]
        base = next(t["base_loss"] for t in every if t["base_loss"] is not None)
        ref = (base, 1.1 * max(t["metrics"].get("trainable_params", 0.0) for t in every))
        pbt = summarize(runs[("pbt", s)], None, ref)
        row = {"seed": s, "reference": ref, "pbt": pbt}
        for m in ("asha", "random"):
            row[m] = summarize(runs[(m, s)], pbt["cpu_s"], ref)
            row[f"{m}_uncut"] = summarize(runs[(m, s)], None, ref)
            row[f"loss_ratio_vs_{m}"] = pbt["chosen_loss"] / row[m]["chosen_loss"]
            row[f"hv_ratio_vs_{m}"] = pbt["hypervolume"] / row[m]["hypervolume"] if row[m]["hypervolume"] else math.inf
            row[f"compute_ratio_vs_{m}"] = pbt["cpu_s"] / row[m]["cpu_s"] if row[m]["cpu_s"] else math.inf
            row[f"wall_ratio_vs_{m}"] = pbt["wall_s"] / row[m]["wall_s"] if row[m]["wall_s"] else math.inf
        per_seed.append(row)

    def agg(key: str) -> dict:
        vals = [r[key] for r in per_seed if math.isfinite(r[key])]
        gmean = math.exp(statistics.mean(math.log(v) for v in vals)) if vals else math.nan
        return {"geomean": gmean, "min": min(vals, default=math.nan), "max": max(vals, default=math.nan),
                "pbt_better": (sum(1 for v in vals if (v < 1 if key.startswith("loss") else v > 1))
                               if key.startswith(("loss", "hv")) else "")}

    keys = [f"{k}_vs_{m}" for m in ("asha", "random") for k in ("loss_ratio", "hv_ratio", "compute_ratio", "wall_ratio")]
    summary = {k: agg(k) for k in keys}
    out = {"machine": platform.platform(), "python": platform.python_version(), "seeds": len(per_seed),
           "methods": METHODS, "search": SEARCH, "budget_examples": BUDGET, "wall_s": time.time() - started,
           "summary": summary, "per_seed": per_seed, "runs": {f"{m}-{s}": r for (m, s), r in runs.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(out, indent=1, default=str))
    lines = [f"# PBT vs ASHA vs random at equal training compute ({len(per_seed)} seeds)", "",
             f"Tiny task, {BUDGET} examples ({BUDGET // 8} steps of 8) per trial, one thread per trial; compute = summed training "
             "CPU seconds; ASHA and random cut to PBT's compute. Loss ratio < 1 and hypervolume ratio > 1 favour PBT.",
             "", "| seed | PBT loss | ASHA loss | random loss | loss PBT/ASHA | loss PBT/random | HV PBT/ASHA | "
             "HV PBT/random | compute PBT/ASHA | compute PBT/random | wall PBT/ASHA | wall PBT/random |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in per_seed:
        lines.append(f"| {r['seed']} | {r['pbt']['chosen_loss']:.4f} | {r['asha']['chosen_loss']:.4f} | "
                     f"{r['random']['chosen_loss']:.4f} | {r['loss_ratio_vs_asha']:.3f} | {r['loss_ratio_vs_random']:.3f} | "
                     f"{r['hv_ratio_vs_asha']:.3f} | {r['hv_ratio_vs_random']:.3f} | {r['compute_ratio_vs_asha']:.2f} | "
                     f"{r['compute_ratio_vs_random']:.2f} | {r['wall_ratio_vs_asha']:.2f} | {r['wall_ratio_vs_random']:.2f} |")
    lines += ["", "| ratio | geometric mean | min | max | seeds where PBT is better |", "| --- | --- | --- | --- | --- |"]
    for k, v in summary.items():
        lines.append(f"| {k} | {v['geomean']:.3f} | {v['min']:.3f} | {v['max']:.3f} | {v['pbt_better']} |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
