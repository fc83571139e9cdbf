"""Known-good starting points for a new search, from the model, the budget and published LoRA findings.

A new study with `sampler: auto` runs these first (queued by the search loop's strategy), instead of
uniform random start-up trials; `llmtune init` centres the learning-rate range it writes on the same rule.

The rule (`lora_prior`), and where each part comes from:

- **The learning rate times alpha is what matters, and it shrinks with the model's width.** With peft's
  alpha / r scaling, LoRA's early training is independent of the rank at a fixed alpha, so its best
  learning rate is too (Schulman et al., "LoRA Without Regret", Thinking Machines Lab 2025); with
  rsLoRA's alpha / sqrt(r) the invariant is lr x alpha x sqrt(r). QLoRA (Dettmers et al. 2023, appendix)
  used lr 2e-4 with alpha 16 for LLaMA 7B/13B (hidden 4096/5120) and 1e-4 for 33B/65B (6656/8192): a
  product of 3.2e-3 at width 4096 falling about as 1/width, which is how learning rates scale with width
  in muP (Yang et al. 2022) and in GPT-3's sizes (Brown et al. 2020, table 2.1). So
  `lr x alpha = 3.2e-3 x 4096 / hidden_size`.
- **Short runs want more**: "about 10x full fine-tuning's learning rate, about 15x in very short runs"
  (Schulman et al.): x1.5 under `SHORT_RUN_STEPS` optimizer steps.
- **The second start is 3x the first**: the best learning rate is known to within a few times, and a
  run at 3x the product is still well short of divergence (which starts around 10x in llmtune's own
  SmolLM2-135M table, benchmarks/results/tabular_smollm2-*.csv).
- **All linear layers** (both papers), **alpha 32** where alpha itself is searched (Schulman et al.),
  and a **rank that grows with the model**: 16 below 1B parameters, 32 below 10B, 64 above (QLoRA's 64
  at 7B-65B; small models have less to adapt and train on small data, where a low rank loses nothing).

Where an objective is a cost (time, memory, size, latency), one more start is queued, second: the cheap end
of the front (`cheap_config`: the shortest context and the fewest adapted layers the space offers, and the
smallest rank where the adapter's size is an objective), which a sampler chasing the loss would reach only by
chance. `starting_points` gives the queue in order.

Without a readable model config the rule assumes a 7B-class model (hidden 4096).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llmtune.config.space import PARAMS, Choice, Fixed, Range, SearchSpace
from llmtune.study.samplers import active_params

REFERENCE_WIDTH = 4096          # LLaMA-7B's hidden size, where QLoRA's lr 2e-4 x alpha 16 was tuned
REFERENCE_PRODUCT = 2e-4 * 16   # lr x alpha there
SHORT_RUN_STEPS = 500           # fewer optimizer steps than this: a short run (x SHORT_RUN_FACTOR)
SHORT_RUN_FACTOR = 1.5
SECOND_FACTOR = 3.0             # the second start's learning rate over the first's
ALPHA = 32.0                    # where lora_alpha itself is searched
# Objectives that a smaller adapter makes better: where one is optimised, the cheap end is queued too.
COST_METRICS = frozenset({"peak_memory_gb", "train_time_s", "train_throughput", "trainable_params", "latency_ms",
                          "ttft_ms"})
# LoRA target presets from the fewest adapted layers to the most (harness/targets.PRESETS)
TARGETS_BY_SIZE = ("qv", "attention", "mlp", "all-linear")


@dataclass(frozen=True)
class ModelFacts:
    """What the priors know of the model and the run."""

    hidden_size: int
    parameters: float           # total, approximate
    steps: int | None = None    # optimizer steps of one trial, when the budget says


def facts_from_config(config: Any, steps: int | None = None) -> ModelFacts | None:
    """`ModelFacts` from a transformers config (its text config for a multimodal one), or None when it
    names no width. Parameters are counted from the shape (embeddings + 12 d^2 per layer, or the MLP's
    own size where the config gives it): enough to place the model in a size class."""
    text = getattr(config, "get_text_config", lambda: config)()
    width = next((getattr(text, k) for k in ("hidden_size", "n_embd", "d_model") if isinstance(getattr(text, k, None), int)), None)
    if not width:
        return None
    layers = next((getattr(text, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(getattr(text, k, None), int)), 0)
    vocab = getattr(text, "vocab_size", 0) or 0
    mlp = getattr(text, "intermediate_size", None) or 4 * width
    experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None) or 1
    per_layer = 4 * width * width + 3 * width * mlp * experts
    return ModelFacts(hidden_size=width, parameters=float(layers * per_layer + vocab * width), steps=steps)


def lr_alpha_product(facts: ModelFacts | None) -> float:
    """The learning rate x alpha the first start uses (see the module docstring)."""
    width = facts.hidden_size if facts else REFERENCE_WIDTH
    product = REFERENCE_PRODUCT * REFERENCE_WIDTH / width
    if facts and facts.steps is not None and facts.steps < SHORT_RUN_STEPS:
        product *= SHORT_RUN_FACTOR
    return product


def prior_rank(facts: ModelFacts | None) -> int:
    params = facts.parameters if facts else 7e9
    return 16 if params < 1e9 else 32 if params < 1e10 else 64


def _snap(spec: Choice | Any, value: Any, log: bool) -> Any:
    """The value of `spec` (a Choice or a Range) nearest `value`: clipped into a range and onto its step;
    the nearest numeric option (on a log scale for a log setting), else the value if it is an option."""
    if isinstance(spec, Choice):
        options = list(spec.options)
        if value in options:
            return value
        numeric = [o for o in options if isinstance(o, int | float) and not isinstance(o, bool)]
        if isinstance(value, int | float) and not isinstance(value, bool) and numeric:
            if log and value > 0 and all(o > 0 for o in numeric):
                return min(numeric, key=lambda o: abs(math.log(o / value)))
            return min(numeric, key=lambda o: abs(o - value))
        return options[0]
    v = min(max(float(value), spec.low), spec.high)
    if spec.step:
        v = min(spec.high, spec.low + round((v - spec.low) / spec.step) * spec.step)
    return int(round(v)) if spec.is_int else v


def _middle(spec: Choice | Any) -> Any:
    """The middle of a setting: the middle option in order, or the (geometric, for log) midpoint."""
    if isinstance(spec, Choice):
        try:
            options = sorted(spec.options)
        except TypeError:
            options = list(spec.options)
        return options[(len(options) - 1) // 2]
    return _snap(spec, math.sqrt(spec.low * spec.high) if spec.log else (spec.low + spec.high) / 2, False)


def prior_configs(space: SearchSpace, n: int, facts: ModelFacts | None = None) -> list[dict[str, Any]]:
    """Up to `n` distinct configurations of `space`, each a value for every searched setting it activates:
    the first at the rule's learning rate (`lr_alpha_product` over the configuration's alpha), the second
    at `SECOND_FACTOR` times it, a third at a third of it; all linear layers, the rank for the model's size,
    alpha 32 (or the ratio's default); the setting's default (snapped) or the middle of its range for the
    rest. Each value is snapped into the space. What a new study runs first (`Strategy.created`)."""
    out: list[dict[str, Any]] = []
    product = lr_alpha_product(facts)
    for factor in (1.0, SECOND_FACTOR, 1 / SECOND_FACTOR):
        if len(out) >= max(0, n):
            break
        values = {name: spec.value for name, spec in space.specs.items() if isinstance(spec, Fixed)}
        wanted = {"lora_target_modules": "all-linear", "lora_r": prior_rank(facts), "lora_alpha": ALPHA}
        for name in space.searched:
            spec, param = space.specs[name], PARAMS[name]
            if name in wanted:
                values[name] = _snap(spec, wanted[name], param.log)
            elif name != "learning_rate":
                values[name] = _middle(spec) if param.default is None else _snap(spec, param.default, param.log)
        if "learning_rate" in space.searched:
            spec = space.specs["learning_rate"]
            lr = _snap(spec, float(f"{product * factor / _effective_alpha(values):.2g}"), True)  # 1.1e-3, not 0.0010666
            first = out[0].get("learning_rate") if out else None
            if factor != 1.0 and lr == first:  # snapped or clipped onto the first start's: step away from it
                lr = (_next_option(spec, lr, up=factor > 1) if isinstance(spec, Choice)
                      else _snap(spec, float(f"{first * factor:.2g}"), True))
            values["learning_rate"] = lr
        config = active_params(space, {name: values[name] for name in space.searched})
        if config not in out:
            out.append(config)
    return out


def cheap_config(space: SearchSpace, facts: ModelFacts | None = None, smallest_rank: bool = False) -> dict[str, Any] | None:
    """The cheap end of the front: the first start with the shortest context and the fewest adapted layers the
    space offers, and with `smallest_rank` (the adapter's size is an objective) the smallest rank, its learning
    rate following the smaller alpha. The rank is otherwise kept: it barely moves time or memory (LoRA's
    products are small beside the base model's), and on llmtune's long table a smaller rank did not train
    faster. None when none of these is searched."""
    if not {"lora_r", "lora_target_modules", "sequence_len"} & set(space.searched):
        return None
    first = prior_configs(space, 1, facts)
    if not first:
        return None
    values = {**{n: s.value for n, s in space.specs.items() if isinstance(s, Fixed)}, **first[0]}
    if smallest_rank and "lora_r" in space.searched:
        spec = space.specs["lora_r"]
        if isinstance(spec, Choice):
            values["lora_r"] = min(spec.options)
        elif isinstance(spec, Range):
            values["lora_r"] = _snap(spec, spec.low, True)
    seq = space.specs.get("sequence_len")
    if "sequence_len" in space.searched and isinstance(seq, Choice | Range):  # the context costs most of all
        values["sequence_len"] = min(seq.options) if isinstance(seq, Choice) else _snap(seq, seq.low, True)
    targets = space.specs.get("lora_target_modules")
    if "lora_target_modules" in space.searched and isinstance(targets, Choice):
        known = [t for t in TARGETS_BY_SIZE if t in targets.options]
        if known:
            values["lora_target_modules"] = known[0]
    if "learning_rate" in space.searched:
        lr = float(f"{lr_alpha_product(facts) / _effective_alpha(values):.2g}")
        values["learning_rate"] = _snap(space.specs["learning_rate"], lr, True)
    return active_params(space, {name: values[name] for name in space.searched})


def starting_points(space: SearchSpace, facts: ModelFacts | None, objectives: set[str] | frozenset[str],
                    n_trials: int | None) -> list[dict[str, Any]]:
    """What a new `sampler: auto` study runs first, in order (`Strategy.created`; benchmarks/replay.py asks here
    too). Few: 2 starts, or a quarter of a small n_trials; they anchor the sampler, not
    replace it. Where an objective is a cost and the search has 8 or more trials, the cheap end of the front
    (`cheap_config`) runs second, before the learning-rate hedge: the first start aims at the loss end of the
    front and the cheap one at its other end, so two trials already span it, and the cheap one is the
    cheapest trial of the queue."""
    n = 2 if n_trials is None else min(2, max(1, n_trials // 4))
    configs = prior_configs(space, n, facts)
    cheap = (cheap_config(space, facts, smallest_rank="trainable_params" in objectives)
             if COST_METRICS & set(objectives) and (n_trials is None or n_trials >= 8) else None)
    if cheap is not None and cheap not in configs:
        configs.insert(1, cheap)  # the cheap end of the front, which chasing the loss finds only by chance
    return configs


def _next_option(spec: Choice, value: Any, up: bool) -> Any:
    """The option just above (or below) `value` in a numeric choice, else `value` itself."""
    numeric = sorted(o for o in spec.options if isinstance(o, int | float) and not isinstance(o, bool))
    beyond = [o for o in numeric if o > value] if up else [o for o in reversed(numeric) if o < value]
    return beyond[0] if beyond else value


def _effective_alpha(values: dict[str, Any]) -> float:
    """alpha, or alpha x sqrt(r) under rsLoRA: what the learning rate multiplies (module docstring)."""
    r = int(values.get("lora_r") or PARAMS["lora_r"].default)
    alpha = values.get("lora_alpha")
    if alpha is None:
        alpha = float(values.get("lora_alpha_ratio") or PARAMS["lora_alpha_ratio"].default) * r
    return float(alpha) * (math.sqrt(r) if values.get("use_rslora") else 1.0)


def recipe_facts(recipe: Any, space: SearchSpace | None = None) -> ModelFacts | None:
    """`ModelFacts` for a recipe's model (its config, read offline-safe as the preflight does) and budget
    (steps from examples or tokens at the space's fixed or default batch; epochs leave it unknown). None
    when the config cannot be read: the rule then assumes a 7B-class model."""
    from llmtune.builtin.names import resolve_model_name
    from llmtune.config.settings import TrialSettings

    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve_model_name(recipe.model.name, log=None), revision=recipe.model.revision,
                                            trust_remote_code=recipe.model.trust_remote_code)
    except Exception:  # unreadable here (the preflight has said why, where it matters): no facts
        return None
    space = space or recipe.space
    fixed = {n: s.value for n, s in space.specs.items() if isinstance(s, Fixed)}
    batch = TrialSettings.of({"batch_size": fixed.get("batch_size"),
                              "micro_batch_size": fixed.get("micro_batch_size") or PARAMS["micro_batch_size"].default}
                             ).global_batch(recipe.train.gradient_accumulation_steps)
    budget, steps = recipe.train.budget, None
    if budget.kind == "examples":
        steps = max(1, int(budget.amount) // batch)
    elif budget.kind == "tokens":
        seq = fixed.get("sequence_len") or PARAMS["sequence_len"].default
        steps = max(1, int(budget.amount) // (batch * int(seq)))
    return facts_from_config(config, steps)
