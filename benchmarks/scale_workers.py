"""Trial throughput with 1, 2 and 4 workers on one machine, and what the study costs per trial.

Runs the same search (offline tiny CPU task, random sampler, the same n_trials) three times, side by
side in one process, with ``workers`` = 1, 2 and 4, each on a fresh study. For each it reports trials
per minute (first ask to last tell) and the ratio to 1 worker, and splits a trial's time in three:

- study overhead: the search process's own time on the trial (ask to tell, minus the trial process's
  life): suggesting, the memory gate, storage writes, spawning, telling;
- process start: the trial process's life minus the trial's own measured wall time (Python, torch and
  transformers imports; the price of one process per trial);
- trial: the harness's wall time (load, train, eval, latency).

The memory estimator's first call in a process loads transformers (several seconds, once per search
process, not per trial); it is warmed up before the runs so that it does not land on one run's first
trial. On a 2-core machine 4 workers cannot scale; the table says what this machine did, nothing more.

With several workers llmtune gives each trial process cpu_count / workers threads; one worker's trial
uses torch's default (all cores). ``--threads-per-trial 1`` gives every run one thread per trial, which
separates the effect of running trials side by side from that of torch's threading. Each invocation
adds its table to the results file under its label.

    python benchmarks/scale_workers.py [--trials 8] [--workers 1,2,4] [--threads-per-trial N] [--storage URL]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the tiny task is a CPU benchmark

from optuna.trial import TrialState  # noqa: E402

from llmtune.config.recipe import recipe_from_dict  # noqa: E402
from llmtune.study.loop import INFO, Search, mask_url  # noqa: E402


def recipe(out: Path, name: str, trials: int) -> dict:
    return {
        "name": name,
        "model": {"name": "llmtune/tiny"},
        "data": {"source": "llmtune/tiny-tasks", "eval_max_length": 128, "max_eval_examples": 16,
                 "max_train_examples": 200},
        "train": {"budget": {"examples": 64}, "eval_points": 1, "eval_batch_size": 16},
        "measure": {"latency_prompts": 1, "max_new_tokens": 2},
        "search": {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}, "lora_r": [2, 4, 8, 16],
                   "sequence_len": 128, "micro_batch_size": 8, "lora_target_modules": "all-linear",
                   "lora_dropout": 0.0},
        "objectives": {"eval_loss": "minimize", "peak_memory_gb": "minimize"},
        "study": {"n_trials": trials, "sampler": "random", "seed": 3, "trial_timeout": 900},
        "output_dir": str(out / name),
    }


def warm_up(out: Path) -> float:
    """Pay the one-off imports of the memory estimator now; returns their seconds."""
    from llmtune.study.gate import predicted_peak_gb

    r = recipe_from_dict(recipe(out, "warm-up", 1))
    t0 = time.time()
    predicted_peak_gb(r, r.space.complete({}), None)
    return time.time() - t0


def run(workers: int, trials: int, out: Path, storage: str | None) -> dict:
    name = f"scale-w{workers}-{uuid.uuid4().hex[:6]}"
    load = os.getloadavg()[0]
    search = Search(recipe_from_dict(recipe(out, name, trials)), storage=storage, workers=workers,
                    log=lambda m: print(f"  [{workers}w] {m}", file=sys.stderr))
    study = search.run()
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert len(done) == trials, f"{len(done)} of {trials} trials completed"
    first = min(t.datetime_start for t in done).timestamp()
    last = max(t.datetime_complete for t in done).timestamp()
    span = (last - first) / 60
    overhead, start, trial = [], [], []
    for t in done:
        info = t.user_attrs[INFO]
        told = (t.datetime_complete - t.datetime_start).total_seconds()
        overhead.append(told - info["process_wall_s"])
        start.append(info["process_wall_s"] - info["wall_time_s"])
        trial.append(info["wall_time_s"])

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    return {"workers": workers, "trials": trials, "load_at_start": load, "minutes": span, "trials_per_min": trials / span,
            "study_overhead_s": mean(overhead), "process_start_s": mean(start), "trial_s": mean(trial),
            "overhead_share": mean(overhead) / mean([o + s + w for o, s, w in zip(overhead, start, trial, strict=True)])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--storage", help="an Optuna storage URL (default: a fresh SQLite file per run)")
    p.add_argument("--threads-per-trial", type=int, help="torch threads in every trial process (default: llmtune's choice)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "scale_workers.json"))
    args = p.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    if args.threads_per_trial:
        # The 1-worker run reads it from the environment; for more workers llmtune sets cpu_count / workers.
        assert all(max(1, (os.cpu_count() or 1) // w) == args.threads_per_trial for w in counts if w > 1), \
            "--threads-per-trial must equal cpu_count / workers for every worker count > 1"
        os.environ["LLMTUNE_THREADS"] = str(args.threads_per_trial)
    label = (f"{args.threads_per_trial} thread(s) per trial" if args.threads_per_trial
             else "llmtune's default threads (1 worker: all cores; N workers: cpu_count / N each)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmtune-scale-") as tmp:
        warm = warm_up(Path(tmp))
        for w in counts:
            t0 = time.time()
            rows.append(run(w, args.trials, Path(tmp), args.storage))
            print(f"{w} worker(s): {rows[-1]['trials_per_min']:.2f} trials/min ({time.time() - t0:.0f}s)", file=sys.stderr)
    base = rows[0]["trials_per_min"]
    for r in rows:
        r["ratio_to_1"] = r["trials_per_min"] / base
    header = ("| workers | trials/min | ratio to 1 worker | study overhead s/trial | process start s/trial | trial s "
              "| overhead share | load avg at start |")
    lines = [header, "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['trials_per_min']:.2f} | {r['ratio_to_1']:.2f}x | {r['study_overhead_s']:.2f} | "
                     f"{r['process_start_s']:.1f} | {r['trial_s']:.1f} | {100 * r['overhead_share']:.1f}% | "
                     f"{r['load_at_start']:.1f} |")
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, storage "
               f"{mask_url(args.storage) if args.storage else 'SQLite'}, {args.trials} trials per run, tiny CPU task; "
               f"one-off memory-estimator warm-up per search process: {warm:.1f}s (not in the table)")
    table = "\n".join(lines)
    print(table)
    print(machine)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(out.read_text()) if out.exists() else {}
    runs = runs if "machine" not in runs else {}  # an older layout: start over
    runs[label] = {"machine": machine, "rows": rows, "table": table}
    out.write_text(json.dumps(runs, indent=2))
    out.with_suffix(".md").write_text(
        "# Trial throughput by workers (benchmarks/scale_workers.py)\n\n"
        "study overhead: ask to tell minus the trial process's life. process start: the trial process's life "
        "minus the harness's wall time. trial: the harness's wall time (one trial, as the worker count changes).\n\n"
        + "".join(f"## {k}\n\n{v['table']}\n\n{v['machine']}\n\n" for k, v in runs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
