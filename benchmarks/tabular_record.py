"""Record a tabular LoRA benchmark: every point of a discrete search space, each a real fine-tune.

Each configuration runs through llmtune's own harness (`run_trial`) inside a spawn pool of
single-threaded workers (several trials side by side on a many-core CPU; one worker on a GPU). Per
configuration the table keeps the settings, the final metrics, the eval loss at every pruning rung
(the rungs of llmtune's ASHA and Hyperband defaults, so a replay can prune at them), and the
seconds spent up to each rung, so a pruned replay is charged what stopping there would have cost.

    python3 benchmarks/tabular_record.py --workers 14 --out benchmarks/results
    python3 benchmarks/tabular_record.py --device cuda --workers 1 --model PATH --grid gpu --out DIR
    python3 benchmarks/tabular_record.py --long --workers 2 --eval-examples 64 --eval-max-length 192
    python3 benchmarks/tabular_record.py --real --workers 1 --threads 1     # resumable; run it in the background

``--long`` records the long-curve table (`LONG`, issue 15): each learning configuration trained once for
>= 150 optimizer steps with >= 8 evaluations, in the reference execution variant; every execution variant
of every cost class run in full (its costs) and probed (what a search's probe would see), twice; the raw
runs are kept (``_raw.jsonl``) and expanded into one replayable row per (learning, execution) pair.

Writes ``<out>/tabular_<tag>.csv`` (one row per configuration, appended as trials finish, so a
run cut short keeps what it did) and ``<out>/tabular_<tag>.json`` (grid, recipe, machine, versions).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import multiprocessing as mp
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Rungs of llmtune's pruners: Hyperband's default 1/27 * 3**k and ASHA's 1/9 * 3**k (eta=3), plus
# the end of training. 0 is the untrained adapter (the base model's loss).
RUNGS = [1 / 27, 1 / 9, 1 / 3]
GRIDS: dict[str, dict[str, list[Any]]] = {
    # 3*2*2*2*2*2*3*2 = 576 configurations.
    "cpu": {
        "learning_rate": [1e-3, 3e-3, 1e-2],
        "lora_r": [4, 16],
        "lora_alpha_ratio": [1.0, 2.0],
        "warmup_ratio": [0.0, 0.1],
        "sequence_len": [96, 192],
        "sample_packing": [False, True],
        "quantization": ["none", "8bit", "4bit"],
        "gradient_checkpointing": [False, True],
    },
    # 3*2*2*2*3*2 = 144 configurations: fits one GPU in a few minutes on a ~0.5B model.
    "gpu": {
        "learning_rate": [1e-4, 3e-4, 1e-3],
        "lora_r": [8, 32],
        "lora_alpha_ratio": [2.0],
        "warmup_ratio": [0.0, 0.1],
        "sequence_len": [256, 512],
        "sample_packing": [False],
        "quantization": ["none", "8bit", "4bit"],
        "gradient_checkpointing": [False, True],
    },
}
# The long-curve table (issue 15): every learning configuration trained for real for >= 150 optimizer
# steps with >= 8 evaluations; execution variants (packing, checkpointing) measured separately, since
# they leave the curve unchanged (tests/test_execution.py; the table checks it again, "curve_check").
LONG: dict[str, Any] = {
    # 4*2*2*2*2*2 = 128 learning configurations x 4 execution variants = 512 rows.
    "learning": {
        "learning_rate": [3e-4, 1e-3, 3e-3, 1e-2],
        "lora_r": [4, 16],
        "lora_alpha_ratio": [1.0, 2.0],
        "warmup_ratio": [0.0, 0.1],
        "sequence_len": [96, 192],
        "batch_size": [4, 8],
    },
    "execution": {"sample_packing": [False, True], "gradient_checkpointing": [False, True]},
    "reference": {"sample_packing": True, "gradient_checkpointing": False},  # the variant whose curves are recorded
    "cost_class": ["lora_r", "sequence_len", "batch_size"],  # what a run's cost depends on (learning side)
    "cost_probe": {"learning_rate": 1e-3, "lora_alpha_ratio": 2.0, "warmup_ratio": 0.1},
    "examples": 1200,  # 150 steps at batch 8, 300 at batch 4
    "eval_points": 8,
    "micro_batch_size": 4,
    "probe_steps": 2,
}
# The real-model tables (issue 21): SmolLM2-135M-Instruct, offline, on two unlike tasks; every learning
# configuration trained for 150 optimizer steps with 8 evaluations plus the pruners' rungs, in one execution
# layout (packed rows). Recorded in a shuffled order that alternates the tasks, so a partial table is a
# uniform sample of each grid; resumable: runs already in the raw file are skipped.
# The dtype of every run in them: SmolLM2's own (bf16), which `model.dtype: auto` picked on the CPUs with native
# bf16 (AMX) that recorded the runs before 2026-12-07 17:33 UTC (those rows have no dtype column; their
# throughput, ~1.5-2x that of the later fp32 runs, says so). On 2026-12-07 a session on a CPU without it
# (AMD EPYC) recorded 11 runs in fp32 through `auto`: they stay in the raw runs, marked, and out of the tables.
# From 2026-12-07 20:15 UTC an AMD EPYC with AVX512-BF16 recorded bf16 runs (pinned, `REAL_DTYPE`); per cost
# class (task, rank, targets) their median training seconds are 0.87-1.19x the AMX runs' (median 1.06x over
# 10 classes), within the spread of either machine under load, so the tables mix them unscaled (`cpu` names it).
REAL_DTYPE = "bfloat16"
REAL: dict[str, Any] = {
    "model": "llmtune/smollm2-135m",
    # 6 x 3 x 2 x 2 x 2 = 144 learning configurations per task.
    "learning": {
        "learning_rate": [1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
        "lora_r": [4, 16, 128],
        "lora_target_modules": ["attention", "all-linear"],
        "lora_alpha_ratio": [1.0, 2.0],
        "warmup_ratio": [0.0, 0.1],
    },
    "fixed": {"batch_size": 4, "micro_batch_size": 4, "sequence_len": 96, "sample_packing": True,
              "gradient_checkpointing": False, "lora_dropout": 0.0},
    "tasks": {
        # the tiny tasks as chat conversations: loss on the assistant's short answers only
        "chat": {"source": "llmtune/tiny-chat", "format": "chat", "train_on": "completions"},
        # continued pretraining on generated English-like prose: loss on every token
        "text": {"source": "<generated>", "format": "text"},
    },
    "examples": 600,  # 150 optimizer steps of 4 examples
    "eval_points": 8,
    "eval_examples": 32,
    "eval_max_length": 96,
}
METRICS = ("eval_loss", "peak_memory_gb", "train_throughput", "latency_ms", "ttft_ms", "trainable_params",
           "train_time_s")


def build_recipe(args: argparse.Namespace, grid: dict[str, list[Any]]) -> dict[str, Any]:
    """The fixed part of every trial; the grid's settings are searched (lists)."""
    return {
        "name": "tabular",
        "model": {"name": args.model},
        "data": {"source": args.data, "eval_max_length": args.eval_max_length,
                 "max_eval_examples": args.eval_examples, "max_train_examples": 2000},
        "train": {"budget": {"examples": args.examples}, "eval_points": 1, "eval_batch_size": 16,
                  "device": args.device, "seed": 42, "lr_scheduler": "cosine"},
        "measure": {"latency_prompts": args.latency_prompts, "max_new_tokens": 8},
        "search": {**grid, "micro_batch_size": args.micro_batch_size, "lora_target_modules": "all-linear",
                   "lora_dropout": 0.0},
        "objectives": {"eval_loss": "minimize", "peak_memory_gb": "minimize"},
        "output_dir": str(Path(tempfile.gettempdir()) / "llmtune-tabular"),
    }


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    names = list(grid)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(grid[n] for n in names))]


def _init_worker(threads: int, stream_order: bool = False) -> None:
    os.environ["LLMTUNE_THREADS"] = str(threads)  # run_trial sets torch's threads from this
    if stream_order:
        # The real tables' runs before 2026-12-07 laid each step out in the stream's order (packed rows filled
        # greedily); since then llmtune lays them out longest first, which pads less and runs faster. Later runs
        # keep the old layout, so that every row of a table times the same work.
        from harness_layout_ab import in_stream_order

        from llmtune.harness import data as D

        D._lay_out = in_stream_order
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    import warnings

    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    # bitsandbytes warns once per layer and step on CPU: thousands of identical lines.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")

    torch.set_num_threads(threads)


def run_one(job: tuple[int, dict[str, Any], dict[str, Any], str] | tuple[int, dict[str, Any], dict[str, Any], str, dict[str, Any]]) -> dict[str, Any]:
    """One configuration through the harness; returns its table row. An optional fifth item of the job:
    {"rungs": [...] (where to evaluate besides the recipe's points), "probe_steps": n (a probe, not a trial),
    "kind": a label for the row}."""
    from llmtune.config.recipe import recipe_from_dict
    from llmtune.harness import data as D
    from llmtune.harness.train import eval_fractions, run_trial

    index, params, recipe_dict, work = job[:4]
    options: dict[str, Any] = job[4] if len(job) > 4 else {}  # type: ignore[misc]
    rungs = options.get("rungs", RUNGS)
    recipe = recipe_from_dict(recipe_dict)
    values = recipe.space.complete(params)
    phase, since = "loading", time.perf_counter()
    spent: dict[str, float] = {"train": 0.0}
    at_rung: dict[float, tuple[float, float]] = {}  # fraction -> (train seconds, wall seconds) so far
    start = since

    def on_event(event: dict[str, Any]) -> bool:
        # Seconds per phase, from the harness's own phase events: what a pruned trial would have cost.
        nonlocal phase, since
        now = time.perf_counter()
        if event["event"] == "phase":
            spent[phase] = spent.get(phase, 0.0) + now - since
            phase, since = event["phase"], now
        elif event["event"] == "eval":
            at_rung[round(event["fraction"], 6)] = (spent["train"], now - start)
        return False

    fractions = eval_fractions(recipe, rungs)
    result = run_trial(recipe, values, Path(work) / f"c{index}-{options.get('kind', 'run')}", fractions=fractions,
                       on_event=on_event, save_adapter=False, probe_steps=options.get("probe_steps"))
    row: dict[str, Any] = {"config_id": index, **({"kind": options["kind"]} if "kind" in options else {}),
                           **params, "status": result.status, "reason": result.reason[:200]}
    for m in METRICS:
        row[m] = result.metrics.get(m)
    curve = {round(f, 6): loss for f, loss in result.curve}
    for f in fractions:
        key = round(f, 6)
        row[f"loss@{key:g}"] = curve.get(key)
        row[f"train_s@{key:g}"], row[f"wall_s@{key:g}"] = at_rung.get(key, (None, None))
    row["wall_time_s"] = result.info.get("wall_time_s")
    row["train_cpu_s"] = result.info.get("train_cpu_s")  # CPU seconds: what other jobs on the machine blur less
    row["load_s"] = result.info.get("load_s")
    row["eval_s"] = result.info.get("eval_s")
    row["latency_s"] = result.info.get("latency_s")
    row["padding_share"] = result.info.get("padding_share")
    row["steps"] = (result.info.get("plan") or {}).get("steps")
    row["dtype"] = result.info.get("dtype")  # a table holds one dtype: write_real_tables leaves others out
    row["layout"] = D._lay_out.__name__  # in_stream_order for the real tables (`_init_worker`)
    row["cpu"] = cpu_model()
    return row


def cpu_model() -> str:
    """The CPU's model name (platform.platform() names the kernel, which two different CPUs may share)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _key(row: dict[str, Any], names: list[str]) -> tuple[Any, ...]:
    return tuple(str(row[n]) for n in names)


def _group(rows: list[dict[str, Any]], names: list[str]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_key(r, names), []).append(r)
    return groups


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v not in (None, "")]
    return sum(vals) / len(vals) if vals else None


def long_jobs(args: argparse.Namespace, recipe: dict[str, Any], work: str) -> list[tuple[Any, ...]]:
    """The long table's runs: one full run per learning configuration (the reference execution variant),
    full-length cost runs and probes of every execution variant for each cost class, twice each."""
    learning, execution = grid_points(LONG["learning"]), grid_points(LONG["execution"])
    rungs = RUNGS
    jobs: list[tuple[Any, ...]] = [(i, {**pt, **LONG["reference"]}, recipe, work, {"kind": "curve", "rungs": rungs})
                                   for i, pt in enumerate(learning)]
    classes = grid_points({n: LONG["learning"][n] for n in LONG["cost_class"]})
    n = len(jobs)
    for c in classes:
        for e in execution:
            for repeat in range(args.repeats):
                params = {**LONG["cost_probe"], **c, **e}
                jobs.append((n, params, recipe, work, {"kind": "cost", "rungs": rungs, "repeat": repeat}))
                jobs.append((n + 1, params, recipe, work, {"kind": "probe", "probe_steps": LONG["probe_steps"],
                                                           "repeat": repeat}))
                n += 2
    return jobs


def expand_long(raw: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The replayable table: a row per (learning configuration, execution variant). Its curve is the
    learning configuration's recorded one (the same under every variant); its costs are the means over
    every full run of the same computation (cost class and variant), its probe columns the means of that
    computation's probes. Returns (rows, checks)."""
    lnames, enames, cnames = list(LONG["learning"]), list(LONG["execution"]), LONG["cost_class"]
    curves = {_key(r, lnames): r for r in raw if r["kind"] == "curve"}
    full = [r for r in raw if r["kind"] in ("curve", "cost") and r["status"] == "complete"]
    probes = [r for r in raw if r["kind"] == "probe" and r["status"] == "complete"]
    measured = ("train_time_s", "train_throughput", "peak_memory_gb")
    by_computation, probed, by_class = _group(full, cnames + enames), _group(probes, cnames + enames), _group(full, cnames)
    cost: dict[tuple[Any, ...], dict[str, float | None]] = {}
    for k, same in by_computation.items():
        mine = probed.get(k, [])
        cost[k] = {**{m: _mean([r[m] for r in same]) for m in measured}, "runs": len(same),
                   **{f"probe_{m}": _mean([r[m] for r in mine]) for m in measured},
                   "probe_s": _mean([r["wall_time_s"] for r in mine])}
    latency = {k: _mean([r["latency_ms"] for r in same]) for k, same in by_class.items()}
    # The identity check: every cost run's curve against the curve run of the same learning configuration.
    diffs = []
    for r in raw:
        ref = curves.get(_key(r, lnames))
        if r["kind"] != "cost" or r["status"] != "complete" or ref is None or ref["status"] != "complete":
            continue
        diffs += [abs(float(r[k]) - float(ref[k])) for k in r if k.startswith("loss@") and r[k] not in (None, "")]
    rows = []
    for _, ref in sorted(curves.items()):
        for e in grid_points(LONG["execution"]):
            row = {**{n: ref[n] for n in lnames}, **e, "status": ref["status"]}
            c = cost.get(_key({**ref, **e}, cnames + enames), {})
            total = c.get("train_time_s")
            row.update(eval_loss=ref["eval_loss"], train_time_s=total, train_throughput=c.get("train_throughput"),
                       peak_memory_gb=c.get("peak_memory_gb"), latency_ms=latency.get(_key(ref, cnames)),
                       steps=ref["steps"], cost_runs=c.get("runs"))
            ref_total = float(ref["train_time_s"]) if ref["train_time_s"] not in (None, "") else None
            for k in ref:
                if k.startswith("loss@"):
                    f = k.removeprefix("loss@")
                    row[k] = ref[k]
                    spent = ref.get(f"train_s@{f}")
                    row[f"train_s@{f}"] = (float(spent) / ref_total * total if spent not in (None, "") and ref_total
                                           and total is not None else None)
            row.update({k: c.get(k) for k in ("probe_s", "probe_train_time_s", "probe_train_throughput",
                                              "probe_peak_memory_gb")})
            rows.append(row)
    checks = {"curve_check_max_abs_diff": max(diffs) if diffs else None, "curve_check_points": len(diffs)}
    return rows, checks


def record_long(args: argparse.Namespace) -> int:
    from llmtune.builtin.names import resolve_data_source, resolve_model_name

    resolve_model_name(args.model, log=print)
    resolve_data_source(args.data, log=print)
    recipe = build_recipe(args, {})
    recipe["train"].update(budget={"examples": LONG["examples"]}, eval_points=LONG["eval_points"])
    recipe["search"]["micro_batch_size"] = LONG["micro_batch_size"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or "cpu-long"
    raw_path, csv_path, meta_path = out / f"tabular_{tag}_raw.jsonl", out / f"tabular_{tag}.csv", out / f"tabular_{tag}.json"
    raw = [json.loads(line) for line in raw_path.read_text().splitlines()] if args.expand_only else []
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "grid_name": "cpu-long", "grid": LONG,
            "rungs": RUNGS, "recipe": recipe, "machine": machine(args), "command": " ".join(sys.argv),
            "format": "benchmarks/README.md#table-format",
            "settings": list(LONG["learning"]) + list(LONG["execution"]), "execution": list(LONG["execution"])}
    if not args.expand_only:
        work = tempfile.mkdtemp(prefix="llmtune-tabular-")
        jobs = long_jobs(args, recipe, work)
        random.Random(1).shuffle(jobs)  # interleaved: timings of every kind of run see the same machine
        if args.limit:
            jobs = jobs[: args.limit]
        print(f"recording {len(jobs)} runs with {args.workers} worker(s) -> {raw_path}", flush=True)
        t0 = time.time()
        with mp.get_context("spawn").Pool(args.workers, initializer=_init_worker, initargs=(args.threads,)) as pool, \
                open(raw_path, "w") as f:
            for row in pool.imap_unordered(run_one, jobs):
                f.write(json.dumps(row, default=str) + "\n")
                f.flush()
                raw.append(row)
                print(f"[{len(raw)}/{len(jobs)} {time.time() - t0:.0f}s] {row['kind']} {row['config_id']} {row['status']} "
                      f"loss {row['eval_loss']} train {row['train_time_s']} wall {row['wall_time_s']}", flush=True)
        meta["wall_s"] = time.time() - t0
    rows, checks = expand_long(raw)
    meta.update(checks, raw_runs=len(raw), configs=len(rows),
                statuses={s: sum(r["status"] == s for r in raw) for s in {r["status"] for r in raw}})
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["status"])
        writer.writeheader()
        writer.writerows(rows)
    meta_path.write_text(json.dumps(meta, indent=1, default=str))
    print(f"done: {len(raw)} runs -> {len(rows)} rows; curve check {checks}; {csv_path}, {meta_path}")
    return 0


def text_task_data(folder: Path) -> Path:
    """The second real task's data: generated prose documents (the tiny model's pretraining corpus, which
    SmolLM2 never saw), as ``{"text": ...}`` rows, train and eval apart. Deterministic (seeded)."""
    from llmtune.builtin.tiny_data import SEED, corpus_documents

    folder.mkdir(parents=True, exist_ok=True)
    docs = corpus_documents(random.Random(SEED + 21), 2400)
    for name, part in (("train.jsonl", docs[200:]), ("eval.jsonl", docs[:200])):
        path = folder / name
        if not path.is_file():
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
            tmp.replace(path)
    return folder


def real_recipe(args: argparse.Namespace, task: str) -> dict[str, Any]:
    data = dict(REAL["tasks"][task])
    if data["source"] == "<generated>":
        data["source"] = str(text_task_data(Path(tempfile.gettempdir()) / "llmtune-tabular-text"))
    return {
        "name": f"tabular-smollm2-{task}",
        "model": {"name": REAL["model"], "dtype": REAL_DTYPE},
        "data": {**data, "eval_max_length": REAL["eval_max_length"], "max_eval_examples": REAL["eval_examples"]},
        "train": {"budget": {"examples": REAL["examples"]}, "eval_points": REAL["eval_points"], "eval_batch_size": 16,
                  "device": args.device, "seed": 42, "lr_scheduler": "cosine"},
        "measure": {"latency_prompts": 2, "max_new_tokens": 8},
        "search": {**REAL["fixed"]},
        "objectives": {"eval_loss": "minimize", "peak_memory_gb": "minimize"},
        "output_dir": str(Path(tempfile.gettempdir()) / "llmtune-tabular"),
    }


def prior_ids(args: argparse.Namespace, task: str) -> list[int]:
    """The grid points a new search on this task starts from (`llmtune.study.priors`, for SmolLM2-135M and
    this budget): the priors' starts and the cheap end of the front (`cheap_config`, queued where a cost is an
    objective), recorded first so that a replay of a partial table finds every queued start in it. (Until
    2026-12-07 the cheap start was not among them: on the partial text table it fell on an unrecorded row.)"""
    from llmtune.config.recipe import recipe_from_dict
    from llmtune.config.space import SearchSpace
    from llmtune.study.priors import cheap_config, prior_configs, recipe_facts

    space = SearchSpace.from_dict({**REAL["learning"], **REAL["fixed"]})
    facts = recipe_facts(recipe_from_dict(real_recipe(args, task)), space)
    points = grid_points(REAL["learning"])
    names = list(REAL["learning"])
    starts = prior_configs(space, 3, facts) + [c for c in (cheap_config(space, facts), cheap_config(space, facts, True)) if c]
    return list(dict.fromkeys(i for c in starts for i, p in enumerate(points) if all(p[n] == c.get(n, p[n]) for n in names)))


def real_jobs(args: argparse.Namespace, work: str) -> list[tuple[Any, ...]]:
    """Every (task, learning configuration) run: the priors' starts first, then each task's grid shuffled
    (seed 21), the tasks alternating."""
    points = grid_points(REAL["learning"])
    per_task = []
    for t, task in enumerate(REAL["tasks"]):
        recipe = real_recipe(args, task)
        order = list(range(len(points)))
        random.Random(21 + t).shuffle(order)
        first = prior_ids(args, task)
        order = first + [i for i in order if i not in first]
        per_task.append([(i, {**points[i], **REAL["fixed"]}, recipe, work, {"kind": task, "rungs": RUNGS})
                         for i in order])
    return [job for group in itertools.zip_longest(*per_task) for job in group if job is not None]


def record_real(args: argparse.Namespace) -> int:
    """Record (or go on recording) the real-model tables; rebuild each task's CSV from the raw runs."""
    from llmtune import hardware
    from llmtune.builtin.names import resolve_data_source, resolve_model_name

    resolve_model_name(REAL["model"], log=print)
    for task in REAL["tasks"]:
        resolve_data_source(real_recipe(args, task)["data"]["source"], log=print)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or "smollm2"
    raw_path = out / f"tabular_{tag}_raw.jsonl"
    if args.device == "cpu" and not args.expand_only and not hardware.cpu_has_fast_bf16():
        print(f"not recording: the real tables are {REAL_DTYPE} runs (SmolLM2's own dtype) on a CPU that multiplies "
              f"bf16 natively (AMX / AVX512-BF16); this CPU ({cpu_model() or 'unknown'}) does not, so a run would "
              "take many times as long and its timings would not compare with the table's. Record on such a CPU "
              "(or a GPU: --device cuda); the tables are rebuilt from the raw runs recorded so far.", flush=True)
        args.expand_only = True
    raw = [json.loads(line) for line in raw_path.read_text().splitlines() if line.strip()] if raw_path.is_file() else []
    done = {(r["kind"], r["config_id"]) for r in raw}
    jobs = [j for j in real_jobs(args, tempfile.mkdtemp(prefix="llmtune-tabular-")) if (j[4]["kind"], j[0]) not in done
            and (not args.tasks or j[4]["kind"] in args.tasks.split(","))]
    if args.limit:
        jobs = jobs[: args.limit]
    if not args.expand_only and jobs:
        print(f"recording {len(jobs)} runs ({len(done)} already in {raw_path}) with {args.workers} worker(s)", flush=True)
        t0 = time.time()
        with mp.get_context("spawn").Pool(args.workers, initializer=_init_worker, initargs=(args.threads, True)) as pool, \
                open(raw_path, "a") as f:
            for row in pool.imap_unordered(run_one, jobs):
                row["recorded"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                f.write(json.dumps(row, default=str) + "\n")
                f.flush()
                raw.append(row)
                print(f"[{len(raw)} {time.time() - t0:.0f}s] {row['kind']} {row['config_id']} {row['status']} "
                      f"loss {row['eval_loss']} train {row['train_time_s']} wall {row['wall_time_s']}", flush=True)
                write_real_tables(args, out, tag, raw)
    write_real_tables(args, out, tag, raw)
    return 0


def write_real_tables(args: argparse.Namespace, out: Path, tag: str, raw: list[dict[str, Any]]) -> None:
    """One replayable CSV per task (the table format) and its meta, from the raw runs recorded so far."""
    names = list(REAL["learning"])
    for task in REAL["tasks"]:
        rows = [{k: v for k, v in r.items() if k not in ("kind", "recorded")} for r in raw
                if r["kind"] == task and r.get("dtype", REAL_DTYPE) == REAL_DTYPE]
        left_out = sum(r["kind"] == task and r.get("dtype", REAL_DTYPE) != REAL_DTYPE for r in raw)
        rows.sort(key=lambda r: r["config_id"])
        csv_path, meta_path = out / f"tabular_{tag}-{task}.csv", out / f"tabular_{tag}-{task}.json"
        if rows:
            fields = list(dict.fromkeys(k for r in rows for k in r))
            with open(csv_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
        meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "task": task, "real": REAL,
                "grid": REAL["learning"], "settings": names, "execution": [], "rungs": RUNGS,
                "recipe": real_recipe(args, task), "machine": machine(args), "format": "benchmarks/README.md#table-format",
                "recorded": len(rows), "of": len(grid_points(REAL["learning"])),
                "statuses": {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}},
                "left_out": {"runs": left_out, "why": f"recorded in another dtype than {REAL_DTYPE} (kept in the raw runs)"}}
        meta_path.write_text(json.dumps(meta, indent=1, default=str))


def machine(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    versions = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "optuna", "llmtune"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    info = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "device": args.device, "workers": args.workers, "threads_per_worker": args.threads, "versions": versions}
    if args.device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--grid", choices=tuple(GRIDS), default=None, help="default: cpu on cpu, gpu on cuda")
    p.add_argument("--limit", type=int, default=None, help="only the first K configurations (smoke test)")
    p.add_argument("--sample", type=int, default=None, help="K configurations drawn at random (seed 0)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default=None, help="file name tag (default: the grid name)")
    p.add_argument("--model", default="llmtune/tiny")
    p.add_argument("--data", default="llmtune/tiny-tasks")
    p.add_argument("--examples", type=int, default=108, help="training budget in examples")
    p.add_argument("--micro-batch-size", type=int, default=6)
    p.add_argument("--eval-examples", type=int, default=24)
    p.add_argument("--eval-max-length", type=int, default=128)
    p.add_argument("--latency-prompts", type=int, default=2)
    p.add_argument("--long", action="store_true", help="the long-curve table (LONG): >= 150 steps, >= 8 evals, "
                   "execution variants measured by cost runs and probes")
    p.add_argument("--real", action="store_true", help="the real-model tables (REAL): SmolLM2-135M on two tasks, "
                   "resumable (runs already in the raw file are skipped)")
    p.add_argument("--tasks", default=None, help="--real: only these tasks (comma-separated; default: every task)")
    p.add_argument("--repeats", type=int, default=2, help="--long: cost runs and probes per computation")
    p.add_argument("--expand-only", action="store_true", help="--long: rebuild the table from the raw runs file")
    args = p.parse_args(argv)
    if args.real:
        return record_real(args)
    if args.long:
        return record_long(args)
    if args.device == "cuda" and args.workers != 1:
        p.error(f"--workers {args.workers} with --device cuda: one GPU runs one trial at a time; use --workers 1")
    grid_name = args.grid or ("gpu" if args.device == "cuda" else "cpu")
    grid = GRIDS[grid_name]
    indexed = list(enumerate(grid_points(grid)))
    if args.sample:
        indexed = sorted(random.Random(0).sample(indexed, min(args.sample, len(indexed))))
    if args.limit:
        indexed = indexed[: args.limit]

    from llmtune.builtin.names import resolve_data_source, resolve_model_name

    # Build the offline tiny model/data once here, not in every worker at the same time.
    resolve_model_name(args.model, log=print)
    resolve_data_source(args.data, log=print)
    recipe = build_recipe(args, grid)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or grid_name
    csv_path, meta_path = out / f"tabular_{tag}.csv", out / f"tabular_{tag}.json"
    work = tempfile.mkdtemp(prefix="llmtune-tabular-")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "grid_name": grid_name, "grid": grid,
            "rungs": RUNGS, "configs": len(indexed), "recipe": recipe, "machine": machine(args),
            "command": " ".join(sys.argv)}
    print(f"recording {len(indexed)} configurations with {args.workers} worker(s) -> {csv_path}", flush=True)
    t0 = time.time()
    jobs = [(i, pt, recipe, work) for i, pt in indexed]
    # Shuffled, so a run cut short leaves a uniform sample of the grid rather than one corner of it.
    random.Random(1).shuffle(jobs)
    rows: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers, initializer=_init_worker, initargs=(args.threads,)) as pool, \
            open(csv_path, "w", newline="") as f:
        writer: csv.DictWriter | None = None
        for row in pool.imap_unordered(run_one, jobs):
            if writer is None:
                writer = csv.DictWriter(f, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)
            f.flush()
            rows.append(row)
            print(f"[{len(rows)}/{len(jobs)} {time.time() - t0:.0f}s] config {row['config_id']} {row['status']} "
                  f"loss {row['eval_loss']} train {row['train_time_s']} wall {row['wall_time_s']}", flush=True)
            meta.update(wall_s=time.time() - t0, recorded=len(rows),
                        statuses={s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}})
            meta_path.write_text(json.dumps(meta, indent=1, default=str))
    print(f"done: {len(rows)} configurations in {time.time() - t0:.0f}s; {csv_path}, {meta_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
