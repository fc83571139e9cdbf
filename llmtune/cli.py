"""`llmtune validate | train | search | estimate | report | export | push` — the command line.

Bad input gets one clear message (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _console():
    from rich.console import Console

    return Console()


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _table(title: str, rows: list[dict[str, Any]]):
    from rich.table import Table

    from llmtune.progress import _fmt_metric

    table = Table(title=title, title_justify="left")
    if not rows:
        return table
    for col in rows[0]:
        table.add_column(str(col), justify="right")
    for row in rows:
        table.add_row(*(_fmt_metric(k, v) for k, v in row.items()))
    return table


def cmd_validate(args: argparse.Namespace) -> int:
    from llmtune.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    space = recipe.space
    print(f"{args.recipe}: ok")
    print(f"  model: {recipe.model.name}   data: {recipe.data.source} ({recipe.data.format})")
    print(f"  objectives: {', '.join(f'{k} ({v})' for k, v in recipe.objectives.items())}")
    if recipe.constraints:
        print(f"  constraints: {json.dumps(recipe.constraints)}")
    print(f"  searched: {', '.join(f'{n} {space.specs[n].describe()}' for n in space.searched) or 'nothing (one config)'}")
    size = space.grid_size()
    if size is not None:
        print(f"  grid size: {size}")
    return 0


def _parse_set_values(items: list[str]) -> tuple[dict[str, Any], list[str]]:
    """--set: search settings (lora_r=8) become trial values; dotted keys override the recipe."""
    import yaml

    from llmtune.space import PARAMS

    values: dict[str, Any] = {}
    overrides: list[str] = []
    for item in items or []:
        key, _, raw = item.partition("=")
        key = key.strip().removeprefix("search.")
        if key in PARAMS and "=" in item:
            values[key] = yaml.safe_load(raw)
        else:
            overrides.append(item)
    return values, overrides


def cmd_train(args: argparse.Namespace) -> int:
    from llmtune.api import train
    from llmtune.recipe import load_recipe
    from llmtune.space import SearchSpace

    values, overrides = _parse_set_values(args.set)
    recipe = load_recipe(args.recipe, overrides)
    # --set values become fixed values of the space (checked like recipe values); the rest of the
    # searched settings take their midpoints / first choices.
    space = dict(recipe.search)
    for given, rival in (("lora_alpha", "lora_alpha_ratio"), ("warmup_steps", "warmup_ratio")):
        if given in values:
            space.pop(rival, None)
    settings = SearchSpace.from_dict({**space, **values}).complete({})
    out = Path(args.out or Path(recipe.output_dir) / "train")
    print(f"training one trial of {recipe.model.name} on {recipe.data.source} -> {out}", file=sys.stderr)
    result = train(recipe, settings, out_dir=out, in_process=False)
    metrics = dict(result.metrics)
    base = result.base_eval_loss
    rows = [{"setting": k, "value": settings[k]} for k in recipe.space.searched]
    con = _console()
    if rows:
        con.print(_table("searched settings used", rows))
    mrows = [{"metric": k, "value": v} for k, v in metrics.items()]
    if base is not None:
        mrows.insert(0, {"metric": "base eval_loss (untrained)", "value": base})
    con.print(_table(f"trial {result.status}" + (f": {result.reason}" if result.reason else ""), mrows))
    print(json.dumps({"status": result.status, "reason": result.reason, "metrics": metrics,
                      "base_eval_loss": base, "settings": settings, "output_dir": str(out)}, default=str))
    if result.status != "complete":
        tail = result.info.get("log_tail") or result.info.get("traceback")
        if tail:
            print(tail, file=sys.stderr)
        return 1
    return 0


def _print_results(result: Any) -> None:
    con = _console()
    front = result.summary_rows()
    con.print(_table(f"Pareto front ({len(front)} of {len(result.all_trials)} trials)", front))
    best = result.best
    if best is None:
        con.print("no feasible completed trial: nothing chosen (see the statuses in trials.csv)")
        return
    con.print(f"chosen: trial {best.number} (select.by: {result.recipe.select.by})")
    adapter = result.best_adapter
    if adapter:
        con.print(f"adapter: {adapter}")
    out = Path(result.recipe.output_dir)
    for name in ("trials.csv", "report.html"):
        if (out / name).exists():
            con.print(f"{name}: {out / name}")


def cmd_search(args: argparse.Namespace) -> int:
    from llmtune.progress import make_progress
    from llmtune.recipe import load_recipe
    from llmtune.study import Search, finalize

    recipe = load_recipe(args.recipe, args.set)
    if args.output_dir:
        recipe.output_dir = args.output_dir
    gpus = None
    if args.gpus:
        from llmtune.hardware import gpu_count

        gpus = [str(i) for i in range(gpu_count())] if args.gpus == "all" else [g.strip() for g in args.gpus.split(",")]
        if not gpus:
            return _fail("--gpus all: no NVIDIA GPU is visible")
    run = Search(recipe, storage=args.storage, n_trials=args.n_trials, workers=args.workers, gpus=gpus,
                 study_name=args.study_name, progress=make_progress(args.quiet),
                 log=lambda m: print(m, file=sys.stderr))
    try:
        study = run.run()
    except KeyboardInterrupt:
        print("search stopped; run the same command again to continue", file=sys.stderr)
        return 130
    result = finalize(study, recipe)
    _print_results(result)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from llmtune.results import load_results
    from llmtune.study import finalize

    result = load_results(args.target, study_name=args.study_name)
    if args.output_dir:
        result.recipe.output_dir = args.output_dir
    result = finalize(result.study, result.recipe)
    _print_results(result)
    return 0


def _parse_gb(text: str) -> float:
    t = text.strip().upper().removesuffix("B").removesuffix("I").removesuffix("G")
    try:
        return float(t)
    except ValueError:
        raise ValueError(f"--gpu-memory {text!r}: give GB like 24GB or 80") from None


def cmd_estimate(args: argparse.Namespace) -> int:
    from llmtune.gate import MEMORY_SETTINGS, estimate_for, representative_points
    from llmtune.hardware import gpu_memory_bytes
    from llmtune.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    if args.gpu_memory:
        budget, where = _parse_gb(args.gpu_memory), f"--gpu-memory {args.gpu_memory}"
    elif total := gpu_memory_bytes(0):
        budget, where = total / 2**30, "this machine's GPU 0"
    else:
        budget, where = None, ""
    limit = recipe.constraints.get("peak_memory_gb", {}).get("max")
    rows = []
    for values in representative_points(recipe, limit=args.limit):
        est = estimate_for(recipe, values)
        row = {k: values[k] for k in MEMORY_SETTINGS if k in recipe.space.searched}
        row.update({"weights": est.weights / 2**30, "activations+logits": (est.activations + est.logits) / 2**30,
                    "predicted_gb": est.total_gb})
        if budget is not None:
            row["fits"] = "yes" if est.total_gb <= budget else "no"
        if limit is not None:
            row["within_budget"] = "yes" if est.total_gb <= limit else "no"
        rows.append(row)
    rows.sort(key=lambda r: r["predicted_gb"])
    title = f"predicted peak GPU memory (GiB) of {recipe.model.name}"
    if budget is not None:
        title += f"; fits = within {budget:g} GiB ({where})"
    _console().print(_table(title, rows))
    if args.json:
        print(json.dumps(rows, default=str))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from llmtune.hub import export_adapter

    exp = export_adapter(args.output_dir, args.to, trial=args.trial, merge=args.merge,
                         tokenizer={"auto": None, "yes": True, "no": False}[args.tokenizer])
    print(f"exported trial {exp.trial} to {exp.path}")
    for f in exp.files:
        print(f"  {f}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from llmtune.hub import push_to_hub

    push = push_to_hub(args.output_dir, args.repo_id, private=True if args.private else False if args.public else None, trial=args.trial,
                       revision=args.revision, dry_run=args.dry_run, export_dir=args.export_dir)
    exp = push.export
    where = f"{push.repo_id}" + (f" (branch {push.revision})" if push.revision else "")
    if push.dry_run:
        print(f"dry run: would upload {len(exp.files)} file(s) of trial {exp.trial} from {exp.path} to {where}"
              f" as {'private' if push.private else 'public'} in one commit:")
    else:
        print(f"pushed {len(exp.files)} file(s) of trial {exp.trial} to {where}: {push.commit_url or push.url}")
    for f in exp.files:
        size = (exp.path / f).stat().st_size
        print(f"  {f}  ({size:,} bytes)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from llmtune import __version__

    p = argparse.ArgumentParser(prog="llmtune", description="Find good LoRA / QLoRA hyperparameters.")
    p.add_argument("--version", action="version", version=f"llmtune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check a recipe and show its search space")
    v.add_argument("recipe")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value (e.g. study.n_trials=5)")
    v.set_defaults(func=cmd_validate)

    t = sub.add_parser("train", help="run one trial (searched settings at their midpoint unless --set)")
    t.add_argument("recipe")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting (lora_r=8) or a recipe override (train.budget.examples=500)")
    t.add_argument("--out", help="output folder (default: <output_dir>/train)")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("search", help="run or resume the recipe's search")
    s.add_argument("recipe")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    s.add_argument("--n-trials", type=int, help="trials in total (default: study.n_trials)")
    s.add_argument("--storage", help="Optuna storage URL (default: SQLite in output_dir; env LLMTUNE_STORAGE); printed with the password masked")
    s.add_argument("--study-name", help="study name in the storage (default: the recipe name)")
    s.add_argument("--output-dir", help="override output_dir")
    s.add_argument("--workers", type=int, default=1, help="trials at once on this machine (CPU)")
    s.add_argument("--gpus", help="GPUs this process can see, one trial per entry: 0,1,2,3, all, or groups 0+1,2+3 (a trial sees the group; the model loads on its first GPU)")
    s.add_argument("--quiet", action="store_true", help="plain progress lines instead of the live view")
    s.set_defaults(func=cmd_search)

    e = sub.add_parser("estimate", help="predicted peak GPU memory over the space, and whether it fits a GPU")
    e.add_argument("recipe")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    e.add_argument("--gpu-memory", help="GPU size to check against, e.g. 24GB (default: the local GPU's)")
    e.add_argument("--limit", type=int, default=64, help="at most this many configurations")
    e.add_argument("--json", action="store_true", help="also print the rows as JSON")
    e.set_defaults(func=cmd_estimate)

    r = sub.add_parser("report", help="Pareto table, trials.csv and report.html of a search")
    r.add_argument("target", help="output_dir of a search, or a storage URL")
    r.add_argument("--study-name")
    r.add_argument("--output-dir", help="where to write (default: the search's output_dir)")
    r.set_defaults(func=cmd_report)

    x = sub.add_parser("export", help="write a trial's adapter (default: the chosen one) with a model card")
    x.add_argument("output_dir", help="output_dir of a search")
    x.add_argument("--to", required=True, help="folder to write (new, empty, or an earlier export)")
    x.add_argument("--trial", type=int, help="trial number (default: the chosen trial)")
    x.add_argument("--merge", action="store_true", help="also write the merged full model under merged/ (not for 4/8-bit bases)")
    x.add_argument("--tokenizer", choices=("auto", "yes", "no"), default="auto",
                   help="copy the tokenizer files (auto: only when the base is not a Hub repository)")
    x.set_defaults(func=cmd_export)

    u = sub.add_parser("push", help="export a trial's adapter and upload it to the Hub in one commit")
    u.add_argument("output_dir", help="output_dir of a search")
    u.add_argument("--repo-id", help="user/name on the Hub (default: hub.repo_id of the recipe)")
    vis = u.add_mutually_exclusive_group()
    vis.add_argument("--private", action="store_true", help="create the repository private (default: hub.private, true)")
    vis.add_argument("--public", action="store_true", help="create the repository public")
    u.add_argument("--trial", type=int, help="trial number (default: the chosen trial)")
    u.add_argument("--revision", help="branch to push to (created if missing; default: main)")
    u.add_argument("--export-dir", help="where to export first (default: <output_dir>/export/trial-NNNN)")
    u.add_argument("--dry-run", action="store_true", help="export and list the files that would be uploaded; upload nothing")
    u.set_defaults(func=cmd_push)
    return p


def main(argv: list[str] | None = None) -> int:
    from llmtune.recipe import RecipeError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RecipeError as e:
        return _fail(str(e))
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    except Exception as e:
        from llmtune.hardware import MissingDependency
        from llmtune.hub import HubError
        from llmtune.storage import SearchError

        if isinstance(e, HubError):
            return _fail(str(e), e.code)
        if isinstance(e, (SearchError, MissingDependency)):
            return _fail(str(e))
        raise


if __name__ == "__main__":
    sys.exit(main())
