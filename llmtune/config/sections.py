"""The recipe's sections: one dataclass per YAML section (model, data, train, measure, study, select, hub),
each field with its default and a help string. `llmtune.config.recipe` builds them from YAML and checks them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    name: str = field(metadata={"help": "Hub name or local path of the base model; 'llmtune/tiny' is the offline demo model."})
    dtype: str = field(default="auto", metadata={"help": "Weights/compute dtype: auto (bf16 on GPUs that support it, else fp16 on GPU; on CPU bf16 for a bf16 checkpoint where the CPU has AMX/AVX512-BF16, else fp32), bfloat16, float16, float32."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the Hub repository."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    attn_implementation: str = field(default="auto", metadata={"help": "auto (sdpa where the model supports it, else eager), sdpa, eager or flash_attention_2."})


@dataclass
class DataConfig:
    source: str = field(metadata={"help": "Local JSON/JSONL/CSV/parquet file or folder, a Hub dataset name, or 'llmtune/tiny-tasks'."})
    format: str = field(default="instruction", metadata={"help": "text (one field of plain text), instruction (Alpaca: instruction, optional input, output) or chat (messages: a list of {role, content} with roles system/user/assistant/tool, rendered with the tokenizer's chat template; ShareGPT conversations of {from, value} and messages given as a JSON string are read too). Rows that miss what their format needs are dropped with a warning; more than half bad stops the search."})
    eval_source: str | None = field(default=None, metadata={"help": "Separate eval data; when unset, eval_fraction of the training data is held out."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Share held out for eval when eval_source is unset."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/eval split."})
    train_split: str = field(default="train", metadata={"help": "Split name for Hub datasets / data folders."})
    eval_split: str | None = field(default=None, metadata={"help": "Eval split name when the source has one (e.g. 'test')."})
    text_field: str = field(default="text", metadata={"help": "Field holding the text (format: text)."})
    instruction_field: str = field(default="instruction", metadata={"help": "Field of the instruction (format: instruction)."})
    input_field: str = field(default="input", metadata={"help": "Field of the optional input (format: instruction)."})
    output_field: str = field(default="output", metadata={"help": "Field of the answer (format: instruction)."})
    messages_field: str = field(default="messages", metadata={"help": "Field of the message list (format: chat); rows without it are read from 'conversations' (ShareGPT) while this is 'messages'."})
    train_on: str = field(default="completions", metadata={"help": "completions: loss on answers only; all: loss on every token."})
    eval_max_length: int = field(default=512, metadata={"help": "Eval examples are cut to this many tokens for every trial, whatever its sequence_len, so eval losses compare."})
    max_eval_examples: int | None = field(default=200, metadata={"help": "Cap on eval examples (the same ones for every trial)."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Cap on training examples."})
    reference_source: str | None = field(default=None, metadata={"help": "General text the forgetting metric is measured on: a .txt file (one passage a line) or .jsonl (a 'text' field a line). Unset: the base model's own greedy answers to llmtune's built-in general prompts."})


@dataclass
class Budget:
    tokens: int | None = field(default=None, metadata={"help": "Train on this many real (non-padding) tokens."})
    examples: int | None = field(default=None, metadata={"help": "Train on this many examples."})
    epochs: float | None = field(default=None, metadata={"help": "Train for this many passes over the training data."})

    @property
    def kind(self) -> str:
        return next(k for k in ("tokens", "examples", "epochs") if getattr(self, k) is not None)

    @property
    def amount(self) -> float:
        return float(getattr(self, self.kind))


@dataclass
class TrainConfig:
    budget: Budget = field(default_factory=lambda: Budget(examples=2000), metadata={"help": "How much data each trial trains on: exactly one of tokens, examples, epochs."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Sets the global batch (micro_batch_size x this, in examples) when search.batch_size is unset."})
    lr_scheduler: str = field(default="cosine", metadata={"help": "linear, cosine, constant or constant_with_warmup."})
    optimizer: str = field(default="adamw_torch", metadata={"help": "adamw_torch, adamw_8bit, paged_adamw_8bit (8-bit ones need a CUDA bitsandbytes) or sgd."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    seed: int = field(default=42, metadata={"help": "Seed of LoRA init, dropout and data order."})
    eval_points: int = field(default=4, metadata={"help": "Evaluations spread evenly over the budget (the last at the end); the pruner may add more."})
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of evaluation (does not change eval loss)."})
    device: str = field(default="auto", metadata={"help": "auto (CUDA if present), cuda or cpu."})
    threads: int | None = field(default=None, metadata={"help": "CPU threads of each trial process; default: the cores this process may use, minus one for the search itself, shared by the trials that run at once (at least 1). LLMTUNE_THREADS overrides it."})
    report_to: list[str] = field(default_factory=list, metadata={"help": "Trackers for training logs: tensorboard, mlflow, wandb (off by default)."})


@dataclass
class MeasureConfig:
    latency_prompts: int = field(default=4, metadata={"help": "Eval prompts used to time generation (the same for every trial)."})
    max_new_tokens: int = field(default=32, metadata={"help": "Tokens generated per prompt when timing latency, and at most per answer when scoring generations (exact_match, rouge_l, a user's metric...)."})
    latency: bool = field(default=True, metadata={"help": "Measure generation latency after training (latency_ms, ttft_ms, generation_memory_gb: an objective or constraint on them needs it)."})
    generation_examples: int | None = field(default=64, metadata={"help": "Eval rows each trial answers (greedy, with the adapter) when an objective or constraint is measured on generations: a fixed subset drawn with data.split_seed, the same for every trial; null: every eval row."})
    metrics: dict[str, str] = field(default_factory=dict, metadata={"help": "User metrics on generations, name -> 'module:function' (or 'path/to/file.py:function'); filled from objectives written as {my_score: {metric: 'mypkg.metrics:score', direction: maximize}}. The function takes (predictions, references, rows) and returns a float or a dict of floats."})


@dataclass
class StudyConfig:
    sampler: str = field(default="auto", metadata={"help": "auto, tpe, nsga2, gp, random, grid or cmaes."})
    n_trials: int | None = field(default=20, metadata={"help": "Trials to run (in total, across workers)."})
    timeout: float | None = field(default=None, metadata={"help": "Stop starting trials after this many seconds."})
    trial_timeout: float = field(default=3600.0, metadata={"help": "A trial running longer is killed and recorded as timed out."})
    pruner: str = field(default="none", metadata={"help": "none, asha or hyperband."})
    pruner_settings: dict[str, Any] = field(default_factory=dict, metadata={"help": "Settings of the pruner, e.g. {eta: 3, min_fraction: 0.111}."})
    storage: str | None = field(default=None, metadata={"help": "Optuna storage URL; default an SQLite file in output_dir. May be '${ENV_VAR}'."})
    study_name: str | None = field(default=None, metadata={"help": "Study name in the storage; default the recipe's name. A plain name (it names a folder of PBT states): no / or .., not empty."})
    seed: int = field(default=0, metadata={"help": "Sampler seed."})
    strategy: str = field(default="search", metadata={"help": "search: the sampler proposes trials (and the pruner stops weak ones); pbt: population-based training, a population trained in segments whose worst members copy the best and perturb their learning rate, warmup or dropout (see pbt_settings)."})
    pbt_settings: dict[str, Any] = field(default_factory=dict, metadata={"help": "Settings of strategy pbt: population, interval (fraction of the budget per segment), quantile, perturb, factors, resample_probability, checkpoint_dir."})
    execution: str = field(default="probe", metadata={"help": "How execution settings searched as choices (sample_packing, micro_batch_size, gradient_checkpointing, liger_kernels) are chosen: probe (each learning configuration trains once, its execution variants are measured by short probes, every pair is recorded) or search (sampled like any setting, a full trial each)."})
    memory_gate: str = field(default="auto", metadata={"help": "Skip configs whose predicted peak GPU memory exceeds constraints.peak_memory_gb.max: auto (when trials run on a GPU), on, off."})


@dataclass
class SelectConfig:
    by: str = field(default="", metadata={"help": "Which Pareto trial is 'the best': an objective name (its best feasible value) or knee (closest to the ideal point after scaling each objective to [0, 1]). Default: the first objective."})
    weights: dict[str, float] = field(default_factory=dict, metadata={"help": "Objective weights for knee."})


@dataclass
class HubConfig:
    repo_id: str | None = field(default=None, metadata={"help": "Hub repository to push the chosen adapter to (user/name)."})
    private: bool = field(default=True, metadata={"help": "Create the repository private."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to."})


# The recipe's sections by their YAML key.
SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "train": TrainConfig, "measure": MeasureConfig,
    "study": StudyConfig, "select": SelectConfig, "hub": HubConfig,
}

