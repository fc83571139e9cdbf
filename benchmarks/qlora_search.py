"""A short QLoRA search end to end on a real architecture with random weights: `llmtune.search` as a user runs
it (preflight, the memory gate, trial processes, the recorder), 4-bit NF4 base weights, three trials.

It shows that the search path, not only a single trial, works with bitsandbytes on a GPU: each trial's base
is quantized (its Linear layers are `Linear4bit`), every trial ends complete, and the measured peak memory
is set beside the estimator's prediction for the same settings.

    python benchmarks/qlora_search.py --device cuda                       # Llama 1.1B shape, random weights
    python benchmarks/qlora_search.py --device cpu --model tiny --quantization none   # the same path, on a CPU

Writes ``qlora_search.json`` and ``qlora_search.md`` (one row a trial) to ``--out``; exits 1 when a trial
did not complete or a 4-bit trial's base was not quantized. Part of `benchmarks/gpu_check.sh`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def recipe(model_path: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    on_gpu = args.device == "cuda"
    return {
        "name": "qlora-search",
        "model": {"name": model_path, "dtype": "bfloat16" if on_gpu else "auto"},
        "data": {"source": "llmtune/tiny-tasks", "format": "instruction", "eval_max_length": 256, "max_eval_examples": 32},
        "train": {"budget": {"examples": args.examples}, "eval_points": 2, "device": args.device, "seed": 42},
        "measure": {"latency_prompts": 2, "max_new_tokens": 8},
        "search": {"learning_rate": {"low": 1e-4, "high": 1e-3, "log": True}, "lora_r": [8, 16],
                   "lora_target_modules": "all-linear", "sequence_len": 256, "micro_batch_size": 4,
                   "quantization": args.quantization, "gradient_checkpointing": on_gpu},
        "objectives": {"eval_loss": "minimize", "peak_memory_gb": "minimize", "train_throughput": "maximize"},
        "study": {"n_trials": args.n_trials, "pruner": "none", "trial_timeout": args.trial_timeout},
        "output_dir": str(work / "run"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--model", default="llama-1b", help="llama-1b (random weights), tiny, smollm2 or a local path")
    p.add_argument("--quantization", default="4bit", choices=["none", "8bit", "4bit"])
    p.add_argument("--n-trials", type=int, default=3)
    p.add_argument("--examples", type=int, default=128, help="training examples per trial (the budget)")
    p.add_argument("--trial-timeout", type=int, default=300)
    p.add_argument("--out", default="benchmarks/results/qlora_search")
    args = p.parse_args()

    from harness_speed import build_model

    import llmtune
    from llmtune.study.gate import estimate_for

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="llmtune-qlora-search-"))
    model_path = build_model(args.model, args.device)
    spec = recipe(model_path, args, work)
    started = time.perf_counter()
    result = llmtune.search(spec, quiet=True)
    wall = time.perf_counter() - started
    loaded = result.recipe
    rows, problems = [], []
    for t in result.all_trials:
        folder = Path(spec["output_dir"]) / "trials" / f"{t.number:04d}"
        saved = json.loads((folder / "result.json").read_text()) if (folder / "result.json").is_file() else {}
        info, metrics, settings = saved.get("info", {}), saved.get("metrics", {}), saved.get("settings", {})
        predicted = None
        if settings and args.device == "cuda":
            predicted = estimate_for(loaded, {k: settings[k] for k in loaded.space.specs}, device="cuda").total / 2**30
        row = {"trial": t.number, "status": saved.get("status", t.state.name.lower()), "reason": saved.get("reason", ""),
               "learning_rate": settings.get("learning_rate"), "lora_r": settings.get("lora_r"),
               "eval_loss": metrics.get("eval_loss"), "peak_memory_gb": metrics.get("peak_memory_gb"),
               "predicted_memory_gb": predicted, "train_throughput": metrics.get("train_throughput"),
               "quantized_layers": info.get("quantized_layers"), "gpu": info.get("gpu"), "dtype": info.get("dtype")}
        rows.append(row)
        if row["status"] != "complete":
            problems.append(f"trial {t.number} ended {row['status']}: {row['reason']}")
        if args.quantization == "4bit" and "Linear4bit" not in json.dumps(row["quantized_layers"]):
            problems.append(f"trial {t.number}'s base is not 4-bit (quantized layers: {row['quantized_layers']})")
    if len(rows) < args.n_trials:
        problems.append(f"{len(rows)} trials of {args.n_trials} ran")
    summary = {"model": args.model, "device": args.device, "quantization": args.quantization, "wall_s": wall,
               "trials": rows, "problems": problems, "recorded": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (out / "qlora_search.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)

    head = ["trial", "status", "learning_rate", "lora_r", "eval_loss", "peak_memory_gb", "predicted_memory_gb",
            "train_throughput", "quantized_layers"]
    lines = [f"# QLoRA search: {args.model}, {args.quantization}, {args.device} ({summary['recorded']}; {wall:.0f} s)", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(cell(r[h]) for h in head) + " |" for r in rows]
    lines += ["", "problems: " + ("; ".join(problems) if problems else "none")]
    (out / "qlora_search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
