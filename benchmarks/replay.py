"""Replay samplers and pruners against a recorded tabular LoRA benchmark, as if the trials were real.

Each replay is a real Optuna study driven by ask/tell: the sampler proposes a configuration of the
table's grid (through llmtune's own SearchSpace), the table answers with what that fine-tune
measured, and the pruner decides at each rung from the learning curves stored in the trials' user
attributes, exactly as llmtune's search loop stores them. A completed trial costs its recorded
training seconds; a pruned one the training seconds it had spent when it reached its rung.

Quality is the hypervolume of the feasible front found so far divided by the hypervolume of the
table's true front (objectives turned to minimisation, scaled to [0, 1] by the table's best and
worst values; reference point 1.1 in every objective).

    python3 benchmarks/replay.py --table benchmarks/results/tabular_cpu.csv [--seeds 20] [--jobs 4]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume
from optuna.trial import TrialState

from llmtune.config.space import SearchSpace
from llmtune.study.attrs import CURVE, RUNG_METRICS, STATUS
from llmtune.study.pruners import make_pruner
from llmtune.study.rungs import PARTIAL_METRICS

REF = 1.1  # reference point in scaled objective space: the table's worst value is 1.0
SAMPLERS = ("llmtune", "llmtune-new", "random", "grid", "nsga2", "tpe")
DEFAULT_OBJECTIVES = "eval_loss:minimize,train_throughput:maximize"
SECOND_SHARES = (0.01, 0.02, 0.05)  # training-seconds budgets, as shares of what the whole grid cost


@dataclass
class Table:
    """Every configuration of a grid with what its fine-tune measured."""

    grid: dict[str, list[Any]]
    objectives: list[tuple[str, str]]
    rungs: list[float]
    rows: dict[tuple[Any, ...], dict[str, Any]] = field(default_factory=dict)
    cost: str = "train"  # "train": training seconds; "wall": the trial process's whole time (load, evals...)

    def charge(self, row: dict[str, Any], rung: float | None = None) -> float:
        """Seconds a trial costs: run to the end (rung None) or stopped at ``rung``."""
        if rung is None:
            return float(row.get("train_time_s" if self.cost == "train" else "wall_time_s") or 0.0)
        return float(at_rung(row, "train_s" if self.cost == "train" else "wall_s", rung) or 0.0)

    def key(self, params: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(params[name] for name in self.grid)

    def scaled(self, row: dict[str, Any]) -> np.ndarray:
        """Objective vector of a row, minimised and scaled so the table spans [0, 1]."""
        return (self._signed(row) - self._lo) / self._span

    def _signed(self, row: dict[str, Any]) -> np.ndarray:
        return np.array([float(row[m]) * (1 if d == "minimize" else -1) for m, d in self.objectives])

    def finish(self) -> Table:
        """Fix the scaling from the complete rows; call once all rows are in."""
        done = [self._signed(r) for r in self.rows.values() if r["status"] == "complete"]
        if not done:
            raise ValueError("the table has no complete configuration to build a front from")
        values = np.array(done)
        self._lo = values.min(axis=0)
        self._span = np.maximum(values.max(axis=0) - self._lo, 1e-12)
        self.true_hv = hypervolume(np.array([self.scaled(r) for r in self.rows.values() if r["status"] == "complete"]))
        return self


def true_front_size(table: Table) -> int:
    points = np.array([table.scaled(r) for r in table.rows.values() if r["status"] == "complete"])
    dominated = ((points[:, None, :] <= points[None, :, :]).all(2) & (points[:, None, :] < points[None, :, :]).any(2)).any(0)
    return int((~dominated).sum())


def hypervolume(points: np.ndarray) -> float:
    if len(points) == 0:
        return 0.0
    return float(compute_hypervolume(points, np.full(points.shape[1], REF)))


def _parse(cell: str, choices: list[Any]) -> Any:
    for choice in choices:
        if str(choice) == cell or (isinstance(choice, float) and not isinstance(choice, bool) and _close(cell, choice)):
            return choice
    raise ValueError(f"table value {cell!r} is not one of the grid's choices {choices}")


def _close(cell: str, choice: float) -> bool:
    try:
        return math.isclose(float(cell), choice, rel_tol=1e-9)
    except ValueError:
        return False


def load_table(csv_path: str | Path, objectives: list[tuple[str, str]]) -> Table:
    """Read tabular_<tag>.csv and its tabular_<tag>.json (grid and rungs)."""
    csv_path = Path(csv_path)
    meta = json.loads(csv_path.with_suffix(".json").read_text())
    table = Table(grid=meta["grid"], objectives=objectives, rungs=[float(r) for r in meta["rungs"]])
    with open(csv_path, newline="") as f:
        for raw in csv.DictReader(f):
            params = {name: _parse(raw[name], choices) for name, choices in table.grid.items()}
            row: dict[str, Any] = {"status": raw["status"]}
            for k, v in raw.items():
                if k not in table.grid and k != "status":
                    try:
                        row[k] = float(v) if v not in ("", "None") else None
                    except ValueError:
                        row[k] = v
            table.rows[table.key(params)] = row
    return table.finish()


def exclude(table: Table, item: str) -> Table:
    """The table without one choice of one setting (``quantization=4bit``)."""
    name, _, value = item.partition("=")
    if name not in table.grid:
        raise SystemExit(f"--exclude {item!r}: {name!r} is not a setting of the grid ({', '.join(table.grid)})")
    drop = _parse(value, table.grid[name])
    index = list(table.grid).index(name)
    grid = {**table.grid, name: [c for c in table.grid[name] if c != drop]}
    rows = {k: r for k, r in table.rows.items() if k[index] != drop}
    return Table(grid=grid, objectives=table.objectives, rungs=table.rungs, rows=rows, cost=table.cost).finish()


# Settings that change the numbers but not the computation: a config's speed and memory cannot depend
# on them, so runs differing only in these measure the same thing (up to timing noise).
NUMERIC_ONLY = frozenset({"learning_rate", "lora_alpha_ratio", "lora_alpha", "warmup_ratio", "warmup_steps"})
COST_METRICS = ("train_throughput", "train_time_s", "peak_memory_gb", "latency_ms", "ttft_ms")


def pool_speed(table: Table) -> Table:
    """Timing and memory of each row replaced by their mean over the rows with the same computation.

    On a CPU shared by many workers single timings scatter by ~10%; averaging the runs that only differ
    in NUMERIC_ONLY settings gives each configuration its expected speed. Per-rung seconds scale with it.
    """
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    same = [i for i, n in enumerate(table.grid) if n not in NUMERIC_ONLY]
    for key, row in table.rows.items():
        if row["status"] == "complete":
            groups.setdefault(tuple(key[i] for i in same), []).append(row)
    rows = {}
    for key, row in table.rows.items():
        peers = groups.get(tuple(key[i] for i in same))
        new = dict(row)
        if row["status"] == "complete" and peers:
            for m in COST_METRICS:
                if all(p.get(m) is not None for p in peers):
                    new[m] = float(np.mean([float(p[m]) for p in peers]))
            scale = new["train_time_s"] / float(row["train_time_s"]) if row.get("train_time_s") else 1.0
            for k in row:
                if k.startswith(("train_s@", "wall_s@")) and row[k] is not None:
                    new[k] = float(row[k]) * scale
        rows[key] = new
    return Table(grid=table.grid, objectives=table.objectives, rungs=table.rungs, rows=rows, cost=table.cost).finish()


def at_rung(row: dict[str, Any], what: str, fraction: float) -> float | None:
    """A row's ``loss`` or ``train_s`` at a rung fraction (columns are named like ``loss@0.111111``)."""
    value = row.get(f"{what}@{round(fraction, 6):g}")
    return None if value is None else float(value)


def make_sampler(name: str, table: Table, space: SearchSpace, seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    """The samplers compared: llmtune's choice for this recipe, and Optuna's defaults."""
    if name == "llmtune":
        from llmtune.study.samplers import make_sampler as llmtune_sampler

        return llmtune_sampler("auto", space, len(table.objectives), n_trials, seed, parallel=False)[0]
    if name == "llmtune-new":
        from llmtune.study.samplers import default_sampler

        return default_sampler(space, n_objectives=len(table.objectives), n_trials=n_trials, seed=seed)[0]
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":  # llmtune's `sampler: grid` (Optuna's grid sampler): every grid point once, seeded order
        from llmtune.study.samplers import SAMPLERS

        return SAMPLERS["grid"].build(space, len(table.objectives), n_trials, seed, False)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "tpe":  # Optuna's default sampler, with its default settings
        return optuna.samplers.TPESampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")


def replay_pruner(spec: str, table: Table) -> Any:
    """A pruner from its replay name: "asha", "hyperband", "none"; "<name>-loss" ranks on eval loss alone
    (llmtune before multi-objective pruning); settings after colons, as in the recipe's pruner section:
    "asha:min_fraction=0.333333:eta=2"."""
    name, *settings = spec.split(":")
    loss_only = name.endswith("-loss")
    kwargs = dict(s.split("=", 1) for s in settings)
    return make_pruner(name.removesuffix("-loss"), objectives=None if loss_only else dict(table.objectives), **kwargs)


def replay(table: Table, sampler_name: str, pruner_name: str, seed: int, n_trials: int,
           planned: int | None = None) -> dict[str, list]:
    """One replayed search. Per trial: cumulative training seconds, HV ratio, whether it was pruned,
    its own cost, the rung it was pruned at (None: it completed) and its configuration's key.
    ``planned`` is the n_trials llmtune's samplers are configured for (default: n_trials)."""
    space = SearchSpace.from_dict(table.grid)
    sampler = make_sampler(sampler_name, table, space, seed, planned or n_trials)
    pruner = replay_pruner(pruner_name, table)
    study = optuna.create_study(directions=[d for _, d in table.objectives], sampler=sampler)
    spent, front = 0.0, []
    out: dict[str, list] = {"seconds": [], "hv_ratio": [], "pruned": [], "cost": [], "rung": [], "key": []}
    for _ in range(n_trials):
        trial = study.ask()
        values = space.suggest(trial)
        row = table.rows.get(table.key(values))
        if row is None:
            raise ValueError(f"the table has no configuration {table.key(values)}: record the whole grid")
        cost, pruned_at = replay_trial(study, trial, row, pruner, table.objectives, table.charge)
        spent += cost
        if pruned_at is None and row["status"] == "complete":
            front.append(table.scaled(row))
        out["seconds"].append(spent)
        out["hv_ratio"].append(hypervolume(np.array(front)) / table.true_hv if front else 0.0)
        out["pruned"].append(pruned_at is not None)
        out["cost"].append(cost)
        out["rung"].append(pruned_at)
        out["key"].append(table.key(values))
    return out


def partial_metrics(row: dict[str, Any], rung: float, names: list[str]) -> dict[str, float]:
    """What a trial has measured of its other objectives when it reaches ``rung``, from the table.

    Throughput so far: the rung's share of the trial's real tokens (the budget is in examples, so
    about proportional) over the training seconds recorded up to the rung; train_time_s: those
    seconds extrapolated to the whole budget; memory and parameter count: the final values (the
    peak is reached in the first steps; the count is known before training).
    """
    seconds = at_rung(row, "train_s", rung) or 0.0
    out: dict[str, float] = {}
    for name in names:
        if name not in PARTIAL_METRICS or row.get(name) is None:
            continue
        if name == "train_throughput" and seconds > 0:
            out[name] = rung * float(row["train_throughput"]) * float(row["train_time_s"]) / seconds
        elif name == "train_time_s" and seconds > 0:
            out[name] = seconds / rung
        else:
            out[name] = float(row[name])
    return out


def replay_trial(study: optuna.Study, trial: optuna.Trial, row: dict[str, Any], pruner: Any,
                 objectives: list[tuple[str, str]], charge: Any = None) -> tuple[float, float | None]:
    """Tell the study what the recorded run measured, pruning at rungs as llmtune's loop does.

    Returns (seconds charged, the rung where it was pruned or None); ``charge(row, rung)`` prices
    a trial (default: recorded training seconds).
    """
    charge = charge or Table(grid={}, objectives=[], rungs=[]).charge
    storage, tid = study._storage, trial._trial_id
    if row["status"] != "complete":
        storage.set_trial_user_attr(tid, STATUS, row["status"])
        study.tell(trial, state=TrialState.FAIL)
        return charge(row), None
    curve: list[list[float]] = []
    partial: list[list[Any]] = []
    for rung in pruner.rungs_for_trial(trial.number):
        loss = at_rung(row, "loss", rung)
        if loss is None:
            if f"loss@{round(rung, 6):g}" not in row:
                raise ValueError(f"the table has no eval loss at rung {rung:.4g}: record it with the pruner's rungs")
            # Two rungs fell on the same optimizer step (short packed runs): the harness evaluates
            # that step once, at the later rung, so this one is never reported and never decides.
            continue
        curve.append([rung, loss])
        metrics = partial_metrics(row, rung, [m for m, _ in objectives])
        partial.append([rung, metrics])
        # A copy each time: the in-memory storage keeps the object, and llmtune writes a new list too.
        storage.set_trial_user_attr(tid, CURVE, list(curve))
        storage.set_trial_user_attr(tid, RUNG_METRICS, list(partial))
        if pruner.should_prune(study, trial.number, rung, loss, metrics):
            storage.set_trial_user_attr(tid, STATUS, "pruned")
            study.tell(trial, state=TrialState.PRUNED)
            return charge(row, rung), rung
    curve.append([1.0, float(row["eval_loss"])])
    storage.set_trial_user_attr(tid, CURVE, curve)
    storage.set_trial_user_attr(tid, STATUS, "complete")
    study.tell(trial, [float(row[m]) for m, _ in objectives])
    return charge(row), None



def synthetic_table(grid: dict[str, list[Any]], objectives: list[tuple[str, str]], seed: int = 0,
                    rungs: tuple[float, ...] = (1 / 27, 1 / 9, 1 / 3)) -> Table:
    """A made-up table with a learnable structure (tests and dry runs of the replayer, never results).

    Each choice of each setting adds a fixed random effect to the final loss and to the throughput;
    the loss curve decays towards the final loss, and training seconds grow linearly with the fraction.
    """
    rng = np.random.default_rng(seed)
    effects = {name: rng.normal(size=(len(choices), 2)) for name, choices in grid.items()}
    table = Table(grid=grid, objectives=objectives, rungs=list(rungs))
    names = list(grid)
    for index in np.ndindex(*[len(grid[n]) for n in names]):
        params = {n: grid[n][i] for n, i in zip(names, index, strict=True)}
        loss = 4.0 + 0.2 * sum(effects[n][i][0] for n, i in zip(names, index, strict=True))
        speed = math.exp(0.3 * sum(effects[n][i][1] for n, i in zip(names, index, strict=True)))
        seconds = 10.0 / speed
        row: dict[str, Any] = {"status": "complete", "eval_loss": loss, "train_throughput": 1000.0 * speed,
                               "train_time_s": seconds, "trainable_params": float(index[0] + 1)}
        for f in rungs:
            row[f"loss@{round(f, 6):g}"] = loss + 1.5 * (1 - f) ** 2
            row[f"train_s@{round(f, 6):g}"] = seconds * f
        table.rows[table.key(params)] = row
    return table.finish()


# ------------------------------------------------------------------------------------------ summary


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(q25, median, q75); inf (never reached) is kept as inf rather than poisoning the interpolation."""
    x = np.array([min(v, 1e18) for v in values], dtype=float)
    out = tuple(float(np.percentile(x, q)) for q in (25, 50, 75))
    return tuple(math.inf if v >= 1e17 else v for v in out)  # type: ignore[return-value]


def seconds_to(run: dict[str, list], level: float) -> float:
    """Training seconds spent when the HV ratio first reached ``level`` (inf: never within the run)."""
    return next((s for s, hv in zip(run["seconds"], run["hv_ratio"], strict=True) if hv >= level - 1e-9), math.inf)


def hv_at_seconds(run: dict[str, list], seconds: float) -> float:
    """HV ratio of the front found by the last trial finished within ``seconds``."""
    best = 0.0
    for s, hv in zip(run["seconds"], run["hv_ratio"], strict=True):
        if s > seconds:
            break
        best = hv
    return best


def summarise(runs: dict[str, list[dict[str, list]]], budgets: list[int], grid_seconds: float) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for method, seeds in runs.items():
        entry: dict[str, Any] = {}
        for n in budgets:
            entry[f"hv@{n}"] = quantiles([r["hv_ratio"][min(n, len(r["hv_ratio"])) - 1] for r in seeds])
            entry[f"seconds@{n}"] = quantiles([r["seconds"][min(n, len(r["seconds"])) - 1] for r in seeds])
        for level in (0.9, 0.95):
            entry[f"seconds_to_{int(level * 100)}"] = quantiles([seconds_to(r, level) for r in seeds])
        for share in SECOND_SHARES:
            entry[f"hv@{share:.0%}s"] = quantiles([hv_at_seconds(r, share * grid_seconds) for r in seeds])
        entry["pruned_share"] = float(np.mean([np.mean(r["pruned"]) for r in seeds]))
        out[method] = entry
    return out


def _ratio(a: float, b: float) -> float | None:
    if math.isinf(a) or math.isinf(b) or b == 0:
        return None
    return a / b


def ratios(summary: dict[str, dict[str, Any]], budgets: list[int], samplers: list[str], pruners: list[str],
           ours: str = "llmtune") -> dict[str, Any]:
    """llmtune / random and llmtune / Optuna's default (TPE), and each sampler with / without pruning."""
    out: dict[str, Any] = {}
    for pruner in pruners:
        mine = summary.get(f"{ours}+{pruner}")
        for peer in ("random", "tpe"):
            theirs = summary.get(f"{peer}+{pruner}")
            if mine is None or theirs is None:
                continue
            key = f"{ours}/{peer} ({pruner})"
            out[key] = {f"hv@{n}": _ratio(mine[f"hv@{n}"][1], theirs[f"hv@{n}"][1]) for n in budgets}
            out[key]["seconds_to_90"] = _ratio(mine["seconds_to_90"][1], theirs["seconds_to_90"][1])
    base = pruners[0]
    for sampler in samplers:
        for pruner in pruners[1:]:
            a, b = summary.get(f"{sampler}+{pruner}"), summary.get(f"{sampler}+{base}")
            if a and b:
                out[f"{sampler}: {pruner}/{base} seconds_to_90"] = _ratio(a["seconds_to_90"][1], b["seconds_to_90"][1])
    return out


def _fmt(q: tuple[float, float, float], digits: int = 3) -> str:
    if math.isinf(q[1]):
        return "never"
    hi = "never" if math.isinf(q[2]) else f"{q[2]:.{digits}g}"
    return f"{q[1]:.{digits}g} [{q[0]:.{digits}g}, {hi}]"


def markdown(summary: dict[str, dict[str, Any]], rat: dict[str, Any], budgets: list[int], meta: dict[str, Any]) -> str:
    lines = [
        f"# Replay of samplers and pruners on `{meta['table']}`",
        "",
        f"{meta['date']}; table: {meta['configs']} configurations recorded on {meta['machine']}"
        + (f" (+{meta['failed']} that crashed: failed trials in the replay, charged 0 training seconds)"
           if meta["failed"] else "") + "; "
        f"objectives {meta['objectives']}; {meta['seeds']} seeds x {meta['trials']} trials; "
        f"cost = recorded {meta['cost']} seconds (pruned trials: seconds up to their rung); "
        f"the whole grid costs {meta['grid_seconds']:.0f} s; its true front has {meta['true_front_size']} "
        "configurations. Cells: median [q25, q75] over seeds.",
        "",
        "| sampler + pruner | " + " | ".join(f"HV ratio @{n} trials" for n in budgets)
        + " | " + " | ".join(f"HV ratio @{s:.0%} of grid s" for s in SECOND_SHARES)
        + " | s to 90% HV | s to 95% HV | pruned |",
        "|---" * (len(budgets) + len(SECOND_SHARES) + 4) + "|",
    ]
    for method, e in summary.items():
        cells = ([_fmt(e[f"hv@{n}"]) for n in budgets] + [_fmt(e[f"hv@{s:.0%}s"]) for s in SECOND_SHARES]
                 + [_fmt(e["seconds_to_90"]), _fmt(e["seconds_to_95"])])
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {e['pruned_share']:.0%} |")
    lines += ["", "Ratios (of medians):", ""]
    for key, value in rat.items():
        if isinstance(value, dict):
            parts = ", ".join(f"{k} {'—' if v is None else f'{v:.2f}'}" for k, v in value.items())
            lines.append(f"- {key}: {parts}")
        else:
            lines.append(f"- {key}: {'— (one never reached 90%)' if value is None else f'{value:.2f}'}")
    lines += ["", "Targets:", ""] + [f"- {t}" for t in meta["targets"]]
    return "\n".join(lines) + "\n"


def targets(summary: dict[str, dict[str, Any]], rat: dict[str, Any], ours: str, pruners: list[str]) -> list[str]:
    out = []
    mine = summary.get(f"{ours}+none")
    if mine and "hv@20" in mine:
        v = mine["hv@20"][1]
        out.append(f"{ours} reaches >= 95% of the true HV within 20 trials (median): {v:.3f} -> "
                   f"{'MET' if v >= 0.95 else 'MISSED'}")
    r = rat.get(f"{ours}/random (none)", {}).get("seconds_to_90")
    out.append(f"{ours} needs <= 0.5x random's training seconds to reach 90%: "
               f"{'—' if r is None else f'{r:.2f}x'} -> {'MET' if r is not None and r <= 0.5 else 'MISSED'}")
    for pruner in pruners[1:]:
        r = rat.get(f"{ours}: {pruner}/none seconds_to_90")
        out.append(f"{ours} with {pruner}: seconds to 90% <= 1/3 of no pruning: "
                   f"{'—' if r is None else f'{r:.2f}x'} -> {'MET' if r is not None and r <= 1 / 3 else 'MISSED'}")
    return out


def plot(runs: dict[str, list[dict[str, list]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(r["seconds"][-1] for seeds in runs.values() for r in seeds)
    xs = np.geomspace(1.0, top, 200)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors: dict[str, Any] = {}
    for method, seeds in runs.items():
        sampler, _, pruner = method.partition("+")
        color = colors.setdefault(sampler, f"C{len(colors)}")
        curves = np.array([[hv_at_seconds(r, x) for x in xs] for r in seeds])
        q25, med, q75 = np.percentile(curves, [25, 50, 75], axis=0)
        style = {"none": "-", "asha": "--"}.get(pruner, ":")
        ax.plot(xs, med, style, color=color, label=method, lw=1.4)
        if pruner == "none":  # one band per sampler keeps the figure readable
            ax.fill_between(xs, q25, q75, color=color, alpha=0.07)
    ax.set_xscale("log")
    ax.set_xlabel("training seconds spent (recorded)")
    ax.set_ylabel("HV of found front / HV of true front")
    ax.set_ylim(0, 1.02)
    ax.axhline(0.9, color="grey", lw=0.6, ls=":")
    ax.set_title(title, fontsize=8, wrap=True)
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- driver

_TABLE: Table | None = None


def _init(table: Table) -> None:
    global _TABLE
    _TABLE = table
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _job(job: tuple[str, str, int, int, int]) -> tuple[str, int, dict[str, list]]:
    sampler, pruner, seed, trials, planned = job
    assert _TABLE is not None
    return f"{sampler}+{pruner}", seed, replay(_TABLE, sampler, pruner, seed, trials, planned)


def parse_objectives(text: str) -> list[tuple[str, str]]:
    out = []
    for part in text.split(","):
        name, _, direction = part.strip().partition(":")
        if direction not in ("minimize", "maximize"):
            raise SystemExit(f"--objectives: {part!r} needs a direction, e.g. eval_loss:minimize")
        out.append((name, direction))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", default="benchmarks/results/tabular_cpu.csv", help="or 'synthetic' for a dry run")
    p.add_argument("--objectives", default=DEFAULT_OBJECTIVES, help="name:direction,... (columns of the table)")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--trials", type=int, default=80, help="trials per replay (budgets are read off its prefix)")
    p.add_argument("--budgets", default="10,20,40")
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--pruners", default="none,asha")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--exclude", action="append", metavar="SETTING=VALUE",
                   help="drop one choice from the grid and its rows (e.g. quantization=4bit); repeatable")
    p.add_argument("--pool-speed", action="store_true",
                   help="average timing/memory over runs that differ only in learning rate, alpha, warmup")
    p.add_argument("--cost", choices=("train", "wall"), default="train",
                   help="train: recorded training seconds; wall: the trial's whole recorded time")
    p.add_argument("--out", default="benchmarks/results", help="folder for replay.md/.json/_hv.png")
    p.add_argument("--tag", default="replay")
    args = p.parse_args(argv)
    objectives = parse_objectives(args.objectives)
    if args.table == "synthetic":  # a dry run of the replayer itself; its numbers mean nothing
        sys.path.insert(0, str(Path(__file__).parent))
        from tabular_record import GRIDS

        table = synthetic_table(GRIDS["cpu"], objectives)
        table_meta: dict[str, Any] = {"machine": {"platform": "synthetic"}}
    else:
        table = load_table(args.table, objectives)
        table_meta = json.loads(Path(args.table).with_suffix(".json").read_text())
    table.cost = args.cost
    for item in args.exclude or []:
        table = exclude(table, item)
    if args.pool_speed:
        table = pool_speed(table)
    budgets = [int(b) for b in args.budgets.split(",")]
    samplers, pruners = args.samplers.split(","), args.pruners.split(",")
    if pruners[0] != "none":
        raise SystemExit("--pruners: list 'none' first (the baseline the pruned runs are compared with)")
    # llmtune's samplers are set up for the largest budget reported, as a user asking for that many would.
    jobs = [(s, pr, seed, args.trials, max(budgets)) for s in samplers for pr in pruners for seed in range(args.seeds)]
    t0 = time.time()
    runs: dict[str, list[dict[str, list]]] = {f"{s}+{pr}": [] for s in samplers for pr in pruners}
    with mp.get_context("fork").Pool(args.jobs, initializer=_init, initargs=(table,)) as pool:
        for method, _seed, run in pool.imap_unordered(_job, jobs):
            runs[method].append(run)
    grid_seconds = sum(table.charge(r) for r in table.rows.values())
    summary = summarise(runs, budgets, grid_seconds)
    rat = ratios(summary, budgets, samplers, pruners, ours="llmtune-new" if "llmtune-new" in samplers else "llmtune")
    m = table_meta.get("machine", {})
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "table": str(args.table) + "".join(f" without {e}" for e in args.exclude or [])
        + (", speed pooled over runs with the same computation" if args.pool_speed else ""),
        "configs": sum(r["status"] == "complete" for r in table.rows.values()),
        "failed": sum(r["status"] != "complete" for r in table.rows.values()),
        "machine": f"{m.get('platform', '?')}, {m.get('cpu_count', '?')} CPUs, device {m.get('device', '?')}",
        "objectives": ", ".join(f"{n} ({d[:3]})" for n, d in objectives), "seeds": args.seeds, "trials": args.trials,
        "grid_seconds": grid_seconds, "true_front_size": true_front_size(table),
        "replay_wall_s": round(time.time() - t0, 1), "cost": "training" if args.cost == "train" else "wall-clock trial",
    }
    ours = "llmtune-new" if "llmtune-new" in samplers else "llmtune"
    meta["targets"] = targets(summary, rat, ours, pruners)
    text = markdown(summary, rat, budgets, meta)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.md").write_text(text)
    (out / f"{args.tag}.json").write_text(json.dumps({"meta": meta, "summary": summary, "ratios": rat},
                                                     indent=1, default=str))
    plot(runs, out / f"{args.tag}_hv.png", f"{meta['table']}\n{meta['objectives']}; {args.seeds} seeds: median "
         "(band: IQR without pruning); solid: no pruning, dashed: asha, dotted: other")
    return 0


if __name__ == "__main__":
    sys.exit(main())
