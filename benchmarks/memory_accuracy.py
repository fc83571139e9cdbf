"""How close is llmtune's VRAM estimate to the peak a real trial measures? (issue #4, needs a CUDA GPU)

For real-sized architectures (a Llama-3.2-1B and a Qwen2.5-0.5B shape, random weights: memory does not
depend on weight values) it runs real llmtune trials — the same child process, harness and measurement a
search uses — over configs that differ in quantization, gradient checkpointing, sequence length, batch size,
packing and LoRA targets, and puts the measured peak (`peak_memory_gb`: the larger of torch's reserved peak
and NVML's view, which includes the CUDA context) beside the prediction of `llmtune.study.gate.estimate_for`, which
reads only config.json. It prints the relative error per config, the median and the worst.

    python benchmarks/memory_accuracy.py --device cuda          # measure + compare (GPU; ~8 min on an H100)
    python benchmarks/memory_accuracy.py --from benchmarks/results/memory_accuracy.json   # re-predict only (CPU)

The second form re-runs the estimator on the stored measurements, so a change to `llmtune/study/memory.py` can be
checked without a GPU. Results: benchmarks/results/memory_accuracy.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The two architectures' config.json essentials (public model configs; the weights are random).
ARCHS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=500000.0,
                         rms_norm_eps=1e-5),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=1000000.0, rms_norm_eps=1e-6),
}

# (arch, quantization, gradient_checkpointing, sequence_len, micro_batch_size, sample_packing, targets, lora_r)
CONFIGS: list[tuple[str, str, bool, int, int, bool, str, int]] = [
    ("llama-3.2-1b", "none", False, 512, 4, False, "all-linear", 16),
    ("llama-3.2-1b", "none", True, 512, 4, False, "all-linear", 16),
    ("llama-3.2-1b", "none", False, 1024, 2, False, "all-linear", 16),
    ("llama-3.2-1b", "none", True, 2048, 4, False, "all-linear", 16),
    ("llama-3.2-1b", "none", False, 1024, 4, True, "all-linear", 16),
    ("llama-3.2-1b", "none", True, 512, 8, False, "qv", 64),
    ("llama-3.2-1b", "8bit", False, 512, 4, False, "all-linear", 16),
    ("llama-3.2-1b", "8bit", True, 1024, 4, False, "all-linear", 16),
    ("llama-3.2-1b", "4bit", False, 512, 4, False, "all-linear", 16),
    ("llama-3.2-1b", "4bit", True, 1024, 8, False, "all-linear", 16),
    ("llama-3.2-1b", "4bit", True, 2048, 2, False, "attention", 8),
    ("llama-3.2-1b", "4bit", False, 1024, 2, True, "all-linear", 32),
    ("qwen2.5-0.5b", "none", False, 512, 4, False, "all-linear", 16),
    ("qwen2.5-0.5b", "none", True, 2048, 2, True, "all-linear", 16),
    ("qwen2.5-0.5b", "8bit", False, 512, 2, False, "all-linear", 16),
    ("qwen2.5-0.5b", "4bit", True, 1024, 4, False, "all-linear", 16),
    ("llama-3.2-1b", "8bit", True, 512, 4, False, "all-linear", 16),
    ("llama-3.2-1b", "none", False, 256, 16, False, "attention", 16),
    ("llama-3.2-1b", "4bit", False, 2048, 1, True, "all-linear", 16),
    ("qwen2.5-0.5b", "8bit", True, 1024, 2, False, "qv", 16),
]
KEYS = ("arch", "quantization", "gradient_checkpointing", "sequence_len", "micro_batch_size", "sample_packing",
        "lora_target_modules", "lora_r")


def _write_config(arch: str, folder: Path) -> None:
    from transformers import AutoConfig

    folder.mkdir(parents=True, exist_ok=True)
    kw = dict(ARCHS[arch])
    AutoConfig.for_model(kw.pop("model_type"), **kw).save_pretrained(folder)


def build_model(arch: str, folder: Path, tokenizer_dir: Path) -> None:
    """config.json + random bf16 weights + the tiny tokenizer (its ids fit any of these vocabularies)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    _write_config(arch, folder)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "chat_template.jinja":
            shutil.copy(f, folder / f.name)


def write_data(path: Path, rows: int = 96, words: int = 2500) -> None:
    """Plain-text rows long enough that every example fills sequence_len (padding = worst case)."""
    import random

    rng = random.Random(0)
    vocab = ["alpha", "beta", "gamma", "delta", "river", "stone", "seven", "forty", "blue", "quiet", "make", "run"]
    with path.open("w") as fh:
        for _ in range(rows):
            fh.write(json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(words))}) + "\n")


def recipe_for(model_dir: Path, data: Path, cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    search = {k: cfg[k] for k in KEYS if k != "arch"}
    search.update(learning_rate=1e-4, lora_dropout=0.0)
    return {
        "name": "memory-accuracy",
        "model": {"name": str(model_dir), "dtype": "bfloat16"},
        "data": {"source": str(data), "format": "text", "train_on": "all", "eval_fraction": 0.05,
                 "eval_max_length": 64, "max_eval_examples": 2},
        "train": {"budget": {"examples": 3 * cfg["micro_batch_size"]}, "eval_points": 1, "eval_batch_size": 1,
                  "device": "cuda"},
        "measure": {"latency": False},
        "search": search,
        "objectives": {"eval_loss": "minimize", "peak_memory_gb": "minimize"},
        "study": {"trial_timeout": 600},
        "output_dir": str(out),
    }


def predict(recipe: dict[str, Any], cfg: dict[str, Any]) -> dict[str, float]:
    from llmtune.config.recipe import recipe_from_dict
    from llmtune.study.gate import estimate_for

    r = recipe_from_dict(recipe)
    return estimate_for(r, r.space.complete({k: cfg[k] for k in KEYS if k != "arch"}), device="cuda").breakdown()


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    import llmtune
    from llmtune.builtin.tiny import ensure_tiny_model

    if not torch.cuda.is_available():
        sys.exit("memory_accuracy: measuring needs a CUDA GPU (use --from FILE to re-predict stored measurements)")
    work = Path(tempfile.mkdtemp(prefix="llmtune-memacc-"))
    data = work / "long.jsonl"
    write_data(data)
    tok = ensure_tiny_model(log=None)
    rows, started = [], time.perf_counter()
    for i, c in enumerate(CONFIGS[: args.limit]):
        cfg = dict(zip(KEYS, c, strict=True))
        model_dir = work / cfg["arch"]
        if not (model_dir / "config.json").exists() or not any(model_dir.glob("*.safetensors")):
            t = time.perf_counter()
            build_model(cfg["arch"], model_dir, tok)
            print(f"built {cfg['arch']} (random weights) in {time.perf_counter() - t:.0f}s", flush=True)
        recipe = recipe_for(model_dir, data, cfg, work / f"run{i}")
        t = time.perf_counter()
        res = llmtune.train(recipe, {k: cfg[k] for k in KEYS if k != "arch"}, out_dir=work / f"trial{i}")
        peak = res.info.get("peak_memory", {})
        row = {"config": cfg, "status": res.status, "reason": res.reason,
               "measured_gb": res.metrics.get("peak_memory_gb"),
               "torch_reserved_gb": (peak.get("torch_reserved") or 0) / 2**30,
               "torch_allocated_gb": (peak.get("torch_allocated") or 0) / 2**30,
               "nvml_gb": (peak.get("nvml") or 0) / 2**30, "seconds": time.perf_counter() - t}
        rows.append(row)
        print(f"[{i + 1}/{len(CONFIGS[: args.limit])}] {_label(cfg)}: {res.status} "
              f"measured {row['measured_gb'] or float('nan'):.2f} GiB (reserved {row['torch_reserved_gb']:.2f}, "
              f"allocated {row['torch_allocated_gb']:.2f}, nvml {row['nvml_gb']:.2f}) in {row['seconds']:.0f}s",
              flush=True)
        if time.perf_counter() - started > args.max_seconds:
            print(f"stopping: --max-seconds {args.max_seconds} reached", flush=True)
            break
    shutil.rmtree(work, ignore_errors=True)
    import transformers

    meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}
    try:
        import bitsandbytes
        import peft

        meta.update(peft=peft.__version__, bitsandbytes=bitsandbytes.__version__)
    except ImportError:
        pass
    return [{"meta": meta}, *rows]


def _label(cfg: dict[str, Any]) -> str:
    return (f"{cfg['arch']} {cfg['quantization']:>4} ckpt={'y' if cfg['gradient_checkpointing'] else 'n'} "
            f"seq={cfg['sequence_len']:>4} b={cfg['micro_batch_size']} pack={'y' if cfg['sample_packing'] else 'n'} "
            f"{cfg['lora_target_modules']} r={cfg['lora_r']}")


def compare(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Predict every measured config (config.json only) and tabulate the relative errors."""
    meta = records[0].get("meta", {})
    rows = [r for r in records[1:] if r.get("status") == "complete" and r.get("measured_gb")]
    with tempfile.TemporaryDirectory() as tmp:
        for arch in {r["config"]["arch"] for r in rows}:
            _write_config(arch, Path(tmp) / arch)
        for r in rows:
            cfg = r["config"]
            recipe = recipe_for(Path(tmp) / cfg["arch"], Path(tmp) / "unused.jsonl", cfg, Path(tmp) / "out")
            r["predicted"] = predict(recipe, cfg)
            r["predicted_gb"] = r["predicted"]["total"]
            r["rel_error"] = (r["predicted_gb"] - r["measured_gb"]) / r["measured_gb"]
    errs = [abs(r["rel_error"]) for r in rows]
    lines = [f"GPU: {meta.get('gpu', '?')}, torch {meta.get('torch', '?')}, transformers {meta.get('transformers', '?')}, "
             f"peft {meta.get('peft', '?')}, bitsandbytes {meta.get('bitsandbytes', '?')}, measured {meta.get('date', '?')}",
             "", "| config | measured GiB | predicted GiB | error |", "| --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {_label(r['config'])} | {r['measured_gb']:.2f} | {r['predicted_gb']:.2f} | {r['rel_error']:+.1%} |")
    failed = [r for r in records[1:] if r not in rows]
    for r in failed:
        lines.append(f"| {_label(r['config'])} | {r.get('status')}: {str(r.get('reason'))[:80]} | | |")
    if errs:
        lines += ["", f"{len(rows)} configs: median |error| {statistics.median(errs):.1%}, worst {max(errs):.1%} "
                      f"(target: median <= 10%, worst <= 20%)"]
    return rows, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda"])
    ap.add_argument("--from", dest="source", help="stored measurements (JSON written by an earlier run): re-predict only")
    ap.add_argument("--limit", type=int, default=None, help="measure only the first N configs")
    ap.add_argument("--max-seconds", type=float, default=480, help="stop starting configs after this long")
    ap.add_argument("--out", default="benchmarks/results/memory_accuracy")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    records = json.loads(Path(args.source).read_text()) if args.source else measure(args)
    rows, table = compare(records)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.source:  # keep the raw measurements; --from only re-predicts
        out.with_suffix(".json").write_text(json.dumps(records, indent=1))
    out.with_suffix(".md").write_text("# VRAM estimate vs measured peak\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
