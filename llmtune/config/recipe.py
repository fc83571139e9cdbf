"""The recipe: a typed, validated description of one tuning job.

A recipe is YAML with the sections ``model``, ``data``, ``train``, ``measure``, ``search``,
``objectives``, ``constraints``, ``study``, ``select``, ``output_dir`` and ``hub``. It is checked once,
here, and every problem is reported together (field path, bad value, fix) in one `RecipeError`.

Every setting that *can* be searched lives in ``search``; each is either a fixed value, a list of
choices, or a range ``{low, high, log?, step?}`` (see `llmtune.config.space`). The sections' dataclasses
are in `llmtune.config.sections`; the metrics that objectives and constraints name, and their checks, in
`llmtune.config.objectives`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmtune.config.choices import (
    OPTIMIZER_NAMES,
    PRUNER_SETTINGS,
    SAMPLER_CHOICES,
    SAMPLER_LIMITS,
    STRATEGIES,
    TRACKER_NAMES,
    sampler_problem,
)
from llmtune.config.objectives import TASK_METRICS, check_objectives
from llmtune.config.pbt_settings import check_pbt
from llmtune.config.problems import did_you_mean, fmt, one_of
from llmtune.config.pruner_settings import check_pruner_settings
from llmtune.config.recipe_file import read_recipe_file
from llmtune.config.sections import (
    SECTIONS,
    Budget,
    DataConfig,
    HubConfig,
    MeasureConfig,
    ModelConfig,
    SelectConfig,
    StudyConfig,
    TrainConfig,
)
from llmtune.config.space import PARAMS, Range, SearchSpace, check_search
from llmtune.config.values import coerce
from llmtune.errors import Problem, RecipeError


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
        """The search space, built and checked once per search section (rebuilt if `search` or the
        accumulation changes). Treat it as read-only: derived spaces copy it (`probes.learning_space`)."""
        try:
            key = json.dumps([self.search, self.train.gradient_accumulation_steps], sort_keys=True, default=str)
        except (TypeError, ValueError):  # not serialisable: no cache
            return SearchSpace.from_recipe(self)
        cached = self.__dict__.get("_space")
        if cached is None or cached[0] != key:
            cached = (key, SearchSpace.from_recipe(self))
            self.__dict__["_space"] = cached
        return cached[1]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that makes trials comparable (all but study/select/hub/output)."""
        d = self.to_dict()
        for k in ("study", "select", "hub", "output_dir", "description", "name"):
            d.pop(k, None)
        for execution in ("report_to", "threads"):  # how a trial runs, not what it learns
            d["train"].pop(execution, None)
        # Settings of the metrics on generations count only where they are used, so a study made before they
        # existed keeps its fingerprint.
        if not d["measure"].get("metrics"):
            d["measure"].pop("metrics", None)
            if not (set(self.objectives) | set(self.constraints)) & set(TASK_METRICS):
                d["measure"].pop("generation_examples", None)
        if d["data"].get("reference_source") is None:
            d["data"].pop("reference_source", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


RECIPE_KEYS = tuple(f.name for f in dataclasses.fields(Recipe))
BUDGET_KINDS = tuple(f.name for f in dataclasses.fields(Budget))

CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("auto", "bfloat16", "float16", "float32"),
    "model.attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
    "data.format": ("text", "instruction", "chat"),
    "data.train_on": ("completions", "all"),
    "train.lr_scheduler": ("linear", "cosine", "constant", "constant_with_warmup"),
    "train.optimizer": OPTIMIZER_NAMES,
    "train.device": ("auto", "cuda", "cpu"),
    "study.sampler": SAMPLER_CHOICES,
    "study.pruner": tuple(PRUNER_SETTINGS),
    "study.memory_gate": ("auto", "on", "off"),
    "study.strategy": STRATEGIES,
    "study.execution": ("probe", "search"),
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

    def convert(self, f: dataclasses.Field[Any], value: Any, path: str) -> Any:
        t = str(f.type)
        if t == "Budget":
            return self.build(Budget, value, path)
        for section_cls in SECTIONS.values():
            if t == section_cls.__name__:
                return self.build(section_cls, value, path)
        if value is None and "None" in t:
            return None
        kind = next((k for k in (bool, int, float, str) if t.startswith(k.__name__)), None)
        if kind is not None:
            if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool) and "name" in path:
                return str(value)
            like = f.default if kind is float else None
            value, why = coerce(value, kind, like)
            if why is None:
                return value
            self.add(path, why)
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
    if isinstance(d.source, str) and not d.source.strip():
        ck.add("data.source", "is empty; give a JSONL/JSON/CSV/parquet file, a folder of split files, a Hub dataset "
                              "name or llmtune/tiny-tasks")
    if isinstance(d.eval_source, str) and not d.eval_source.strip():
        ck.add("data.eval_source", "is empty; give an eval file, or leave it out (null) to hold out data.eval_fraction")
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
    for name, low in (("gradient_accumulation_steps", 1), ("eval_points", 1), ("eval_batch_size", 1), ("threads", 1)):
        v = getattr(t, name)
        if v is not None and v < low:
            ck.add(f"train.{name}", f"{v} must be at least {low}")
        elif v is not None and v > 2**20 and name != "threads":
            ck.add(f"train.{name}", f"{v} is too large: at most {2**20:,}")
    if t.weight_decay is not None and not 0 <= t.weight_decay <= MAX_WEIGHT_DECAY:
        ck.add("train.weight_decay", f"{t.weight_decay} must be between 0 and {MAX_WEIGHT_DECAY:g} (AdamW's decoupled "
                                     "decay; 0.0 to 0.1 is usual)")
    for path, seed in (("train.seed", t.seed), ("study.seed", s.seed), ("data.split_seed", d.split_seed)):
        if isinstance(seed, int) and not 0 <= seed <= MAX_SEED:
            ck.add(path, f"{seed} must be between 0 and 2**32 - 1 ({MAX_SEED}), the seeds numpy and the samplers "
                         "take; e.g. 42")
    if t.threads is not None and t.threads > MAX_THREADS:
        ck.add("train.threads", f"{t.threads} is more threads than any machine gives one trial; use at most "
                                f"{MAX_THREADS}, or leave it out (the cores this process may use)")
    if t.max_grad_norm is not None and t.max_grad_norm < 0:
        ck.add("train.max_grad_norm", f"{t.max_grad_norm} must be >= 0 (0 disables clipping)")
    for i, tracker in enumerate(t.report_to or []):
        if tracker not in TRACKER_NAMES:
            ck.add(f"train.report_to[{i}]", one_of(tracker, list(TRACKER_NAMES)))

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

    for dotted, named in (("study.study_name", s.study_name), ("name", recipe.name)):
        why = unsafe_name(named) if isinstance(named, str) else None
        if why and (dotted == "study.study_name" or not s.study_name):  # the recipe's name is the default study name
            ck.add(dotted, why)
    _unexpanded_variables(recipe, ck)

    if s.pruner in PRUNER_SETTINGS and isinstance(s.pruner_settings, dict):
        for problem in check_pruner_settings(s.pruner, s.pruner_settings):
            ck.add("study.pruner_settings", problem)

    check_objectives(recipe, ck.add)

    search_problems = check_search(recipe.search, recipe)
    ck.problems += search_problems
    if s.strategy in STRATEGIES and isinstance(s.pbt_settings, dict) and not search_problems:
        ck.problems += check_pbt(recipe)
    if s.sampler in SAMPLER_LIMITS and not search_problems and isinstance(recipe.objectives, dict):
        space = SearchSpace.from_dict(recipe.search)
        why = sampler_problem(s.sampler, space, len(recipe.objectives))
        if why:
            ranges = [f"search.{n} {space.specs[n].describe()}" for n in space.searched
                      if isinstance(space.specs[n], Range) and not space.specs[n].step]  # type: ignore[union-attr]
            discrete_only = SAMPLER_LIMITS[s.sampler].discrete_only
            ck.add("study.sampler", why + (f" (here: {', '.join(ranges)})" if discrete_only and ranges else ""))


MAX_WEIGHT_DECAY = 1.0
MAX_SEED = 2**32 - 1
MAX_THREADS = 1024
MAX_NAME = 128  # characters of a study name (it names a folder under PBT's state)


def unsafe_name(name: str, flag: str = "") -> str | None:
    """Why ``name`` cannot name a study, or None. A study name becomes a folder (population-based training
    keeps each study's states in ``<checkpoint_dir>/<study name>``), so it must be one plain folder name:
    not empty, no ``/`` or ``\\``, not ``.`` or ``..``, no control characters."""
    fix = "give a plain name like my-study (letters, digits, - _ .)"
    shown = f"{fmt(name)}{f' ({flag})' if flag else ''}"
    if not name.strip():
        return f"{shown} is empty; {fix}"
    if "/" in name or "\\" in name or name.strip() in (".", "..") or any(ord(c) < 32 for c in name):
        return f"{shown} is not a plain name: a study's name becomes a folder, and this one would leave its parent; {fix}"
    if len(name) > MAX_NAME:
        return f"{shown} is {len(name)} characters; a study name becomes a folder: keep it under {MAX_NAME}"
    return None


_VARIABLE = re.compile(r"\$\{(\w+)\}|\$([A-Za-z_]\w*)")
# Recipe paths whose text is a path or a name: a ``$VAR`` there is taken as it is written.
_LITERAL_PATHS = ("model.name", "data.source", "data.eval_source", "output_dir")


def _unexpanded_variables(recipe: Recipe, ck: _Checker) -> None:
    """``$VAR`` where llmtune does not expand it: only study.storage expands ``${VAR}`` (`_expand_env`), so
    ``data.source: $DATA/x.jsonl`` would look for a folder named ``$DATA``. A path that exists as written is
    taken (a file may have a ``$`` in its name); an output_dir is about to be made, so it never is."""
    for dotted in _LITERAL_PATHS:
        section, _, name = dotted.rpartition(".")
        value = getattr(getattr(recipe, section) if section else recipe, name)
        if not isinstance(value, str) or not (found := _VARIABLE.search(value)):
            continue
        if dotted != "output_dir" and os.path.exists(os.path.expanduser(value)):
            continue
        var = found.group(1) or found.group(2)
        ck.add(dotted, f"{fmt(value)} holds ${var}, which llmtune does not expand here (only study.storage expands "
                       f"${{{var}}}); write the path out, or let the shell expand it: --set {dotted}=\"${var}...\"")


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
        names = [str(n) for n in data["objectives"]]
        for n in sorted({n for n in names if names.count(n) > 1}):
            ck.add(f"objectives.{n}", f"is named {names.count(n)} times in {fmt(data['objectives'])}; give each metric once")
        data["objectives"] = {n: None for n in names}
    recipe: Recipe = ck.build(Recipe, data, "")
    _check_values(recipe, ck)
    if not recipe.output_dir:
        recipe.output_dir = str(Path("runs") / (recipe.name or "llmtune"))
    if ck.problems:
        raise RecipeError(ck.problems, source)
    return recipe


def load_recipe(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Recipe:
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
    command alike. ``train.budget.epochs=2`` (or tokens, examples) replaces the recipe's budget, which is one
    amount."""
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
        if parts[:2] == ["train", "budget"] and len(parts) == 3 and parts[2] in BUDGET_KINDS:
            node.clear()  # a budget is one amount: setting epochs replaces the recipe's examples or tokens
        node[parts[-1]] = value
    if problems:
        raise RecipeError(problems, source)
    return data
