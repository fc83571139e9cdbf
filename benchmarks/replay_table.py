"""The table a replay reads (benchmarks/README.md#table-format): one row per configuration of a grid.

A table is a CSV, or a JSON list of rows, with an optional meta JSON beside it (same name, ``.json``;
for a JSON table, ``<name>.meta.json``). Columns:

- configuration columns: the meta's ``settings`` (else every column that is not reserved, below), named
  as llmtune settings; the meta's ``execution`` names those that are execution settings;
- ``status`` (optional): ``complete``; ``stopped``, a run its own sweep stopped early (its curve ends where
  it stopped, ``train_time_s`` is what it spent): replayed like a complete run up to its last curve point,
  where it ends pruned unless llmtune's pruner stopped it first; anything else is a failed or infeasible
  trial (a diverged run: ``train_time_s`` is what it cost before it was stopped);
- repeated runs of one configuration (several rows with the same settings, e.g. seeds): replayed as one
  configuration whose numbers are their mean over the runs that completed (``runs``: how many were averaged;
  the configuration fails only when no run completed), so that seed noise does not pick the front;
- ``train_time_s`` (required): training seconds of the whole run;
- curve: ``loss@F`` (F a fraction of the budget) or ``loss@step:N`` (step N of ``steps``, the row's
  step count, else of the largest N in the table); ``train_s@F`` / ``train_s@step:N`` seconds spent
  up to that point (optional: else ``train_time_s`` x F);
- probe columns (optional): ``probe_s`` (seconds a probe of the row's execution variant costs),
  ``probe_train_time_s``, ``probe_train_throughput``, ``probe_peak_memory_gb``;
- objectives: any numeric columns (``eval_loss``, ``train_throughput``, ``peak_memory_gb``...).
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from optuna._hypervolume import compute_hypervolume

REF = 1.1  # reference point in scaled objective space: the table's worst value is 1.0
# Columns that are never configuration columns when a table comes without a meta.
RESERVED = frozenset({"status", "reason", "config_id", "kind", "steps", "cost_runs", "eval_loss", "train_throughput",
                      "trainable_params", "padding_share"})
RESERVED_SUFFIXES = ("_s", "_ms", "_gb")  # metrics: seconds, milliseconds, gigabytes
CURVE_COLUMN = re.compile(r"^(loss|train_s|wall_s)@(step:)?([0-9.eE+-]+)$")


@dataclass
class Table:
    """Every configuration of a grid with what its fine-tune measured."""

    grid: dict[str, list[Any]]
    objectives: list[tuple[str, str]]
    rungs: list[float]
    rows: dict[tuple[Any, ...], dict[str, Any]] = field(default_factory=dict)
    cost: str = "train"  # "train": training seconds; "wall": the trial process's whole time (load, evals...)
    execution: list[str] = field(default_factory=list)  # configuration columns that are execution settings
    unrecorded: int = 0  # grid points without a (complete) row: a table still being recorded

    def charge(self, row: dict[str, Any], rung: float | None = None) -> float:
        """Seconds a trial costs: run to the end (rung None) or stopped at ``rung``."""
        total = float(row.get("train_time_s" if self.cost == "train" else "wall_time_s") or 0.0)
        if rung is None:
            return total
        spent = at_rung(row, "train_s" if self.cost == "train" else "wall_s", rung)
        return total * rung if spent is None else spent

    def key(self, params: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(params[name] for name in self.grid)

    @property
    def learning(self) -> list[str]:
        return [n for n in self.grid if n not in self.execution]

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


def final_loss(row: dict[str, Any], objectives: list[tuple[str, str]]) -> float:
    """A row's loss at the end of its run, the last point of its curve: ``eval_loss``, or for a table whose loss
    objective is named otherwise (no eval_loss column), the first objective."""
    return float(row["eval_loss"] if row.get("eval_loss") is not None else row[objectives[0][0]])


def at_rung(row: dict[str, Any], what: str, fraction: float) -> float | None:
    """A row's ``loss`` or ``train_s`` at a fraction of the budget: the recorded point (columns are named
    like ``loss@0.111111``; an empty cell: never evaluated there), else linear interpolation between the
    neighbouring recorded points; None before the first or after the last point."""
    name = f"{what}@{round(fraction, 6):g}"
    if name in row:
        return None if row[name] is None else float(row[name])
    points = sorted((float(k.partition("@")[2]), float(v)) for k, v in row.items()
                    if k.startswith(f"{what}@") and v is not None)
    for (f0, v0), (f1, v1) in zip(points, points[1:], strict=False):
        if f0 <= fraction <= f1:
            return v0 + (v1 - v0) * (fraction - f0) / (f1 - f0)
    return None


# ------------------------------------------------------------------------------------------ reading


def _value(cell: Any) -> Any:
    """A configuration cell as a typed value: bool, int, float, else the text."""
    if not isinstance(cell, str):
        return cell
    if cell in ("True", "true", "False", "false"):
        return cell.lower() == "true"
    for kind in (int, float):
        try:
            return kind(cell)
        except ValueError:
            pass
    return cell


def _parse(cell: Any, choices: list[Any]) -> Any:
    for choice in choices:
        if str(choice) == str(cell) or (isinstance(choice, float) and not isinstance(choice, bool) and _close(cell, choice)):
            return choice
    raise ValueError(f"table value {cell!r} is not one of the grid's choices {choices}")


def _close(cell: Any, choice: float) -> bool:
    try:
        return math.isclose(float(cell), choice, rel_tol=1e-9)
    except (TypeError, ValueError):
        return False


def _number(cell: Any) -> Any:
    if cell in ("", "None", None):
        return None
    try:
        return float(cell)
    except (TypeError, ValueError):
        return cell


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".meta.json") if path.suffix == ".json" else path.with_suffix(".json")


def _choices_in_meta(meta: dict[str, Any], name: str) -> list[Any] | None:
    """A setting's choices from the meta's grid: flat ({name: [...]}) or grouped ({"learning": {name: [...]}})."""
    grid = meta.get("grid") or {}
    if isinstance(grid.get(name), list):
        return grid[name]
    for group in grid.values():
        if isinstance(group, dict) and isinstance(group.get(name), list):
            return group[name]
    return None


def config_columns(columns: list[str], objectives: list[tuple[str, str]]) -> list[str]:
    """Configuration columns of a table without a meta: every column that is not reserved."""
    names = {m for m, _ in objectives}
    return [c for c in columns if c not in RESERVED and c not in names and "@" not in c
            and not c.startswith("probe_") and not c.endswith(RESERVED_SUFFIXES)]


def _curve_columns(raw: dict[str, Any], largest_step: float) -> dict[str, Any]:
    """``loss@step:N`` -> ``loss@F`` with F = N / the row's ``steps`` (else the table's largest N)."""
    out = {}
    steps = _number(raw.get("steps")) or largest_step
    for k, v in raw.items():
        m = CURVE_COLUMN.match(k)
        if m and m.group(2):
            out[f"{m.group(1)}@{round(float(m.group(3)) / float(steps), 6):g}"] = _number(v)
    return out


def read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a JSON table is a list of rows (objects)")
        return [{k: ("" if v is None else v) for k, v in r.items()} for r in rows]
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load_table(path: str | Path, objectives: list[tuple[str, str]], missing: str = "keep") -> Table:
    """Read a table in the documented format (module docstring). ``missing``: what to do about grid points
    without a (complete) row, as in a table still being recorded: "error" here; "fail": a failed trial
    costing 0 s; "keep": a replay that lands on a point without a row stops with an error, one without its
    objectives or cost fails."""
    path = Path(path)
    meta_file = _meta_path(path)
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    raws = read_rows(path)
    if not raws:
        raise ValueError(f"{path}: the table has no rows")
    columns = list(raws[0])
    settings = list(meta.get("settings") or [n for n in (meta.get("grid") or {}) if isinstance(meta["grid"][n], list)]
                    or config_columns(columns, objectives))
    absent = [n for n in settings + ["train_time_s"] if n not in columns]
    absent += [m for m, _ in objectives if m not in columns]
    if absent:
        raise ValueError(f"{path}: no column {', '.join(absent)} (columns: {', '.join(columns)})")
    grid = {}
    for name in settings:
        seen = list(dict.fromkeys(_value(r[name]) for r in raws))
        listed = _choices_in_meta(meta, name)
        grid[name] = listed if listed is not None else sorted(seen, key=lambda v: (str(type(v)), v))
    largest = max((float(m.group(3)) for c in columns if (m := CURVE_COLUMN.match(c)) and m.group(2)), default=1.0)
    table = Table(grid=grid, objectives=objectives, rungs=[float(r) for r in meta.get("rungs", [1 / 9, 1 / 3])],
                  execution=[n for n in meta.get("execution", []) if n in grid])
    dropped = 0
    runs: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for raw in raws:
        params = {name: _parse(raw[name], choices) for name, choices in grid.items()}
        row: dict[str, Any] = {"status": str(raw.get("status") or "complete")}
        for k, v in raw.items():
            if k not in grid and k != "status" and "@step:" not in k:
                row[k] = _number(v)  # an empty curve cell stays None: that point was never evaluated
        row.update(_curve_columns(raw, largest))
        needed = [m for m, _ in objectives] if row["status"] == "complete" else []  # a stopped run: its cost and curve
        if row["status"] in DONE and any(row.get(m) is None for m in [*needed, "train_time_s"]):
            dropped += 1  # a partly recorded row (its costs not measured yet): no trial can land on it
            row["status"] = "unrecorded"
        runs.setdefault(table.key(params), []).append(row)
    table.rows = {key: mean_of_runs(rows) for key, rows in runs.items()}
    size = math.prod(len(v) for v in grid.values())
    table.unrecorded = dropped + size - len(table.rows)
    if table.unrecorded and missing == "error":
        raise ValueError(f"{path}: {size - len(table.rows)} of the grid's {size} configurations have no row and "
                         f"{dropped} lack an objective or train_time_s (replay a partial table with --missing fail)")
    if len(table.rows) < size and missing == "fail":
        names = list(grid)
        for combo in np.ndindex(*[len(grid[n]) for n in names]):
            key = tuple(grid[n][i] for n, i in zip(names, combo, strict=True))
            table.rows.setdefault(key, {"status": "missing", "train_time_s": 0.0})
    return table.finish()


DONE = ("complete", "stopped")  # rows with a curve and their objectives measured


def mean_of_runs(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's repeated runs as one row: every number averaged over the runs that completed
    (else over those stopped early, else over all: a failure's cost is what the failures cost on average)."""
    if len(rows) == 1:
        return rows[0]
    done = [r for r in rows if r["status"] == "complete"] or [r for r in rows if r["status"] in DONE] or rows
    out: dict[str, Any] = {"status": done[0]["status"], "runs": len(done)}
    for k in dict.fromkeys(k for r in done for k in r):
        if k in ("status", "runs"):
            continue
        values = [r.get(k) for r in done]
        numbers = [float(v) for v in values if isinstance(v, float | int) and not isinstance(v, bool)]
        out[k] = float(np.mean(numbers)) if numbers and len(numbers) == len(values) else values[0]
    return out


def exclude(table: Table, item: str) -> Table:
    """The table without one choice of one setting (``quantization=4bit``)."""
    name, _, value = item.partition("=")
    if name not in table.grid:
        raise SystemExit(f"--exclude {item!r}: {name!r} is not a setting of the grid ({', '.join(table.grid)})")
    drop = _parse(value, table.grid[name])
    index = list(table.grid).index(name)
    grid = {**table.grid, name: [c for c in table.grid[name] if c != drop]}
    rows = {k: r for k, r in table.rows.items() if k[index] != drop}
    return replace(table, grid=grid, rows=rows).finish()


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
    return replace(table, rows=rows).finish()


def synthetic_table(grid: dict[str, list[Any]], objectives: list[tuple[str, str]], seed: int = 0,
                    rungs: tuple[float, ...] = (1 / 27, 1 / 9, 1 / 3), execution: tuple[str, ...] = (),
                    crossing: bool = False) -> Table:
    """A made-up table with a learnable structure (tests and dry runs of the replayer, never results).

    Each choice of each setting adds a fixed random effect to the final loss (execution settings: none,
    as in a real table), the throughput and the peak memory; the loss curve decays towards the final
    loss, and training seconds grow linearly with the fraction. Probe columns: a probe costs 5% of the
    run and projects its seconds within +-10%. ``crossing``: early losses rank the final ones backwards
    (what ends best starts worst, as slow learning rates can), fading linearly to the true order at the end.
    """
    rng = np.random.default_rng(seed)
    effects = {name: rng.normal(size=(len(choices), 3)) for name, choices in grid.items()}
    for name in execution:
        effects[name][:, 0] = 0.0
    table = Table(grid=grid, objectives=objectives, rungs=list(rungs), execution=list(execution))
    names = list(grid)
    for index in np.ndindex(*[len(grid[n]) for n in names]):
        params = {n: grid[n][i] for n, i in zip(names, index, strict=True)}
        loss, speed, memory = (sum(effects[n][i][j] for n, i in zip(names, index, strict=True)) for j in range(3))
        loss, speed, memory = 4.0 + 0.2 * loss, math.exp(0.3 * speed), math.exp(0.2 * memory)
        seconds = 10.0 / speed
        row: dict[str, Any] = {"status": "complete", "eval_loss": loss, "train_throughput": 1000.0 * speed,
                               "train_time_s": seconds, "peak_memory_gb": memory, "trainable_params": float(index[0] + 1)}
        for f in rungs:
            early = (8.0 - loss) if crossing else loss
            row[f"loss@{round(f, 6):g}"] = f * loss + (1 - f) * early + 1.5 * (1 - f) ** 2
            row[f"train_s@{round(f, 6):g}"] = seconds * f
        error = 1.0 + 0.1 * rng.uniform(-1, 1)
        row.update(probe_s=0.05 * seconds, probe_train_time_s=seconds * error, probe_peak_memory_gb=memory,
                   probe_train_throughput=1000.0 * speed / error)
        table.rows[table.key(params)] = row
    return table.finish()
