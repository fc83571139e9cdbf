"""`llmtune init`: a first recipe for a model and a data file, its search space drawn from published priors.

The priors are the rule a new search starts from (`llmtune.study.priors`, which cites its sources): the
best LoRA learning rate x alpha shrinks with the model's width and is nearly independent of the rank at a
fixed alpha, so alpha is fixed at 32, only the rank is searched (around the rank for the model's size),
and the learning-rate range is centred on the rule's first start for this model and budget (from a
quarter of it to 6x, short of the ~10x where runs diverge); adapters on all linear layers beat
attention-only ones at equal parameters (both are offered, so the search can show it).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmtune.errors import Problem, RecipeError

LR_BELOW, LR_ABOVE = 0.25, 6.0  # the learning-rate range around the rule's first start
LORA_ALPHA = 32
BATCH_SIZE = 16
TARGETS = ["attention", "all-linear"]
CHARS_PER_TOKEN = 4  # a rough English average: enough to pick a sequence_len without loading a tokenizer
SAMPLE_ROWS = 200    # rows read to guess the format and the lengths


def read_rows(path: Path, n: int = SAMPLE_ROWS) -> tuple[list[dict[str, Any]], int]:
    """The first `n` rows of a JSONL, JSON (a list of rows), CSV or parquet file, and how many rows it has."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_rows(path, n)
    try:
        if suffix == ".csv":
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
            return rows[:n], len(rows)
        if suffix == ".json":
            data = json.loads(path.read_text())
            rows = data if isinstance(data, list) else [data]
            return rows[:n], len(rows)
        out: list[dict[str, Any]] = []
        count = 0
        with path.open() as f:
            for line in f:
                if line.strip():
                    count += 1
                    if len(out) < n:
                        out.append(json.loads(line))
        return out, count
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise RecipeError([Problem("--data", f"cannot read {str(path)!r} as JSONL, JSON or CSV: {e}")]) from None


def _parquet_rows(path: Path, n: int) -> tuple[list[dict[str, Any]], int]:
    """The first `n` rows of a parquet file (pyarrow, which `datasets` depends on), and how many it has."""
    try:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        first = next(parquet.iter_batches(batch_size=n), None)
        return (first.to_pylist() if first is not None else []), parquet.metadata.num_rows
    except Exception as e:  # noqa: BLE001 - pyarrow raises its own types for a broken file
        raise RecipeError([Problem("--data", f"cannot read {str(path)!r} as parquet ({type(e).__name__}: "
                                             f"{' '.join(str(e).split())[:200]})")]) from None


def data_file(data: str) -> tuple[Path, str]:
    """The file whose rows `init` reads, and what the recipe's data.source says: a file as given; a built-in
    data set (llmtune/tiny-tasks) or a folder of split files by its train split, the source as given."""
    from llmtune.builtin.names import DATA, resolve_data_source
    from llmtune.harness.data_sources import DATA_SUFFIXES, _split_files

    if data in DATA:
        folder = Path(resolve_data_source(data, log=None))
        return _split_files(folder)["train"], data
    path = Path(data).expanduser()
    if path.is_dir():
        files = _split_files(path)
        if "train" not in files:
            raise RecipeError([Problem("--data", f"{data!r} is a folder without a train file (it has "
                                                 f"{', '.join(sorted(files)) or 'no data files'}); give a file, or a "
                                                 "folder with train.jsonl")])
        return files["train"], str(path.resolve())
    if not path.is_file():
        where = "" if path.is_absolute() else f" (looked for {str(path.absolute())!r})"
        raise RecipeError([Problem("--data", f"{data!r} is not a file{where}; give a JSONL, JSON, CSV or parquet file, "
                                             f"a folder of split files, or {', '.join(DATA)}")])
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise RecipeError([Problem("--data", f"{data!r} has the type {path.suffix or '(no suffix)'!r}; give one of "
                                             f"{', '.join(DATA_SUFFIXES)}")])
    return path, str(path.resolve())


# Training throughput of a LoRA trial on a CPU, in FLOP/s per thread, counted as 4 x the linear layers'
# parameters per real token: SmolLM2-135M in float32 on one thread reached 0.056 TFLOP/s (~100 tokens/s;
# benchmarks/results/harness_speed_smollm2_cpu_2026-12-03.md, 2026-12-03). bfloat16 on AMX CPUs is ~1.8x faster.
CPU_FLOPS_PER_THREAD = 5e10
CPU_TRIAL_SECONDS = 300  # the default budget on a CPU: a trial of about 5 minutes, so a search takes hours, not days
MIN_EXAMPLES = 64


def cpu_cost(parameters: float, tokens_per_example: float, threads: int) -> float:
    """Seconds of training per example of one trial on this CPU (`CPU_FLOPS_PER_THREAD`)."""
    return 4 * parameters * tokens_per_example / (CPU_FLOPS_PER_THREAD * max(1, threads))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def guess_format(row: dict[str, Any]) -> tuple[str, dict[str, str], str]:
    """(data.format, the data.*_field settings it needs, what was seen) from one row."""
    if isinstance(row.get("messages"), list | str):
        return "chat", {}, "a 'messages' list (chat)"
    if isinstance(row.get("conversations"), list):
        return "chat", {}, "a 'conversations' list (ShareGPT, read as chat)"
    for instruction, output in (("instruction", "output"), ("prompt", "completion"), ("question", "answer"),
                                ("prompt", "response")):
        if instruction in row and output in row:
            fields = {} if (instruction, output) == ("instruction", "output") else {
                "instruction_field": instruction, "output_field": output}
            return "instruction", fields, f"'{instruction}' and '{output}' fields (instruction)"
    if "text" in row:
        return "text", {}, "a 'text' field (plain text)"
    texts = [k for k, v in row.items() if isinstance(v, str)]
    if texts:
        return "text", {"text_field": texts[0]}, f"no known fields; '{texts[0]}' read as plain text"
    raise RecipeError([Problem("--data", f"cannot tell the format of the first row (fields: {', '.join(row) or 'none'}); "
                               "give rows with 'text', 'instruction'/'output', 'messages' or 'conversations'")])


def sequence_len(rows: list[dict[str, Any]]) -> int:
    """A power of two (128..2048) that holds about 90% of the sampled rows, by their characters."""
    lengths = sorted(len(json.dumps(r, ensure_ascii=False)) // CHARS_PER_TOKEN for r in rows)
    if not lengths:
        return 512
    p90 = lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))]
    return int(min(2048, max(128, 2 ** math.ceil(math.log2(max(p90, 1))))))


def lora_ranks(rank: int) -> list[int]:
    """The ranks searched around the prior's: half of it to four times it."""
    return [max(4, rank // 2), rank, 2 * rank, 4 * rank]


def model_facts(model: str, examples: int) -> Any:
    """The priors' `ModelFacts` for a model folder or name and the budget, or None when its config is unreadable."""
    from llmtune.study.priors import facts_from_config

    try:
        from transformers import AutoConfig

        return facts_from_config(AutoConfig.from_pretrained(model), steps=max(1, examples // BATCH_SIZE))
    except Exception:  # unreadable here (offline, a typo: `llmtune validate` says which): the rule's default
        return None


def _liger_has_kernels_for(model: str) -> bool:
    """Whether liger-kernel is installed and has kernels for this model's architecture."""
    from llmtune import hardware

    known = hardware.liger_model_types()
    if isinstance(known, str):
        return False
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model).model_type in known
    except Exception:  # unreadable here: `llmtune validate` says why
        return False


def learning_rates(facts: Any, rank: int) -> tuple[float, float, str]:
    """The learning-rate range (low, high) around the priors' first start for this model and budget, and why."""
    from llmtune.study.priors import lr_alpha_product

    first = lr_alpha_product(facts) / LORA_ALPHA
    low, high = float(f"{first * LR_BELOW:.1g}"), float(f"{first * LR_ABOVE:.1g}")
    seen = (f"width {facts.hidden_size}, ~{facts.parameters / 1e9:.2g}B parameters, {facts.steps} steps" if facts
            else "its config was not readable here: a 7B-class model assumed")
    return low, high, f"first start {first:.2g} for this model ({seen}, r {rank})"


def fitting_quantizations(model: str, gpu_memory_gb: float | None, seq_len: int, rank: int = 64) -> tuple[list[str], str]:
    """The quantizations whose largest configuration (`rank`, all linear layers, micro batch 1) fits the GPU,
    and why. None on a machine without CUDA and no --gpu-memory: bitsandbytes' CPU paths are slow."""
    from llmtune import hardware
    from llmtune.study.memory import estimate_memory

    if gpu_memory_gb is None:
        total = hardware.gpu_memory_bytes(0) if hardware.cuda_available() else None
        if not total:
            return ["none"], "no GPU here: 4bit and 8bit are left out (slow on CPU)"
        gpu_memory_gb = total / 2**30
    fits, sizes = [], []
    for q in ("none", "8bit", "4bit"):
        try:
            gb = estimate_memory(model, quantization=q, lora_r=rank, sequence_len=seq_len).total_gb
        except Exception as e:  # an unreadable config: say so and offer what surely runs
            return ["none", "4bit"], f"could not estimate memory ({type(e).__name__}); check with llmtune estimate"
        sizes.append(f"{q} {gb:.1f}")
        if gb <= gpu_memory_gb * 0.9:  # a tenth kept back: CUDA context, fragmentation
            fits.append(q)
    why = f"predicted GiB at r {rank}: {', '.join(sizes)}; GPU {gpu_memory_gb:g} GiB"
    return fits or ["4bit"], why if fits else why + " (nothing fits: 4bit is the smallest)"


def _yaml(value: Any) -> str:
    return json.dumps(value)  # JSON scalars and lists are YAML


def recipe_text(model: str, data: str | Path, *, gpu_memory_gb: float | None = None, name: str | None = None,
                log: Callable[[str], None] | None = None) -> str:
    """The commented recipe YAML `llmtune init` writes. ``log`` hears what a trial will cost on a CPU."""
    from llmtune import hardware
    from llmtune.builtin.names import resolve_model_name

    path, source = data_file(str(data))
    rows, n_rows = read_rows(path)
    if not rows:
        raise RecipeError([Problem("--data", f"{str(path)!r} has no rows")])
    fmt, fields, seen = guess_format(rows[0])
    seq = sequence_len(rows)
    from llmtune.study.priors import prior_rank

    path_or_name = resolve_model_name(model, log=log)
    examples = max(1, min(2000, int(n_rows * 0.9)))
    budget_note = f"the same data for every trial ({n_rows} rows in the file, 10% held out)"
    facts = model_facts(path_or_name, examples)
    on_cpu = gpu_memory_gb is None and not hardware.cuda_available()
    if on_cpu and facts is not None:
        threads = hardware.trial_threads(1)
        tokens = min(seq, sum(len(json.dumps(r, ensure_ascii=False)) for r in rows) / len(rows) / CHARS_PER_TOKEN)
        per_example = cpu_cost(facts.parameters, tokens, threads)
        fitting = max(MIN_EXAMPLES, int(CPU_TRIAL_SECONDS / per_example))
        if fitting < examples:
            budget_note = (f"sized for this CPU: ~{_duration(fitting * per_example)} a trial ({examples} examples "
                           f"would take ~{_duration(examples * per_example)}); raise it on a GPU")
            examples = fitting
            facts = model_facts(path_or_name, examples)
        if log is not None and facts is not None:
            trial = examples * per_example
            log(f"no GPU here: a trial of {model} on {examples} examples (~{tokens:.0f} tokens each) takes about "
                f"{_duration(trial)} on {threads} CPU thread(s), the search's 16 trials about {_duration(16 * trial)}"
                + (f" (train.budget lowered from {min(2000, int(n_rows * 0.9))} examples to fit)"
                   if "sized for this CPU" in budget_note else ""))
    ranks = lora_ranks(prior_rank(facts))
    lr_low, lr_high, lr_why = learning_rates(facts, ranks[1])
    quant, quant_why = fitting_quantizations(path_or_name, gpu_memory_gb, seq, max(ranks))
    liger = ("  liger_kernels: [false, true]    # Liger's fused kernels (liger-kernel is installed): probed too\n"
             if not on_cpu and _liger_has_kernels_for(path_or_name) else "")
    stem = source.rsplit("/", 1)[-1] if source != str(path.resolve()) else path.stem
    name = name or f"{model.rsplit('/', 1)[-1]}-{stem}".lower().replace(".", "-")
    field_lines = "".join(f"  {k}: {_yaml(v)}\n" for k, v in fields.items())
    return f"""# Written by `llmtune init`; check it with `llmtune validate`, run it with `llmtune search`.
# The search space follows published LoRA priors: see the comments on each setting.
name: {_yaml(name)}
model:
  name: {_yaml(model)}
data:
  source: {_yaml(source)}
  format: {fmt:<20}# guessed from the first row: {seen}
{field_lines}  max_eval_examples: 100         # every trial is scored on the same eval examples
  eval_max_length: {seq}
train:
  budget: {{examples: {examples}}}  # {budget_note}
  eval_points: 4                 # a diverging trial stops at the next of these
  lr_scheduler: cosine
search:
  # LoRA's best learning rate x alpha shrinks with the model's width (llmtune/study/priors.py);
  # {lr_why}; the search tries it and 3x it first. About 10x it diverges: the range stops below.
  learning_rate: {{low: {lr_low:g}, high: {lr_high:g}, log: true}}
  # With alpha fixed the best learning rate barely moves with the rank, so the rank is searched alone,
  # around the rank for the model's size.
  lora_r: {_yaml(ranks)}
  lora_alpha: {LORA_ALPHA}
  lora_dropout: 0.05
  # All linear layers beat attention-only at equal parameters; both are here to show it on your data.
  lora_target_modules: {_yaml(TARGETS)}
  sequence_len: {seq}              # ~90% of the sampled rows fit (about {CHARS_PER_TOKEN} characters a token)
  batch_size: {BATCH_SIZE}                 # examples per optimizer step (the global batch: a learning setting)
  # Execution settings: they change memory and speed, not what is learned, so each is probed for a few
  # steps per configuration (study.execution: probe), not searched with full trials.
  micro_batch_size: [4, 8]
  gradient_checkpointing: [false, true]
{liger}  # {quant_why}
  quantization: {_yaml(quant if len(quant) > 1 else quant[0])}
objectives:
  eval_loss: minimize
  peak_memory_gb: minimize
  # Scored on the adapter's answers to eval rows, and what the base knew (README: Quality on generations):
  # exact_match: maximize
  # forgetting: minimize         # loss increase over the base on general text (the base's own answers)
  # my_score: {{metric: "mypkg.metrics:score", direction: maximize}}
study:
  sampler: auto                  # known-good configurations first, then multivariate TPE
  n_trials: 16
output_dir: {_yaml(f"runs/{name}")}
"""
