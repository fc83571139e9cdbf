"""Summaries of replayed searches (benchmarks/replay.py): quantiles over seeds, ratios, targets, the figure.

A run is one replayed search: per trial the cumulative training seconds ("seconds"), the HV ratio of the
front found so far ("hv_ratio"), whether it was pruned, and the seconds spent on probes ("probe_s").
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

SECOND_SHARES = (0.01, 0.02, 0.05)  # training-seconds budgets, as shares of what the whole grid cost
LOSS_BUDGETS = (5, 10, 20)  # configurations after which the best loss found is reported (single-objective view)
LEVELS = (0.9, 0.95)  # HV ratios whose seconds are reported
# Issue 15's targets: seconds to 90% of the true front, llmtune's default over a baseline (or with / without
# pruning, same sampler), at most this ratio.
TARGETS = (("random+none", 0.33), ("tpe+none", 0.5), ("pruning", 0.5))


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


def configurations(run: dict[str, list]) -> list[int]:
    """How many configurations each told trial of a run had reached: a paused trial's continuation
    (`resumed`) is the same configuration trained on, so it counts for no trial budget; nor does a grid point
    a partial table does not hold (`missing`: the replay reads the table as the search space it recorded)."""
    out, n = [], 0
    told = len(run["hv_ratio"])
    for resumed, missing in zip(run.get("resumed") or [False] * told, run.get("missing") or [False] * told, strict=True):
        n += not (resumed or missing)
        out.append(n)
    return out


def at_trials(run: dict[str, list], n: int, what: str = "hv_ratio") -> float:
    """The HV ratio (or ``what``) once ``n`` configurations (and the continuations promoted before the next)
    were told; a run that found the whole front stopped early: its last value holds."""
    counts = configurations(run)
    last = max((i for i, c in enumerate(counts) if c <= n), default=0)
    return run[what][last]


def summarise(runs: dict[str, list[dict[str, list]]], budgets: list[int], grid_seconds: float) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for method, seeds in runs.items():
        entry: dict[str, Any] = {}
        for n in budgets:  # a run that found the whole front stopped early: its last value holds
            entry[f"hv@{n}"] = quantiles([at_trials(r, n) for r in seeds])
        for level in LEVELS:
            entry[f"seconds_to_{int(level * 100)}"] = quantiles([seconds_to(r, level) for r in seeds])
            entry[f"never_{int(level * 100)}"] = sum(math.isinf(seconds_to(r, level)) for r in seeds)
        for share in SECOND_SHARES:
            entry[f"hv@{share:.0%}s"] = quantiles([hv_at_seconds(r, share * grid_seconds) for r in seeds])
        entry["pruned_share"] = float(np.mean([np.mean(r["pruned"]) for r in seeds]))
        # Share of the seconds spent until 90% that went to probes (over seeds that got there).
        probe = [sum(p for p, s in zip(r.get("probe_s", []), r["seconds"], strict=False) if s <= seconds_to(r, 0.9))
                 / seconds_to(r, 0.9) for r in seeds if math.isfinite(seconds_to(r, 0.9)) and seconds_to(r, 0.9) > 0]
        entry["probe_share_to_90"] = float(np.mean(probe)) if probe else 0.0
        entry["trials_to_90"] = quantiles([float(next((c for c, hv in zip(configurations(r), r["hv_ratio"], strict=True)
                                                       if hv >= 0.9 - 1e-9), math.inf)) for r in seeds])
        if all("regret" in r for r in seeds):
            for n in LOSS_BUDGETS:
                entry[f"regret@{n}"] = quantiles([at_trials(r, n, "regret") for r in seeds])
        entry["resumed_share"] = float(np.mean([np.mean(r.get("resumed") or [False]) for r in seeds]))
        out[method] = entry
    return out


def _ratio(a: float, b: float) -> float | None:
    if math.isinf(a) or math.isinf(b) or b == 0:
        return None
    return a / b


def ratios(summary: dict[str, dict[str, Any]], ours: str) -> dict[str, dict[str, float | None]]:
    """Medians' ratios: ``ours`` over every other method, and every sampler with a pruner over itself
    without ("<sampler>: <pruner> / none")."""
    out: dict[str, dict[str, float | None]] = {}
    keys = [f"seconds_to_{int(level * 100)}" for level in LEVELS]
    mine = summary[ours]
    for method, theirs in summary.items():
        if method != ours:
            out[f"{ours} / {method}"] = {k: _ratio(mine[k][1], theirs[k][1]) for k in keys}
    for method, entry in summary.items():
        sampler, _, pruner = method.partition("+")
        base = summary.get(f"{sampler}+none")
        if pruner != "none" and base is not None:
            out[f"{sampler}: {pruner} / none"] = {k: _ratio(entry[k][1], base[k][1]) for k in keys}
    return out


def targets(rat: dict[str, dict[str, float | None]], ours: str) -> list[str]:
    out = []
    sampler, _, pruner = ours.partition("+")
    for peer, limit in TARGETS:
        key = f"{sampler}: {pruner} / none" if peer == "pruning" else f"{ours} / {peer}"
        what = (f"{sampler} with {pruner} vs without: seconds to 90%" if peer == "pruning"
                else f"{ours} vs {peer}: seconds to 90%")
        if key not in rat:
            out.append(f"{what} <= {limit}x: not measured ({key} not replayed)")
            continue
        r = rat[key]["seconds_to_90"]
        verdict = "MISSED (one never reached 90%)" if r is None else ("MET" if r <= limit else "MISSED")
        out.append(f"{what} <= {limit}x: {'—' if r is None else f'{r:.3f}x'} -> {verdict}")
    return out


def _fmt(q: tuple[float, float, float], digits: int = 3) -> str:
    if math.isinf(q[1]):
        return "never"
    hi = "never" if math.isinf(q[2]) else f"{q[2]:.{digits}g}"
    return f"{q[1]:.{digits}g} [{q[0]:.{digits}g}, {hi}]"


def _pct(q: list[float]) -> str:
    """Quantiles of a relative regret as percentages ("never": no loss found)."""
    if math.isinf(q[1]):
        return "never"
    return f"{100 * q[1]:.1f}% [{100 * q[0]:.1f}, " + ("never" if math.isinf(q[2]) else f"{100 * q[2]:.1f}") + "]"


def markdown(summary: dict[str, dict[str, Any]], rat: dict[str, Any], budgets: list[int], meta: dict[str, Any]) -> str:
    lines = [
        f"# Replay of samplers and pruners on `{meta['table']}`",
        "",
        f"{meta['date']}; table: {meta['configs']} configurations recorded on {meta['machine']}"
        + (f" (+{meta['failed']} failed or unrecorded: failed trials in the replay)" if meta["failed"] else "") + "; "
        f"objectives {meta['objectives']}; {meta['seeds']} seeds x up to {meta['trials']} trials (a replay stops "
        f"once it has the whole true front); cost = recorded {meta['cost']} seconds (pruned trials: seconds up to "
        f"their rung; under probes, plus every variant's probe); the whole grid costs {meta['grid_seconds']:.0f} s; "
        f"its true front has {meta['true_front_size']} configurations. Cells: median [q25, q75] over seeds. "
        f"{meta.get('notes', '')}",
        "",
        "| sampler + pruner | s to 90% HV | s to 95% HV | seeds never at 90% / 95% | " + " | ".join(f"HV @{s:.0%} of grid s" for s in SECOND_SHARES)
        + " | " + " | ".join(f"HV @{n} trials" for n in budgets) + " | trials to 90% | pruned | resumed | probe share |",
        "|---" * (len(budgets) + len(SECOND_SHARES) + 8) + "|",
    ]
    for method, e in summary.items():
        cells = ([_fmt(e["seconds_to_90"]), _fmt(e["seconds_to_95"]), f"{e['never_90']} / {e['never_95']}"] + [_fmt(e[f"hv@{s:.0%}s"]) for s in SECOND_SHARES]
                 + [_fmt(e[f"hv@{n}"]) for n in budgets] + [_fmt(e["trials_to_90"])])
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {e['pruned_share']:.0%} | {e.get('resumed_share', 0):.0%} | "
                     f"{e['probe_share_to_90']:.0%} |")
    if all(f"regret@{LOSS_BUDGETS[0]}" in e for e in summary.values()):
        lines += ["", "Single objective: the best loss found after 5 / 10 / 20 configurations, relative to the table's "
                  "best (the first objective; a stopped run's last value holds):", "",
                  "| sampler + pruner | " + " | ".join(f"regret @{n}" for n in LOSS_BUDGETS) + " |",
                  "|---" * (len(LOSS_BUDGETS) + 1) + "|"]
        for method, e in summary.items():
            lines.append(f"| {method} | " + " | ".join(_pct(e[f"regret@{n}"]) for n in LOSS_BUDGETS) + " |")
    lines += ["", "Ratios of medians (seconds to 90% / to 95%; — : one of the two never got there):", ""]
    for key, value in rat.items():
        lines.append(f"- {key}: " + " / ".join("—" if v is None else f"{v:.2f}" for v in value.values()))
    if meta.get("oracle"):
        lines += ["", "What a search that knew the table would pay (`cheapest_to`: the cheapest trials holding true-front "
                  "points whose front reaches the level):", ""]
        for policy, levels in meta["oracle"].items():
            lines.append(f"- {policy}: " + "; ".join(f"{lv}: {s:.3g} s in {n} trial(s)" for lv, (s, n) in levels.items()))
    if meta.get("rung_rank_correlation"):
        lines += ["", "Rank correlation (Spearman) of the eval loss at a rung with the final eval loss, over the table's "
                  "distinct curves: " + ", ".join(f"{f}: {c:.2f}" for f, c in meta["rung_rank_correlation"].items())]
    if meta.get("probe_accuracy"):
        a = meta["probe_accuracy"]
        lines += ["", f"Probes in the table: projected training seconds within {a['median_abs_error']:.0%} of the "
                  f"recorded ones (median); the variant its probe finds fastest is the fastest recorded one for "
                  f"{a['right_pick']:.0%} of learning configurations, and trains {a['picked_over_fastest']:.2f}x the "
                  f"fastest's seconds on average; a probe costs {a['probe_s_per_variant']:.2g} s a variant (median), a "
                  f"full run of the fastest variant {a['train_s_of_fastest']:.3g} s."]
    lines += ["", "Targets:", ""] + [f"- {t}" for t in meta["targets"]]
    return "\n".join(lines) + "\n"


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
    ax.set_xlabel("training seconds spent (recorded; with probes under llmtune-probes)")
    ax.set_ylabel("HV of found front / HV of true front")
    ax.set_ylim(0, 1.02)
    for level in LEVELS:
        ax.axhline(level, color="grey", lw=0.6, ls=":")
    ax.set_title(title, fontsize=8, wrap=True)
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cheapest_to(table: Any, level: float, probing: bool) -> tuple[float, int]:
    """What a search that knew the table would pay to reach ``level`` of the true HV: the cheapest set of
    trials, among those that hold a true-front point, whose front reaches it (exact over subsets when
    there are at most 16 such trials, else greedy by HV gained per second). A trial is one configuration
    (its training seconds), or under probes one learning configuration (its variants' probes plus its
    fastest variant's training; it reveals every variant). Returns (seconds, trials)."""
    from itertools import combinations

    from replay_table import hypervolume

    done = [(k, r) for k, r in table.rows.items() if r["status"] == "complete"]
    points = np.array([table.scaled(r) for _, r in done])
    front = {i for i in range(len(done)) if not ((points <= points[i]).all(1) & (points < points[i]).any(1)).any()}
    units: dict[Any, tuple[float, list[int]]] = {}
    learn = [list(table.grid).index(n) for n in table.learning]
    for i, (key, row) in enumerate(done):
        if not probing:
            units[key] = (table.charge(row), [i])
            continue
        lkey = tuple(key[j] for j in learn)
        cost, members = units.get(lkey, (0.0, []))
        units[lkey] = (cost, [*members, i])
    if probing:  # price each learning configuration: all its probes, then its fastest variant in full
        for lkey, (_, members) in units.items():
            siblings = [r for k, r in table.rows.items() if tuple(k[j] for j in learn) == lkey]
            fastest = min((done[i][1] for i in members if done[i][1].get("probe_train_time_s") is not None),
                          key=lambda r: float(r["probe_train_time_s"]), default=None)
            units[lkey] = (sum(float(r.get("probe_s") or 0.0) for r in siblings)
                           + (table.charge(fastest) if fastest else math.inf), members)
    useful = [u for u in units.values() if front & set(u[1])]
    goal = level * table.true_hv - 1e-12

    def hv(chosen: list[tuple[float, list[int]]]) -> float:
        return hypervolume(points[[i for _, m in chosen for i in m]])

    best = (math.inf, 0)
    if len(useful) <= 16:
        for n in range(1, len(useful) + 1):
            for combo in combinations(useful, n):
                cost = sum(c for c, _ in combo)
                if cost < best[0] and hv(list(combo)) >= goal:
                    best = (cost, n)
        return best
    chosen: list[tuple[float, list[int]]] = []
    while hv(chosen) < goal:
        base = hv(chosen)
        unit = max((u for u in useful if u not in chosen), key=lambda u: (hv([*chosen, u]) - base) / max(u[0], 1e-9))
        chosen.append(unit)
    return sum(c for c, _ in chosen), len(chosen)


def rung_correlations(table: Any, rungs: list[float]) -> dict[str, float]:
    """Spearman rank correlation between the eval loss at each rung and the final eval loss, over the
    table's distinct curves (rows sharing a learning configuration share one): how well a pruner's
    early look can rank trials."""
    from replay_table import at_rung, final_loss

    curves: dict[Any, tuple[float, list[float | None]]] = {}
    learn = [list(table.grid).index(n) for n in table.learning]
    for key, row in table.rows.items():
        if row["status"] == "complete":
            curves.setdefault(tuple(key[j] for j in learn),
                              (final_loss(row, table.objectives), [at_rung(row, "loss", f) for f in rungs]))
    out = {}
    for i, f in enumerate(rungs):
        pairs = np.array([(final, early[i]) for final, early in curves.values() if early[i] is not None])
        if len(pairs) > 2:
            ranks = pairs.argsort(0).argsort(0).astype(float)
            out[f"{f:.4g}"] = float(np.corrcoef(ranks[:, 0], ranks[:, 1])[0, 1])
    return out


def probe_accuracy(table: Any) -> dict[str, float]:
    """How well the table's probes stand in for full runs: the median |projected / recorded - 1| of the
    training seconds, how often the variant a probe finds fastest is the fastest recorded one, and the
    mean of its recorded seconds over the fastest's (1.0: always the right one)."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    learn = [list(table.grid).index(n) for n in table.learning]
    for key, row in table.rows.items():
        if row["status"] == "complete" and row.get("probe_train_time_s") is not None:
            groups.setdefault(tuple(key[j] for j in learn), []).append(row)
    if not groups:
        return {}
    errors = [abs(float(r["probe_train_time_s"]) / float(r["train_time_s"]) - 1) for g in groups.values() for r in g]
    picked = [min(g, key=lambda r: float(r["probe_train_time_s"])) for g in groups.values()]
    fastest = [min(g, key=lambda r: float(r["train_time_s"])) for g in groups.values()]
    return {"median_abs_error": float(np.median(errors)),
            "right_pick": float(np.mean([p is f for p, f in zip(picked, fastest, strict=True)])),
            "picked_over_fastest": float(np.mean([float(p["train_time_s"]) / float(f["train_time_s"])
                                                  for p, f in zip(picked, fastest, strict=True)])),
            "probe_s_per_variant": float(np.median([float(r.get("probe_s") or 0.0) for g in groups.values() for r in g])),
            "train_s_of_fastest": float(np.median([float(f["train_time_s"]) for f in fastest]))}
