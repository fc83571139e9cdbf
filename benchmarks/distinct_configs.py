"""Distinct configurations per trial when several search processes share one study.

Each of `--workers` processes joins one SQLite study over a discrete space of 32 configurations, builds
its sampler the way the search does (`llmtune.study.samplers.study_sampler`: the recipe's sampler, with
a seed of its own from the study's seed, its process id and the trials already in the study) and runs
`--trials` trials without training: ask, `SearchSpace.suggest`, a short wait in place of training, a
made-up loss, tell. The processes start together (released by a file). Prints, for each sampler,
distinct configurations / trials: 1.0 means no trial ran a configuration another had run.

    python benchmarks/distinct_configs.py [--workers 3] [--trials 6] [--samplers auto,tpe,random,nsga2] [--seed 0]

tests/test_edges.py runs `run` for its check.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# 4 x 4 x 2 = 32 configurations
SPACE: dict[str, list[Any]] = {"lora_r": [4, 8, 16, 32], "learning_rate": [1e-4, 3e-4, 1e-3, 3e-3],
                               "sequence_len": [128, 256]}


def loss(values: dict[str, Any]) -> float:
    """A made-up eval loss with one best configuration (r 16, lr 1e-3, 256 tokens)."""
    return (abs(math.log2(values["lora_r"] / 16)) + abs(math.log10(values["learning_rate"] / 1e-3))
            + (values["sequence_len"] == 128) * 0.3 + 1.0)


def _worker(spec: dict[str, Any]) -> None:
    import optuna

    from llmtune.config.space import SearchSpace
    from llmtune.study.samplers import study_sampler
    from llmtune.study.storage import join_study, worker_id

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace.from_dict(spec["space"])
    study, _ = join_study(spec["url"], spec["study"], ["minimize"])
    study_sampler(study, spec["sampler"], space, 1, spec["n_trials"], spec["seed"], parallel=True, worker=worker_id())
    print("ready", flush=True)
    go = Path(spec["go"])
    while not go.exists():
        time.sleep(0.002)
    pause = random.Random(spec["index"])
    for _ in range(spec["trials"]):
        trial = study.ask()
        values = space.suggest(trial)
        time.sleep(pause.uniform(0.02, 0.1))  # training
        study.tell(trial, loss(values))


def run(sampler: str = "auto", *, workers: int = 3, trials: int = 6, seed: int = 0, url: str | None = None,
        study: str = "distinct", space: dict[str, list[Any]] | None = None) -> tuple[int, int]:
    """Run `workers` processes of `trials` trials each on one study; (distinct configurations, trials)."""
    import optuna

    with tempfile.TemporaryDirectory() as tmp:
        url = url or f"sqlite:///{Path(tmp) / 'study.db'}"
        go = Path(tmp) / "go"
        spec = {"url": url, "study": study, "sampler": sampler, "seed": seed, "trials": trials,
                "n_trials": workers * trials, "go": str(go), "space": space or SPACE}
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps({**spec, "index": i})],
                                  stdout=subprocess.PIPE, text=True) for i in range(workers)]
        try:
            for p in procs:
                assert p.stdout is not None and p.stdout.readline().strip() == "ready", "a worker did not start"
            go.touch()  # all at once
            for p in procs:
                if p.wait(timeout=300) != 0:
                    raise RuntimeError(f"a worker exited with {p.returncode}")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        done = optuna.load_study(study_name=study, storage=url).get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        return len({frozenset(t.params.items()) for t in done}), len(done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--trials", type=int, default=6, help="trials per worker")
    ap.add_argument("--samplers", default="auto,tpe,random,nsga2")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.worker:
        _worker(json.loads(args.worker))
        return
    print(f"{args.workers} workers x {args.trials} trials, one study, a space of 32 configurations, seed {args.seed}")
    for name in args.samplers.split(","):
        distinct, total = run(name, workers=args.workers, trials=args.trials, seed=args.seed)
        print(f"  {name:8s} distinct configurations / trials = {distinct}/{total} = {distinct / total:.2f}")


if __name__ == "__main__":
    main()
