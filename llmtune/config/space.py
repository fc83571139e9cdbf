"""The search space: every tunable setting, fixed or searched, and how Optuna samples it.

In a recipe's ``search`` section each setting is one of
  - a fixed value:            ``lora_r: 16``
  - a list of choices:        ``lora_r: [8, 16, 32]``   (or ``{choices: [...]}``)
  - a range:                  ``learning_rate: {low: 1e-5, high: 1e-3, log: true}`` (``step`` optional)
Settings not named keep their defaults (`PARAMS`).

Each setting is of one of two kinds. Learning settings change what the model learns (learning rate,
LoRA shape, warmup, context length, the global batch ``batch_size``, quantization). Execution settings
(``execution=True``: sample packing, micro batch size, gradient checkpointing) change only how a step's
work is laid out: the learning curve is the same under each of them (`llmtune.harness.data.plan_batches`),
only memory and speed differ. Some settings only matter under others
(``bnb_4bit_quant_type`` only with 4-bit quantization): they are sampled only then, which keeps the
sampler from learning about values that changed nothing.
"""

from __future__ import annotations

import difflib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmtune.config.problems import did_you_mean, fmt, one_of
from llmtune.config.values import coerce, to_str
from llmtune.errors import Problem, RecipeError

if TYPE_CHECKING:  # pragma: no cover
    import optuna

    from llmtune.config.recipe import Recipe

# LoRA target presets by the names Llama-family models use; a comma list names modules directly.
TARGET_PRESETS: dict[str, list[str] | str] = {
    "qv": ["q_proj", "v_proj"],
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "all-linear": "all-linear",
}


def resolve_target_modules(value: str) -> list[str] | str:
    """A preset name or 'a,b,c' -> what peft's LoraConfig.target_modules takes."""
    if value in TARGET_PRESETS:
        preset = TARGET_PRESETS[value]
        return list(preset) if isinstance(preset, list) else preset
    return [m.strip() for m in value.split(",") if m.strip()]


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    default: Any
    help: str
    check: Callable[[Any], str | None] = lambda v: None  # returns what is wrong, or None
    choices: tuple[Any, ...] | None = None
    log: bool = False                                       # ranges are log-scaled unless told otherwise
    when: tuple[str, Any] | None = None                     # only sampled when another setting has this value
    execution: bool = False                                 # changes how the work is laid out, not what is learned


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be positive"


def _at_least(n: int, most: int = 2**31 - 1, why: str = "") -> Callable[[Any], str | None]:
    """At least ``n`` and at most ``most`` (by default int32's limit, past which torch fails deep in C++)."""
    def check(v: Any) -> str | None:
        if v < n:
            return f"must be at least {n}"
        return None if v <= most else f"is too large: at most {most:,}{why}"
    return check


def _positive_up_to(most: float, why: str) -> Callable[[Any], str | None]:
    return lambda v: "must be positive" if v <= 0 else None if v <= most else f"is too large: at most {most:g}{why}"


def _unit_interval(v: Any) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _targets(v: Any) -> str | None:
    if not isinstance(v, str) or not v.strip():
        return "must be a preset (" + ", ".join(TARGET_PRESETS) + ") or module names like 'q_proj,v_proj'"
    close = difflib.get_close_matches(v.strip(), list(TARGET_PRESETS), n=1, cutoff=0.8)
    if "," not in v and v not in TARGET_PRESETS and close:  # a typo of a preset, not a module name
        return f"is neither a preset ({', '.join(TARGET_PRESETS)}) nor a module name; did you mean '{close[0]}'?"
    return None  # module names are checked against the model itself at preflight (harness/targets.py)


PARAMS: dict[str, Param] = {p.name: p for p in [
    Param("learning_rate", float, 2e-4, "Peak learning rate.", _positive_up_to(10, " (LoRA learning rates are about 1e-5 to 1e-2)"), log=True),
    Param("lora_r", int, 16, "LoRA rank.", _at_least(1, 8192, " (ranks of 4 to 256 are usual)"), log=True),
    Param("lora_alpha", float, None, "LoRA alpha (absolute); leave unset to use lora_alpha_ratio * lora_r.",
          _positive_up_to(65536, " (alpha / r scales the adapter's output: 16 to 2 x lora_r is usual)")),
    Param("lora_alpha_ratio", float, 2.0, "LoRA alpha as a multiple of the rank.",
          _positive_up_to(1024, " (it scales the adapter's output: 1 to 4 is usual)")),
    Param("lora_dropout", float, 0.05, "Dropout on the LoRA input.", _unit_interval),
    Param("lora_target_modules", str, "all-linear", "Which linear layers get adapters: qv, attention, mlp, all-linear, or 'q_proj,v_proj'.", _targets),
    Param("use_rslora", bool, False, "Rank-stabilised LoRA scaling (alpha / sqrt(r))."),
    Param("warmup_ratio", float, 0.05, "Share of optimizer steps spent warming up.", _unit_interval),
    Param("warmup_steps", int, None, "Warmup in optimizer steps (instead of warmup_ratio).", _at_least(0)),
    Param("sequence_len", int, 512, "Training context length; longer examples are truncated.", _at_least(16, 2**20), log=True),
    Param("batch_size", int, None, "Examples per optimizer step (the global batch); unset: micro_batch_size x train.gradient_accumulation_steps.", _at_least(1, 2**20), log=True),
    Param("sample_packing", bool, False, "Pack several examples into each row, without attention across them.", execution=True),
    Param("quantization", str, "none", "Base weights: none (16/32-bit), 8bit or 4bit (QLoRA).", choices=("none", "8bit", "4bit")),
    Param("bnb_4bit_quant_type", str, "nf4", "4-bit data type.", choices=("nf4", "fp4"), when=("quantization", "4bit")),
    Param("bnb_4bit_use_double_quant", bool, True, "Quantize the 4-bit scales too.", when=("quantization", "4bit")),
    Param("gradient_checkpointing", bool, False, "Recompute activations in backward to save memory.", execution=True),
    Param("liger_kernels", bool, False, "Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE, and the loss fused with the output layer): the same arithmetic in fewer GPU kernels and less memory; CUDA only, pip install liger-kernel.", execution=True),
    Param("micro_batch_size", int, 4, "Rows per forward pass (examples, or packed rows); the global batch is batch_size.", _at_least(1, 2**20), log=True, execution=True),
]}


# Settings that may change from one segment of a run to the next (population-based training's explore,
# `llmtune.harness.resume`); every other setting shapes the adapter or the data plan and stays fixed.
PERTURBABLE = ("learning_rate", "lora_dropout", "warmup_ratio", "warmup_steps")


@dataclass(frozen=True)
class Fixed:
    value: Any

    def describe(self) -> str:
        return fmt(self.value)


@dataclass(frozen=True)
class Choice:
    options: tuple[Any, ...]

    def describe(self) -> str:
        return "{" + ", ".join(fmt(o) for o in self.options) + "}"


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool
    step: float | None
    is_int: bool

    def describe(self) -> str:
        scale = ", log" if self.log else ""
        step = f", step {self.step}" if self.step else ""
        return f"[{self.low}, {self.high}{scale}{step}]"


Spec = Fixed | Choice | Range


def _coerce(param: Param, value: Any) -> tuple[Any, str | None]:
    """Value in the parameter's type, or the reason it is not (`llmtune.config.values`)."""
    if value is None:
        return None, (None if param.default is None else "must not be empty")
    if isinstance(value, list) and param.name == "lora_target_modules":
        return ",".join(str(v) for v in value), None  # a list of module names inside {choices: [...]}
    if param.type is str:
        return to_str(value, meant="none" if param.name == "quantization" and value is False else "")
    return coerce(value, param.type, param.default)


def _check_value(param: Param, value: Any) -> str | None:
    value, why = _coerce(param, value)
    if why or value is None:
        return why
    if param.choices is not None and value not in param.choices:
        return one_of(value, [str(c) for c in param.choices])
    problem = param.check(value)
    return f"{fmt(value)} {problem}" if problem else None


def parse_spec(param: Param, raw: Any, path: str) -> tuple[Spec | None, list[Problem]]:
    """Turn one ``search`` entry into a Fixed / Choice / Range, collecting problems."""
    problems: list[Problem] = []
    if isinstance(raw, dict) and "choices" in raw:
        extra = set(raw) - {"choices"}
        if extra:
            problems.append(Problem(path, f"unknown keys {sorted(extra)} beside choices"))
        raw = raw["choices"]
        if not isinstance(raw, list):
            return None, problems + [Problem(path, "choices must be a list")]
    if isinstance(raw, list):
        if not raw:
            return None, [Problem(path, "an empty list of choices; give at least one value")]
        options = []
        for i, v in enumerate(raw):
            why = _check_value(param, v)
            if why:
                problems.append(Problem(f"{path}[{i}]", why))
            options.append(_coerce(param, v)[0])
        if len(set(map(str, options))) != len(options):
            problems.append(Problem(path, f"repeats a choice: {fmt(raw)}"))
        return (Choice(tuple(options)) if len(options) > 1 else Fixed(options[0])), problems
    if isinstance(raw, dict):
        keys = set(raw)
        if not {"low", "high"} <= keys or keys - {"low", "high", "log", "step"}:
            hint = did_you_mean(next(iter(keys - {"low", "high", "log", "step"}), ""), ["low", "high", "log", "step", "choices"])
            return None, [Problem(path, f"a range is {{low: a, high: b, log: true|false, step: s}} or {{choices: [...]}}; got keys {sorted(keys)}{hint}")]
        if param.type not in (int, float):
            return None, [Problem(path, f"{param.name} is {param.type.__name__}, so it takes a value or a list of choices, not a range")]
        low, why_low = _coerce(param, raw["low"])
        high, why_high = _coerce(param, raw["high"])
        for end, why in (("low", why_low), ("high", why_high)):
            if why:
                problems.append(Problem(f"{path}.{end}", why))
        if problems:
            return None, problems
        for end, v in (("low", low), ("high", high)):
            why = _check_value(param, v)
            if why:
                problems.append(Problem(f"{path}.{end}", why))
        log = raw.get("log", param.log and raw.get("step") is None)  # a step implies a linear grid
        if not isinstance(log, bool):
            problems.append(Problem(f"{path}.log", f"{fmt(log)} is not true or false"))
        if low >= high:
            problems.append(Problem(path, f"low {low} must be below high {high}"))
        if log and low <= 0:
            problems.append(Problem(path, f"a log range needs low > 0 (got {low}); set log: false"))
        step = raw.get("step")
        if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0):
            problems.append(Problem(f"{path}.step", f"{fmt(step)} must be a positive number"))
            step = None
        if step is not None and log:
            problems.append(Problem(path, "step and log cannot be used together (Optuna samples one or the other)"))
        return Range(low, high, bool(log), step, param.type is int), problems
    why = _check_value(param, raw)
    if why:
        return None, [Problem(path, why)]
    return Fixed(_coerce(param, raw)[0]), []


def check_search(search: Any, recipe: Recipe | None = None) -> list[Problem]:
    """Every problem in a ``search`` section (used by recipe validation)."""
    if search is None:
        return []
    if not isinstance(search, dict):
        return [Problem("search", f"{fmt(search)} must be a mapping of setting -> value, choices or range")]
    problems: list[Problem] = []
    for key, raw in search.items():
        path = f"search.{key}"
        if key not in PARAMS:
            problems.append(Problem(path, f"unknown setting{did_you_mean(str(key), list(PARAMS))} (searchable: {', '.join(PARAMS)})"))
            continue
        problems += parse_spec(PARAMS[key], raw, path)[1]
    if search.get("lora_alpha") is not None and "lora_alpha_ratio" in search:
        problems.append(Problem("search.lora_alpha", "give lora_alpha or lora_alpha_ratio, not both"))
    if search.get("warmup_steps") is not None and "warmup_ratio" in search:
        problems.append(Problem("search.warmup_steps", "give warmup_steps or warmup_ratio, not both"))
    return problems


def is_active(name: str, values: dict[str, Any]) -> bool:
    """Whether a setting takes part given the others' values (`Param.when`); a name llmtune does not train with
    (a replayed table's own choice, benchmarks/replay.py) always does."""
    param = PARAMS.get(name)
    when = param.when if param is not None else None
    return when is None or values.get(when[0]) == when[1]


@dataclass
class SearchSpace:
    specs: dict[str, Spec]

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> SearchSpace:
        space = cls.from_dict(recipe.search)
        if (recipe.search or {}).get("batch_size") is None:
            # The global batch is a learning setting: unset, it is the largest micro batch times the
            # accumulation, the same for every trial, so that micro_batch_size stays an execution setting.
            mbs = space.specs["micro_batch_size"]
            largest = mbs.value if isinstance(mbs, Fixed) else max(mbs.options) if isinstance(mbs, Choice) else mbs.high
            space.specs["batch_size"] = Fixed(int(largest) * recipe.train.gradient_accumulation_steps)
        return space

    @classmethod
    def from_dict(cls, search: dict[str, Any] | None) -> SearchSpace:
        problems = check_search(search or {})
        if problems:
            raise RecipeError(problems)
        specs: dict[str, Spec] = {name: Fixed(p.default) for name, p in PARAMS.items()}
        for key, raw in (search or {}).items():
            spec, _ = parse_spec(PARAMS[key], raw, f"search.{key}")
            assert spec is not None
            specs[key] = spec
        return cls(specs)

    @property
    def searched(self) -> list[str]:
        return [n for n, s in self.specs.items() if not isinstance(s, Fixed)]

    def _active(self, name: str, values: dict[str, Any]) -> bool:
        return is_active(name, values)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample one assignment; only searched, active settings become Optuna parameters."""
        values: dict[str, Any] = {}
        for name, spec in self.specs.items():
            if isinstance(spec, Fixed) or not self._active(name, values):
                values[name] = spec.value if isinstance(spec, Fixed) else PARAMS[name].default
            elif isinstance(spec, Choice):
                values[name] = trial.suggest_categorical(name, list(spec.options))
            elif spec.is_int:
                values[name] = trial.suggest_int(name, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
            else:
                values[name] = trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
        return values

    def default(self) -> dict[str, Any]:
        """A reasonable single assignment: midpoints of ranges (geometric when log), first choices."""
        values: dict[str, Any] = {}
        for name, spec in self.specs.items():
            if isinstance(spec, Fixed):
                values[name] = spec.value
            elif isinstance(spec, Choice):
                values[name] = spec.options[0]
            else:
                mid = math.sqrt(spec.low * spec.high) if spec.log else (spec.low + spec.high) / 2
                if spec.step:
                    mid = spec.low + round((mid - spec.low) / spec.step) * spec.step
                values[name] = int(round(mid)) if spec.is_int else mid
        return values

    def complete(self, params: dict[str, Any]) -> dict[str, Any]:
        """Fill an assignment of some searched settings with the fixed values and defaults."""
        middle = self.default()
        values: dict[str, Any] = {}
        for name, spec in self.specs.items():
            if name in params:
                values[name] = params[name]
            elif isinstance(spec, Fixed):
                values[name] = spec.value
            elif not self._active(name, values):
                values[name] = PARAMS[name].default
            else:
                values[name] = middle[name]
        return values

    def grid(self) -> dict[str, list[Any]] | None:
        """Every choice of a discrete space (for the grid sampler), or None when a float range exists."""
        grid: dict[str, list[Any]] = {}
        for name in self.searched:
            spec = self.specs[name]
            if isinstance(spec, Choice):
                grid[name] = list(spec.options)
            elif isinstance(spec, Range) and spec.is_int and spec.step:
                grid[name] = list(range(int(spec.low), int(spec.high) + 1, int(spec.step)))
            elif isinstance(spec, Range) and spec.step:
                n = int(round((spec.high - spec.low) / spec.step))
                grid[name] = [spec.low + i * spec.step for i in range(n + 1)]
            else:
                return None
        return grid

    def grid_size(self) -> int | None:
        grid = self.grid()
        return None if grid is None else math.prod(len(v) for v in grid.values())

    def grid_points(self) -> list[dict[str, Any]]:
        grid = self.grid() or {}
        names = list(grid)
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(grid[n] for n in names))]

    def signature(self) -> dict[str, str]:
        """What the space is, as text: stored in the study so a resumed search can check it."""
        return {name: spec.describe() for name, spec in self.specs.items()}


EXECUTION = tuple(name for name, p in PARAMS.items() if p.execution)


