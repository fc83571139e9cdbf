"""The recipe: a typed, validated description of one tuning job.

A recipe is YAML with the sections ``model``, ``data``, ``train``, ``measure``, ``search``,
``objectives``, ``constraints``, ``study``, ``select``, ``output_dir`` and ``hub``. It is checked once,
here, and every problem is reported together (field path, bad value, fix) in one `RecipeError`.

Every setting that *can* be searched lives in ``search``; each is either a fixed value, a list of
choices, or a range ``{low, high, log?, step?}`` (see `llmtune.config.space`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmtune.config.problems import did_you_mean, fmt, one_of
from llmtune.config.space import PARAMS, SearchSpace, check_search
from llmtune.errors import Problem, RecipeError
from llmtune.harness.optimizers import OPTIMIZERS
from llmtune.harness.trackers import TRACKERS
from llmtune.study.pruners import PRUNERS, make_pruner
from llmtune.study.samplers import SAMPLER_CHOICES, SAMPLERS

# ------------------------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    name: str = field(metadata={"help": "Hub name or local path of the base model; 'llmtune/tiny' is the offline demo model."})
    dtype: str = field(default="auto", metadata={"help": "Weights/compute dtype: auto (bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU), bfloat16, float16, float32."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the Hub repository."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2."})


@dataclass
class DataConfig:
    source: str = field(metadata={"help": "Local JSON/JSONL/CSV/parquet file or folder, a Hub dataset name, or 'llmtune/tiny-tasks'."})
    format: str = field(default="instruction", metadata={"help": "text (one field of plain text), instruction (instruction/input/output) or chat (a list of messages rendered with the tokenizer's chat template)."})
    eval_source: str | None = field(default=None, metadata={"help": "Separate eval data; when unset, eval_fraction of the training data is held out."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Share held out for eval when eval_source is unset."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/eval split."})
    train_split: str = field(default="train", metadata={"help": "Split name for Hub datasets / data folders."})
    eval_split: str | None = field(default=None, metadata={"help": "Eval split name when the source has one (e.g. 'test')."})
    text_field: str = field(default="text", metadata={"help": "Field holding the text (format: text)."})
    instruction_field: str = field(default="instruction", metadata={"help": "Field of the instruction (format: instruction)."})
    input_field: str = field(default="input", metadata={"help": "Field of the optional input (format: instruction)."})
    output_field: str = field(default="output", metadata={"help": "Field of the answer (format: instruction)."})
    messages_field: str = field(default="messages", metadata={"help": "Field of the message list (format: chat)."})
    train_on: str = field(default="completions", metadata={"help": "completions: loss on answers only; all: loss on every token."})
    eval_max_length: int = field(default=512, metadata={"help": "Eval examples are cut to this many tokens for every trial, whatever its sequence_len, so eval losses compare."})
    max_eval_examples: int | None = field(default=200, metadata={"help": "Cap on eval examples (the same ones for every trial)."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Cap on training examples."})


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
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro batches per optimizer step."})
    lr_scheduler: str = field(default="cosine", metadata={"help": "linear, cosine, constant or constant_with_warmup."})
    optimizer: str = field(default="adamw_torch", metadata={"help": "adamw_torch, adamw_8bit, paged_adamw_8bit (8-bit ones need a CUDA bitsandbytes) or sgd."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    seed: int = field(default=42, metadata={"help": "Seed of LoRA init, dropout and data order."})
    eval_points: int = field(default=4, metadata={"help": "Evaluations spread evenly over the budget (the last at the end); the pruner may add more."})
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of evaluation (does not change eval loss)."})
    device: str = field(default="auto", metadata={"help": "auto (CUDA if present), cuda or cpu."})
    report_to: list[str] = field(default_factory=list, metadata={"help": "Trackers for training logs: tensorboard, mlflow, wandb (off by default)."})


@dataclass
class MeasureConfig:
    latency_prompts: int = field(default=4, metadata={"help": "Eval prompts used to time generation (the same for every trial)."})
    max_new_tokens: int = field(default=32, metadata={"help": "Tokens generated per prompt when timing latency."})
    latency: bool = field(default=True, metadata={"help": "Measure generation latency after training."})


@dataclass
class StudyConfig:
    sampler: str = field(default="auto", metadata={"help": "auto, tpe, nsga2, gp, random, grid or cmaes."})
    n_trials: int | None = field(default=20, metadata={"help": "Trials to run (in total, across workers)."})
    timeout: float | None = field(default=None, metadata={"help": "Stop starting trials after this many seconds."})
    trial_timeout: float = field(default=3600.0, metadata={"help": "A trial running longer is killed and recorded as timed out."})
    pruner: str = field(default="none", metadata={"help": "none, asha or hyperband."})
    pruner_settings: dict[str, Any] = field(default_factory=dict, metadata={"help": "Settings of the pruner, e.g. {eta: 3, min_fraction: 0.111}."})
    storage: str | None = field(default=None, metadata={"help": "Optuna storage URL; default an SQLite file in output_dir. May be '${ENV_VAR}'."})
    study_name: str | None = field(default=None, metadata={"help": "Study name in the storage; default the recipe's name."})
    seed: int = field(default=0, metadata={"help": "Sampler seed."})
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


# Objective names, their direction and unit. The harness measures each of these itself.
METRICS: dict[str, tuple[str, str]] = {
    "eval_loss": ("minimize", "mean token cross-entropy on the fixed eval set"),
    "peak_memory_gb": ("minimize", "peak training memory, GiB (CUDA reserved / NVML on GPU, RSS on CPU)"),
    "train_throughput": ("maximize", "real (non-padding) training tokens per second"),
    "latency_ms": ("minimize", "ms per generated token (greedy, with the adapter)"),
    "ttft_ms": ("minimize", "time to first token, ms"),
    "generation_memory_gb": ("minimize", "peak memory during generation, GiB"),
    "trainable_params": ("minimize", "LoRA parameter count"),
    "train_time_s": ("minimize", "seconds spent in training steps"),
}
METRIC_ALIASES = {"peak_memory": "peak_memory_gb", "latency": "latency_ms", "throughput": "train_throughput",
                  "memory": "peak_memory_gb", "loss": "eval_loss"}
DIRECTIONS = ("minimize", "maximize")


@dataclass
class Recipe:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    search: dict[str, Any] = field(default_factory=dict, metadata={"help": "The search space: each tunable setting fixed, a list of choices or a range."})
    objectives: dict[str, str] = field(default_factory=lambda: {"eval_loss": "minimize"}, metadata={"help": "Metric -> minimize/maximize, in order."})
    constraints: dict[str, dict[str, float]] = field(default_factory=dict, metadata={"help": "Metric -> {max: x} and/or {min: y}; violating trials are infeasible."})
    study: StudyConfig = field(default_factory=StudyConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    output_dir: str = field(default="", metadata={"help": "Where trials, the study and the chosen adapter go; default runs/<name>."})
    hub: HubConfig = field(default_factory=HubConfig)
    name: str = field(default="llmtune", metadata={"help": "Name of the job (default study name)."})
    description: str = field(default="", metadata={"help": "Free text."})

    # -- derived -------------------------------------------------------------------------------
    @property
    def space(self) -> SearchSpace:
        return SearchSpace.from_recipe(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that makes trials comparable (all but study/select/hub/output)."""
        d = self.to_dict()
        for k in ("study", "select", "hub", "output_dir", "description", "name"):
            d.pop(k, None)
        d["train"].pop("report_to", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


RECIPE_KEYS = tuple(f.name for f in dataclasses.fields(Recipe))
SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "train": TrainConfig, "measure": MeasureConfig,
    "study": StudyConfig, "select": SelectConfig, "hub": HubConfig,
}

CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("auto", "bfloat16", "float16", "float32"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "data.format": ("text", "instruction", "chat"),
    "data.train_on": ("completions", "all"),
    "train.lr_scheduler": ("linear", "cosine", "constant", "constant_with_warmup"),
    "train.optimizer": tuple(OPTIMIZERS),
    "train.device": ("auto", "cuda", "cpu"),
    "study.sampler": SAMPLER_CHOICES,
    "study.pruner": tuple(PRUNERS),
    "study.memory_gate": ("auto", "on", "off"),
}

# ----------------------------------------------------------------------------------------- building


class _Checker:
    """Collects problems while turning plain YAML data into the typed recipe."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def build(self, cls: type, data: Any, path: str) -> Any:
        """Build dataclass `cls` from mapping `data`; unknown keys and bad types become problems."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.add(path, f"expected a mapping of settings, got {fmt(data)}")
            data = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            sub = f"{path}.{key}" if path else str(key)
            if key not in fields:
                self.add(sub, f"unknown setting{did_you_mean(str(key), list(fields))} (known: {', '.join(fields)})")
                continue
            kwargs[key] = self.convert(fields[key], value, sub)
        for name, f in fields.items():
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and name not in kwargs:
                sub = f"{path}.{name}" if path else name
                if any(str(f.type) == c.__name__ for c in SECTIONS.values()):
                    kwargs[name] = self.convert(f, {}, sub)  # reports the section's own required fields
                else:
                    self.add(sub, f"is required: {f.metadata.get('help', '')}")
                    kwargs[name] = None
        return cls(**kwargs)

    def convert(self, f: dataclasses.Field, value: Any, path: str) -> Any:
        t = str(f.type)
        if t == "Budget":
            return self.build(Budget, value, path)
        for section_cls in SECTIONS.values():
            if t == section_cls.__name__:
                return self.build(section_cls, value, path)
        if value is None and "None" in t:
            return None
        if t.startswith("bool"):
            if isinstance(value, bool):
                return value
            self.add(path, f"{fmt(value)} is not true or false")
        elif t.startswith("int"):
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            self.add(path, f"{fmt(value)} is not a whole number")
        elif t.startswith("float"):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)  # YAML reads '1e-4' without a dot as a string
                except ValueError:
                    pass
            self.add(path, f"{fmt(value)} is not a number")
        elif t.startswith("str"):
            if isinstance(value, str):
                return value
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "name" in path:
                return str(value)
            self.add(path, f"{fmt(value)} is not text")
        elif t.startswith("list"):
            if isinstance(value, str):
                return [value]
            if isinstance(value, list):
                return value
            self.add(path, f"{fmt(value)} is not a list")
        elif t.startswith("dict"):
            if isinstance(value, dict):
                return value
            self.add(path, f"{fmt(value)} is not a mapping")
        else:  # pragma: no cover - a field type this builder does not know is a programming error
            raise TypeError(f"recipe field {path} has unsupported type {t}")
        return f.default if f.default is not dataclasses.MISSING else None


def _check_values(recipe: Recipe, ck: _Checker) -> None:
    """Checks that need more than a type: choices, ranges, cross-field rules."""
    for dotted, options in CHOICES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(recipe, section), name)
        if value is not None and value not in options:
            ck.add(dotted, one_of(value, list(options)))

    m, d, t, s = recipe.model, recipe.data, recipe.train, recipe.study
    if isinstance(m.name, str) and not m.name.strip():
        ck.add("model.name", "is empty; give a Hub name (org/model) or a local path")
    if not (0.0 < d.eval_fraction < 1.0) and d.eval_source is None:
        ck.add("data.eval_fraction", f"{d.eval_fraction} must be between 0 and 1 (exclusive); or set data.eval_source")
    if d.eval_max_length is not None and d.eval_max_length < 8:
        ck.add("data.eval_max_length", f"{d.eval_max_length} is too short; use at least 8 tokens (e.g. 512)")
    for name in ("max_eval_examples", "max_train_examples"):
        v = getattr(d, name)
        if v is not None and v < 1:
            ck.add(f"data.{name}", f"{v} must be at least 1, or null for no cap")
    if d.format == "text" and d.train_on == "completions":
        # Plain text has no completion part: loss on everything is the only meaning.
        d.train_on = "all"

    given = [k for k in ("tokens", "examples", "epochs") if getattr(t.budget, k) is not None]
    if len(given) != 1:
        ck.add("train.budget", f"set exactly one of tokens, examples, epochs (got {', '.join(given) or 'none'}), e.g. budget: {{examples: 2000}}")
    else:
        amount = getattr(t.budget, given[0])
        if amount is None or amount <= 0:
            ck.add(f"train.budget.{given[0]}", f"{amount} must be positive")
    for name, low in (("gradient_accumulation_steps", 1), ("eval_points", 1), ("eval_batch_size", 1)):
        v = getattr(t, name)
        if v is not None and v < low:
            ck.add(f"train.{name}", f"{v} must be at least {low}")
    if t.weight_decay is not None and t.weight_decay < 0:
        ck.add("train.weight_decay", f"{t.weight_decay} must be >= 0")
    if t.max_grad_norm is not None and t.max_grad_norm < 0:
        ck.add("train.max_grad_norm", f"{t.max_grad_norm} must be >= 0 (0 disables clipping)")
    for i, tracker in enumerate(t.report_to or []):
        if tracker not in TRACKERS:
            ck.add(f"train.report_to[{i}]", one_of(tracker, list(TRACKERS)))

    if recipe.measure.latency_prompts is not None and recipe.measure.latency_prompts < 1:
        ck.add("measure.latency_prompts", f"{recipe.measure.latency_prompts} must be at least 1")
    if recipe.measure.max_new_tokens is not None and recipe.measure.max_new_tokens < 2:
        ck.add("measure.max_new_tokens", f"{recipe.measure.max_new_tokens} must be at least 2 (latency per token needs two)")

    if s.n_trials is not None and s.n_trials < 1:
        ck.add("study.n_trials", f"{s.n_trials} must be at least 1, or null to run until study.timeout")
    if s.n_trials is None and s.timeout is None:
        ck.add("study.n_trials", "set n_trials or timeout (or both), or the search never ends")
    for name in ("timeout", "trial_timeout"):
        v = getattr(s, name)
        if v is not None and v <= 0:
            ck.add(f"study.{name}", f"{v} must be a positive number of seconds")

    if s.pruner in CHOICES["study.pruner"] and isinstance(s.pruner_settings, dict):
        try:
            make_pruner(s.pruner, **s.pruner_settings)
        except (ValueError, TypeError) as e:
            ck.add("study.pruner_settings", str(e))

    _check_objectives(recipe, ck)

    search_problems = check_search(recipe.search, recipe)
    ck.problems += search_problems
    kind = SAMPLERS.get(s.sampler)
    if kind is not None and not search_problems and isinstance(recipe.objectives, dict):
        why = kind.problem(SearchSpace.from_dict(recipe.search), len(recipe.objectives))
        if why:
            ck.add("study.sampler", why)


def _canonical_metric(name: str) -> str:
    return METRIC_ALIASES.get(name, name)


def _check_objectives(recipe: Recipe, ck: _Checker) -> None:
    raw = recipe.objectives
    objectives: dict[str, str] = {}
    if isinstance(raw, list):  # a list of names takes each metric's natural direction
        raw = {str(n): None for n in raw}
    if not isinstance(raw, dict) or not raw:
        ck.add("objectives", f"{fmt(raw)} must name at least one metric, e.g. {{eval_loss: minimize}}")
        raw = {}
    for name, direction in raw.items():
        canon = _canonical_metric(str(name))
        if canon not in METRICS:
            ck.add(f"objectives.{name}", f"unknown metric{did_you_mean(str(name), list(METRICS) + list(METRIC_ALIASES))} (known: {', '.join(METRICS)})")
            continue
        natural = METRICS[canon][0]
        direction = natural if direction is None else direction
        if direction not in DIRECTIONS:
            ck.add(f"objectives.{name}", one_of(direction, list(DIRECTIONS)))
            continue
        if canon in objectives:
            ck.add(f"objectives.{name}", f"names {canon} twice")
        objectives[canon] = direction
    recipe.objectives = objectives

    constraints: dict[str, dict[str, float]] = {}
    if not isinstance(recipe.constraints, dict):
        ck.add("constraints", f"{fmt(recipe.constraints)} must be a mapping like {{peak_memory_gb: {{max: 22}}}}")
    else:
        for name, bound in recipe.constraints.items():
            canon = _canonical_metric(str(name))
            path = f"constraints.{name}"
            if canon not in METRICS:
                ck.add(path, f"unknown metric{did_you_mean(str(name), list(METRICS))} (known: {', '.join(METRICS)})")
                continue
            if isinstance(bound, (int, float)) and not isinstance(bound, bool):
                bound = {"max": bound}  # a bare number reads as an upper limit, the common case
            if not isinstance(bound, dict) or not bound or set(bound) - {"min", "max"}:
                ck.add(path, f"{fmt(bound)} must be {{max: x}} and/or {{min: y}}")
                continue
            clean: dict[str, float] = {}
            for k, v in bound.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    ck.add(f"{path}.{k}", f"{fmt(v)} is not a number")
                else:
                    clean[k] = float(v)
            if "min" in clean and "max" in clean and clean["min"] > clean["max"]:
                ck.add(path, f"min {clean['min']} is above max {clean['max']}")
            constraints[canon] = clean
    recipe.constraints = constraints

    by = recipe.select.by or (next(iter(objectives)) if objectives else "")
    if by and by != "knee":
        by = _canonical_metric(by)
        if by not in objectives:
            ck.add("select.by", f"{fmt(recipe.select.by)} is not an objective of this recipe; use one of {', '.join(objectives)} or knee")
    recipe.select.by = by
    for name in recipe.select.weights:
        if _canonical_metric(name) not in objectives:
            ck.add(f"select.weights.{name}", f"is not an objective; use one of {', '.join(objectives)}")


def _expand_env(value: Any) -> Any:
    """Expand ${VAR} in strings so secrets (e.g. storage passwords) can stay out of the file."""
    if isinstance(value, str):
        return os.path.expandvars(value)
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    return value


def recipe_from_dict(data: Any, source: str | None = None) -> Recipe:
    """Build and validate a recipe from plain data; raises `RecipeError` listing every problem."""
    ck = _Checker()
    if not isinstance(data, dict):
        raise RecipeError([Problem("", f"a recipe is a YAML mapping with sections model, data, search, ...; got {fmt(data)[:80]}")], source)
    data = dict(data)
    if isinstance(data.get("study"), dict) and isinstance(data["study"].get("storage"), str):
        data["study"] = {**data["study"], "storage": _expand_env(data["study"]["storage"])}
    if isinstance(data.get("objectives"), list):
        data["objectives"] = {str(n): None for n in data["objectives"]}
    recipe = ck.build(Recipe, data, "")
    _check_values(recipe, ck)
    if not recipe.output_dir:
        recipe.output_dir = str(Path("runs") / (recipe.name or "llmtune"))
    if ck.problems:
        raise RecipeError(ck.problems, source)
    return recipe


def read_recipe_file(path: str | os.PathLike) -> Any:
    """A recipe file's YAML as plain data (its ``name`` defaults to the file's stem); not validated yet."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError([Problem("", f"recipe file {str(p)!r} not found")], str(p))
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RecipeError([Problem("", f"not valid YAML: {e}")], str(p)) from None
    if isinstance(data, dict) and "name" not in data:
        data["name"] = p.stem
    return data


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply ``key.path=value`` overrides, validate it all at once."""
    data = read_recipe_file(path)
    if overrides and isinstance(data, dict):
        data = apply_overrides(data, overrides, source=str(path))
    return recipe_from_dict(data, source=str(path))


# Settings that give the same thing two ways: fixing one drops the other from the space.
RIVALS = {"lora_alpha": "lora_alpha_ratio", "lora_alpha_ratio": "lora_alpha",
          "warmup_steps": "warmup_ratio", "warmup_ratio": "warmup_steps"}


def set_search_values(data: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Fix searchable settings (``{"lora_r": 8}``) in a recipe mapping: each replaces what the recipe's
    ``search`` section says of it (and of its rival, e.g. lora_alpha_ratio for lora_alpha). The values
    are checked when the recipe is built, like any recipe value."""
    data = json.loads(json.dumps(data, default=str))  # deep copy
    search: dict[str, Any] = data["search"] if isinstance(data.get("search"), dict) else {}
    for key, value in values.items():
        if RIVALS.get(key) in search and key in PARAMS:
            search.pop(RIVALS[key])
        search[key] = value
    data["search"] = search
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str | None = None) -> dict[str, Any]:
    """Apply ``key.path=value`` strings (value parsed as YAML) to a recipe mapping.

    A bare searchable setting (``lora_r=8``) means ``search.lora_r=8``: it fixes that setting, on every
    command alike."""
    problems = []
    data = json.loads(json.dumps(data, default=str))  # deep copy
    for item in overrides:
        if "=" not in item:
            problems.append(Problem(item, "an override is key=value, e.g. lora_r=16 or train.budget.examples=500"))
            continue
        key, _, raw = item.partition("=")
        key = key.strip()
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        bare = key.removeprefix("search.")
        if "." not in bare and (bare in PARAMS or key.startswith("search.")):
            data = set_search_values(data, {bare: value})
            continue
        if "." not in key and key not in RECIPE_KEYS:
            known = list(PARAMS) + list(RECIPE_KEYS)
            problems.append(Problem(key, f"is neither a searchable setting nor a recipe section{did_you_mean(key, known)}; "
                                         "give a setting (lora_r=8) or a dotted recipe path (train.budget.examples=500)"))
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    if problems:
        raise RecipeError(problems, source)
    return data


def field_help(cls: type) -> dict[str, str]:
    """Help text of each field of a recipe section (for docs and `llmtune validate --explain`)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
