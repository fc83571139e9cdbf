"""How good are a new search's first two trials? The priors' starts against each table's best eval loss.

For each table (llmtune's own: the real SmolLM2-135M tasks and the tiny model's long table), the first two
configurations a new search with `sampler: auto` queues (`llmtune.study.priors.prior_configs`, given the
table's model and budget from its meta's recipe) are looked up in the table, and compared with:

- the rule before issue 21 (constants: lr 2e-4 then 1e-3, alpha 32, all linear layers, the middle rank);
- two configurations drawn at random (the expected best of two, over every pair of recorded rows).

Regret = (best of the two starts' eval loss - the table's best) / the table's best. A table still being
recorded is read as it stands: its best is the best recorded so far, and a start whose row is not there yet
is reported as such (the recorder runs the priors' starts first). Issue 21's target: the first two within
2% of the table's best on >= 70% of tasks.

    python3 benchmarks/priors_regret.py [--tables a.csv,b.csv] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replay import table_facts  # noqa: E402
from replay_table import _meta_path, load_table  # noqa: E402

from llmtune.config.space import PARAMS, Fixed, SearchSpace  # noqa: E402
from llmtune.study.priors import _middle, _snap, prior_configs  # noqa: E402

TABLES = ("benchmarks/results/tabular_smollm2-chat.csv", "benchmarks/results/tabular_smollm2-text.csv",
          "benchmarks/results/tabular_cpu-long.csv")
OLD_PRIORS = ({"learning_rate": 2e-4, "lora_target_modules": "all-linear", "lora_alpha": 32.0},
              {"learning_rate": 1e-3, "lora_target_modules": "all-linear", "lora_alpha": 32.0})


def old_configs(space: SearchSpace) -> list[dict[str, Any]]:
    """The constant priors llmtune queued before issue 21, snapped as it did (rank: the middle option)."""
    out = []
    for prior in OLD_PRIORS:
        values = {n: s.value for n, s in space.specs.items() if isinstance(s, Fixed)}
        for name in space.searched:
            spec, param = space.specs[name], PARAMS[name]
            if name in prior:
                values[name] = _snap(spec, prior[name], param.log)
            elif name == "lora_r" or param.default is None:
                values[name] = _middle(spec)
            else:
                values[name] = _snap(spec, param.default, param.log)
        config = {n: values[n] for n in space.searched}
        if config not in out:
            out.append(config)
    return out


def losses_of(table: Any, configs: list[dict[str, Any]], reference: dict[str, Any]) -> list[float | None]:
    """Each configuration's recorded eval loss (None: not recorded yet); unsearched columns from `reference`."""
    out = []
    for c in configs:
        row = table.rows.get(table.key({**reference, **c}))
        loss = row.get("eval_loss") if row else None
        out.append(float(loss) if loss not in (None, "") else None)
    return out


def one_table(path: str) -> dict[str, Any]:
    table = load_table(path, [("eval_loss", "minimize")], missing="keep")
    meta = json.loads(_meta_path(Path(path)).read_text())
    # execution settings at the table's reference layout: the priors choose learning settings
    space = SearchSpace.from_dict({n: table.grid[n] for n in table.learning})
    reference = {n: table.grid[n][0] for n in table.grid}
    reference.update((meta.get("grid") or {}).get("reference") or {})
    facts = table_facts(meta, table)
    recorded = [float(r["eval_loss"]) for r in table.rows.values() if r.get("eval_loss") not in (None, "")]
    best = min(recorded)
    new, old = prior_configs(space, 2, facts), old_configs(space)
    new_l, old_l = losses_of(table, new, reference), losses_of(table, old, reference)
    pairs = list(itertools.combinations(recorded, 2))
    random_regret = sum(min(a, b) / best - 1 for a, b in pairs) / len(pairs)

    def regret(ls: list[float | None]) -> float | None:
        known = [x for x in ls if x is not None]
        return None if len(known) < len(ls) or not known else min(known) / best - 1

    grid_points = 1
    for n in table.learning:
        grid_points *= len(table.grid[n])
    return {"table": path, "recorded": len(recorded), "learning_configurations": grid_points,
            "facts": facts.__dict__ if facts else None, "best": best,
            "new": [{"config": c, "eval_loss": x} for c, x in zip(new, new_l, strict=True)], "new_regret": regret(new_l),
            "old": [{"config": c, "eval_loss": x} for c, x in zip(old, old_l, strict=True)], "old_regret": regret(old_l),
            "random_pair_regret": random_regret,
            "within_2pct_share_of_random_pairs": sum(min(a, b) <= best * 1.02 for a, b in pairs) / len(pairs)}


def _starts(result: dict[str, Any], kind: str) -> str:
    return "; ".join(f"lr {s['config'].get('learning_rate'):g} r {s['config'].get('lora_r')}: "
                     f"{'?' if s['eval_loss'] is None else format(s['eval_loss'], '.4g')}" for s in result[kind])


def _pct(x: float | None) -> str:
    return "not recorded yet" if x is None else f"{100 * x:.1f}%"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tables", default=",".join(TABLES))
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    results = [one_table(t) for t in args.tables.split(",")]
    lines = ["# The priors' first two trials against each table's best eval loss", "",
             "`python3 benchmarks/priors_regret.py`. Regret = best of the two / the table's best - 1. A partial table's "
             "best is the best recorded so far.", "",
             "| table | rows recorded / learning configurations | priors (model-aware) | their regret | before issue 21 (constants) | their regret | "
             "two at random: mean regret | two at random: share within 2% |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {Path(r['table']).name} | {r['recorded']}/{r['learning_configurations']} | {_starts(r, 'new')} | "
                     f"{_pct(r['new_regret'])} | {_starts(r, 'old')} | {_pct(r['old_regret'])} | "
                     f"{_pct(r['random_pair_regret'])} | {100 * r['within_2pct_share_of_random_pairs']:.0f}% |")
    known = [r for r in results if r["new_regret"] is not None]
    hit = sum(r["new_regret"] <= 0.02 for r in known)
    lines += ["", f"Target (issue 21): the first two within 2% of the table's best on >= 70% of tasks: {hit} of "
              f"{len(known)} tables with both starts recorded ({len(results) - len(known)} still missing a start)."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    (out / "priors_regret.md").write_text(text)
    (out / "priors_regret.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
