"""`llmtune validate | train | search | estimate | report | export | push` — the command line.

Bad input gets one clear message (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtune._version import __version__
from llmtune.errors import LlmtuneError, Problem, RecipeError
from llmtune.trial.endings import COMPLETE

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console
    from rich.table import Table

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Width of tables written to a file or a pipe: rich would cut them to 80 columns (wrapping every cell),
# and there is no terminal whose width they must fit.
UNBOUNDED_WIDTH = 10_000


def _console() -> Console:
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=UNBOUNDED_WIDTH)


def _table(title: str, rows: list[dict[str, Any]]) -> Table:
    from rich.table import Table

    from llmtune.study.progress import fmt_metric

    table = Table(title=title, title_justify="left")
    if not rows:
        return table
    for col in rows[0]:
        table.add_column(str(col), justify="right")
    for row in rows:
        table.add_row(*(fmt_metric(k, v) for k, v in row.items()))
    return table


def cmd_validate(args: argparse.Namespace) -> int:
    from llmtune.api import validate

    recipe = validate(args.recipe, overrides=args.set)
    space = recipe.space
    print(f"{args.recipe}: ok")
    print(f"  model: {recipe.model.name}   data: {recipe.data.source} ({recipe.data.format})")
    print(f"  objectives: {', '.join(f'{k} ({v})' for k, v in recipe.objectives.items())}")
    if recipe.constraints:
        print(f"  constraints: {json.dumps(recipe.constraints)}")
    from llmtune.study import probes

    learning = probes.learning_space(space) if probes.enabled(recipe) else space
    print(f"  searched: {', '.join(f'{n} {space.specs[n].describe()}' for n in learning.searched) or 'nothing (one config)'}")
    if learning is not space:
        variants = probes.variants(space)
        print(f"  probed (execution settings, study.execution: probe): "
              f"{', '.join(f'{n} {space.specs[n].describe()}' for n in probes.probed_settings(space))}: "
              f"{len(variants)} variants measured by short probes per learning configuration")
    if recipe.study.strategy == "pbt":
        from llmtune.config.pbt_settings import pbt_settings

        pbt = pbt_settings(recipe)
        print(f"  population-based training: {pbt.population} members x {len(pbt.bounds)} segments "
              f"({pbt.population * len(pbt.bounds)} trials), perturbing {', '.join(pbt.perturb)}; "
              f"the worst {pbt.cut} copy the best {pbt.cut} after each segment")
    size = learning.grid_size()
    if size is not None:
        print(f"  grid size: {size}" + (" learning configurations" if learning is not space else ""))
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from llmtune.api import init_recipe

    budget = _parse_gb(args.gpu_memory) if args.gpu_memory else None
    out = init_recipe(args.model, args.data, output=args.output, gpu_memory_gb=budget, overwrite=args.force,
                      log=lambda m: print(m, file=sys.stderr))
    print(f"wrote {out}; check it with: llmtune validate {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from llmtune.api import ONE_TRIAL, load, train

    # --set lora_r=8 fixes that setting; the other searched settings take their midpoints / first choices
    recipe = load(args.recipe, [*_with_threads(args), *ONE_TRIAL])
    settings = recipe.space.complete({})
    given = args.output_dir  # "" is refused by `train`, not read as "not given"
    out = Path(given) if given else Path(recipe.output_dir) / "train"
    if given is None or given.strip():
        print(f"training one trial of {recipe.model.name} on {recipe.data.source} -> {out}", file=sys.stderr)
    result = train(recipe, output_dir=given if given is not None else out, schedule=args.schedule)
    metrics = dict(result.metrics)
    base = result.base_eval_loss
    searched = load(args.recipe).space.searched  # what the recipe searches, before --set fixed any of it
    rows = [{"setting": k, "value": result.settings.get(k, settings[k])} for k in searched]  # a schedule's own
    con = _console()
    if rows:
        con.print(_table("searched settings used", rows))
    mrows = [{"metric": k, "value": v} for k, v in metrics.items()]
    if base is not None:
        mrows.insert(0, {"metric": "base eval_loss (untrained)", "value": base})
    con.print(_table(f"trial {result.status}" + (f": {result.reason}" if result.reason else ""), mrows))
    print(json.dumps({"status": result.status, "reason": result.reason, "metrics": metrics,
                      "base_eval_loss": base, "settings": result.settings or settings, "output_dir": str(out)},
                     default=str))
    if result.status != COMPLETE:
        tail = result.info.get("log_tail") or result.info.get("traceback")
        if tail:
            print(tail, file=sys.stderr)
        return 1
    return 0


def _print_results(result: Any) -> None:
    con = _console()
    front = result.summary_rows()
    con.print(_table(f"Pareto front ({len(front)} of {result.counted_trials} trials)", front))
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
    from llmtune.api import search

    try:
        result = search(args.recipe, n_trials=args.n_trials, storage=args.storage, study_name=args.study_name,
                        workers=args.workers, gpus=args.gpus, output_dir=args.output_dir, quiet=args.quiet,
                        overrides=_with_threads(args), log=lambda m: print(m, file=sys.stderr))
    except KeyboardInterrupt:
        print("search stopped; run the same command again to continue", file=sys.stderr)
        return 130
    _print_results(result)
    if not any(t.user_attrs.get("llmtune.status") == COMPLETE for t in result.all_trials):
        print("error: no trial completed; see each trial's reason in trials.csv and its trial.log", file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from llmtune.api import report

    _print_results(report(args.run, study_name=args.study_name, storage=args.storage, output_dir=args.output_dir))
    return 0


def _parse_gb(text: str) -> float:
    t = text.strip().upper().removesuffix("B").removesuffix("I").removesuffix("G")
    try:
        return float(t)
    except ValueError:
        raise RecipeError([Problem("--gpu-memory", f"{text!r} is not a size; give GB like 24GB or 80")]) from None


def cmd_estimate(args: argparse.Namespace) -> int:
    from llmtune.api import estimate_space, load

    recipe = load(args.recipe, args.set)
    budget = _parse_gb(args.gpu_memory) if args.gpu_memory else None
    rows = estimate_space(recipe, gpu_memory_gb=budget, limit=args.limit)
    title = f"predicted peak GPU memory (GiB) of {recipe.model.name}"
    if rows and "fits" in rows[0]:
        where = f"--gpu-memory {args.gpu_memory}" if args.gpu_memory else "this machine's GPU 0"
        title += f"; fits = within the GPU ({where})"
    _console().print(_table(title, rows))
    if args.json:
        print(json.dumps(rows, default=str))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from llmtune.api import export_adapter

    exp = export_adapter(args.run, args.output_dir, trial=args.trial, merge=args.merge,
                         tokenizer={"auto": None, "yes": True, "no": False}[args.tokenizer],
                         study_name=args.study_name, storage=args.storage)
    print(f"exported trial {exp.trial} to {exp.path}")
    for f in exp.files:
        print(f"  {f}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from llmtune.api import push_to_hub

    push = push_to_hub(args.run, args.repo_id, private=True if args.private else False if args.public else None,
                       trial=args.trial, revision=args.revision, dry_run=args.dry_run, output_dir=args.output_dir,
                       study_name=args.study_name, storage=args.storage)
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


class _Deprecated(argparse.Action):
    """An old spelling of a flag, kept for one release: works, and says the new one."""

    def __init__(self, *args: Any, new: str, **kwargs: Any):
        self.new = new
        super().__init__(*args, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="the recipe YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a searchable setting (lora_r=8, same as search.lora_r=8) or override a recipe value "
                        "(train.budget.examples=500, which replaces the recipe's budget); repeatable")


def _threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads per trial (default: the cores minus one, shared by the trials that run at once; "
                        "same as --set train.threads=N)")


def _with_threads(args: argparse.Namespace) -> list[str]:
    return [*args.set, f"train.threads={args.threads}"] if args.threads is not None else list(args.set)


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="what a search left: its output_dir (holds study.db), or a storage URL")
    p.add_argument("--storage", help="the storage URL of the study, when run is a folder whose study lives elsewhere "
                   "(default: env LLMTUNE_STORAGE, as search reads it)")
    p.add_argument("--study-name", help="which study of the storage (needed when it holds several)")


def _output_arg(p: argparse.ArgumentParser, help: str, old: str | None = None, required: bool = False) -> None:
    p.add_argument("--output-dir", required=required, help=help)
    if old:
        p.add_argument(old, dest="output_dir", action=_Deprecated, new="--output-dir", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmtune", description="Find good LoRA / QLoRA hyperparameters.")
    p.add_argument("--version", action="version", version=f"llmtune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    i = sub.add_parser("init", help="write a commented recipe for a model and a data file, from published LoRA priors")
    i.add_argument("model", help="a Hub model name or a local folder (or llmtune/tiny)")
    i.add_argument("--data", required=True, help="a JSONL, JSON, CSV or parquet file, a folder of split files, or llmtune/tiny-tasks; "
                   "its format is guessed from the first row")
    i.add_argument("--gpu-memory", help="GPU size the quantization choices must fit, e.g. 24GB (default: the local GPU's)")
    i.add_argument("--output", default="recipe.yaml", help="where to write the recipe (default: recipe.yaml)")
    i.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    i.set_defaults(func=cmd_init)

    v = sub.add_parser("validate", help="check a recipe and show its search space")
    _recipe_args(v)
    v.set_defaults(func=cmd_validate)

    t = sub.add_parser("train", help="run one trial (searched settings at their midpoint unless --set)")
    _recipe_args(t)
    _output_arg(t, "where the trial writes (default: <output_dir>/train)", old="--out")
    _threads_arg(t)
    t.add_argument("--schedule", metavar="FILE", help="replay a population-based training member's schedule "
                   "(best/schedule.json of a PBT search): its settings, changed per segment as the member's were")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("search", help="run or resume the recipe's search")
    _recipe_args(s)
    s.add_argument("--n-trials", type=int, help="trials in total (default: study.n_trials)")
    s.add_argument("--storage", help="Optuna storage URL (default: SQLite in output_dir; env LLMTUNE_STORAGE); printed with the password masked")
    s.add_argument("--study-name", help="study name in the storage (default: the recipe name)")
    _output_arg(s, "where the search writes (default: the recipe's output_dir)")
    s.add_argument("--workers", type=int, default=1, help="trials at once on this machine (CPU)")
    s.add_argument("--gpus", help="GPUs this process can see, one trial per entry: 0,1,2,3, all, or groups 0+1,2+3 (a trial sees the group; the model loads on its first GPU)")
    s.add_argument("--quiet", action="store_true", help="plain progress lines instead of the live view")
    _threads_arg(s)
    s.set_defaults(func=cmd_search)

    e = sub.add_parser("estimate", help="predicted peak GPU memory over the space, and whether it fits a GPU")
    _recipe_args(e)
    e.add_argument("--gpu-memory", help="GPU size to check against, e.g. 24GB (default: the local GPU's)")
    e.add_argument("--limit", type=int, default=64, help="at most this many configurations")
    e.add_argument("--json", action="store_true", help="also print the rows as JSON")
    e.set_defaults(func=cmd_estimate)

    r = sub.add_parser("report", help="Pareto table, trials.csv and report.html of a search")
    _run_args(r)
    _output_arg(r, "where to write (default: the search's output_dir)")
    r.set_defaults(func=cmd_report)

    x = sub.add_parser("export", help="write a trial's adapter (default: the chosen one) with a model card")
    _run_args(x)
    _output_arg(x, "folder to write (new, empty, or an earlier export)", old="--to")
    x.add_argument("--trial", type=int, help="trial number (default: the chosen trial)")
    x.add_argument("--merge", action="store_true", help="also write the merged full model under merged/ (not for 4/8-bit bases)")
    x.add_argument("--tokenizer", choices=("auto", "yes", "no"), default="auto",
                   help="copy the tokenizer files (auto: only when the base is not a Hub repository)")
    x.set_defaults(func=cmd_export)

    u = sub.add_parser("push", help="export a trial's adapter and upload it to the Hub in one commit")
    _run_args(u)
    u.add_argument("--repo-id", help="user/name on the Hub (default: hub.repo_id of the recipe)")
    vis = u.add_mutually_exclusive_group()
    vis.add_argument("--private", action="store_true", help="create the repository private (default: hub.private, true)")
    vis.add_argument("--public", action="store_true", help="create the repository public")
    u.add_argument("--trial", type=int, help="trial number (default: the chosen trial)")
    u.add_argument("--revision", help="branch to push to (created if missing; default: main)")
    _output_arg(u, "where to export first (default: <run>/export/trial-NNNN)", old="--export-dir")
    u.add_argument("--dry-run", action="store_true", help="export and list the files that would be uploaded; upload nothing")
    u.set_defaults(func=cmd_push)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LlmtuneError as e:  # what users get wrong, or what their machine cannot do: no traceback
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
