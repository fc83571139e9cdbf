"""One preflight before any trial: what the recipe asks of the data, the model and this machine.

`validate`, `search` and `train` all run it (through the API), so a problem found here never costs a
trial. The recipe itself was checked when it was built (`config/recipe.py`); this looks outside it:

- the data: it loads, the train and eval splits are not empty, and every row of both is checked against
  ``data.format`` (`harness/formats.py`): bad rows are dropped and each reason comes back as a warning
  (count, first row numbers, fix), exactly as the trials will drop them; more than half bad is a problem.
  The check runs over every row, since the trial applies it to every row too (it costs less than reading
  the file). For ``chat`` the tokenizer's chat template is tried on one row per distinct sequence of roles
  among the first 100,000 rows (`PROBE_ROWS`, at most `PROBE_RENDERS` rows rendered), so a template that
  refuses a role (``tool``, ``system``) or an order is reported here, with the row, not in every trial;
- the model: it is found (a built-in, a local folder, or a Hub name in the local cache when offline), its
  config is read and instantiated on the meta device (no weights), and every LoRA target choice of the
  space is resolved against its own modules (`harness/targets.py`); MoE expert targets need dropout 0;
  the attention implementation is one the model supports (and its library is installed); with sample
  packing, a 1-layer random copy of the architecture shows whether it can keep packed examples apart;
- this machine: a CUDA device when ``train.device: cuda``; bitsandbytes when the space quantizes or the
  optimizer is 8-bit; the trackers ``train.report_to`` names.

Every problem is collected and raised at once as one `RecipeError` (field, value, fix); what is worth
knowing but does not stop a search (rows dropped) is returned as warnings.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from llmtune.config.recipe import Recipe
from llmtune.config.space import Choice, Fixed
from llmtune.errors import LlmtuneError, Problem, RecipeError

PROBE_ROWS = 100_000    # rows of a chat data set whose role sequences are tried on the chat template
PROBE_RENDERS = 200     # distinct role sequences rendered at most


def _options(recipe: Recipe, name: str) -> list[Any]:
    spec = recipe.space.specs[name]
    if isinstance(spec, Fixed):
        return [spec.value]
    if isinstance(spec, Choice):
        return list(spec.options)
    return [spec.low, spec.high]  # a range: its ends are enough for "is it zero"


def _machine(recipe: Recipe) -> list[Problem]:
    from llmtune import hardware
    from llmtune.harness.optimizers import OPTIMIZERS
    from llmtune.harness.trackers import TRACKERS

    problems = []
    if recipe.train.device == "cuda" and not hardware.cuda_available():
        problems.append(Problem("train.device", "'cuda', but torch sees no CUDA GPU here; install a CUDA build of "
                                                "torch, or set train.device: auto (or cpu)"))
    quantized = [q for q in _options(recipe, "quantization") if q != "none"]
    needs_bnb = quantized or OPTIMIZERS[recipe.train.optimizer].eight_bit
    if needs_bnb and importlib.util.find_spec("bitsandbytes") is None:
        what = f"search.quantization {quantized}" if quantized else f"train.optimizer {recipe.train.optimizer!r}"
        problems.append(Problem(what.split(" ")[0], f"{what.split(' ', 1)[1]} needs bitsandbytes: pip install bitsandbytes"))
    for i, name in enumerate(recipe.train.report_to):
        module = TRACKERS[name][0]
        if importlib.util.find_spec(module) is None:
            problems.append(Problem(f"train.report_to[{i}]", f"{name!r} is not installed: pip install {module}"))
    return problems


def _data(recipe: Recipe) -> tuple[list[Problem], list[str]]:
    """The data's problems, and the warnings about rows dropped."""
    from llmtune.harness.data_sources import load_splits
    from llmtune.harness.formats import TooManyBadRows

    try:
        splits = load_splits(recipe.data)
    except TooManyBadRows as e:
        return e.problems, []
    except LlmtuneError as e:
        return [Problem("data.source", str(e))], []
    problems = _chat_template(recipe, splits.train + splits.eval) if recipe.data.format == "chat" else []
    return problems, splits.warnings


def _chat_template(recipe: Recipe, rows: list[dict[str, Any]]) -> list[Problem]:
    """Render one row per distinct sequence of roles with the model's chat template, as the trial will."""
    from llmtune.builtin.names import resolve_model_name
    from llmtune.harness.data import TemplateRefused, segments
    from llmtune.harness.formats import parse_messages

    m = recipe.model
    try:
        path = resolve_model_name(m.name, log=None)
    except LlmtuneError:
        return []  # `_model` says why
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except Exception as e:  # as for the config: not found, offline, remote code refused, broken files
        why = " ".join(str(e).split())[:300]
        return [Problem("model.name", f"{m.name!r}: its tokenizer cannot be read ({type(e).__name__}: {why}), and "
                                      "data.format: chat renders the data with it")]
    if not getattr(tokenizer, "chat_template", None):
        return [Problem("data.format", f"'chat', but the tokenizer of {m.name!r} has no chat template; use a chat "
                                       "(instruct) model, or data.format: instruction")]
    seen: set[tuple[str, ...]] = set()
    refused: dict[str, Problem] = {}
    for row in rows[:PROBE_ROWS]:
        roles = tuple(msg["role"] + ("+tool_calls" if msg.get("tool_calls") else "")
                      for msg in parse_messages(row, recipe.data)[0])
        if roles in seen:
            continue
        seen.add(roles)
        try:
            segments(row, recipe.data, tokenizer)
        except TemplateRefused as e:  # one problem per thing the template says, with its first row
            refused.setdefault(e.why, Problem("data.source", str(e)))
        except LlmtuneError as e:
            refused.setdefault(str(e), Problem("data.source", str(e)))
        if len(seen) >= PROBE_RENDERS or len(refused) >= 3:
            break
    return list(refused.values())


def _model_config(recipe: Recipe) -> tuple[Any, list[Problem]]:
    from llmtune.builtin.names import resolve_model_name

    m = recipe.model
    try:
        path = resolve_model_name(m.name, log=None)
    except LlmtuneError as e:
        return None, [Problem("model.name", str(e))]
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code), []
    except Exception as e:  # not found, offline without a cached copy, remote code refused, broken config
        why = " ".join(str(e).split())[:300]
        return None, [Problem("model.name", f"{m.name!r} cannot be read ({type(e).__name__}: {why}); give a local "
                                           "folder, a Hub name that is cached here (or reachable online), or "
                                           "llmtune/tiny")]


def _model(recipe: Recipe) -> list[Problem]:
    from llmtune.harness.targets import (
        AttentionError,
        TargetError,
        attention_implementation,
        meta_model,
        packing_probe,
        resolve_targets,
    )

    config, problems = _model_config(recipe)
    if config is None:
        return problems
    try:
        attn = attention_implementation(config, recipe.model.attn_implementation)
    except AttentionError as e:
        problems.append(Problem("model.attn_implementation", str(e).removeprefix("model.attn_implementation: ")))
        attn = "eager"
    if attn.startswith("flash_attention") and importlib.util.find_spec("flash_attn") is None:
        problems.append(Problem("model.attn_implementation", f"{attn!r} needs flash-attn: pip install flash-attn "
                                                             "(CUDA only), or use auto"))
    try:
        model = meta_model(config)
    except Exception as e:  # an architecture this transformers cannot build
        problems.append(Problem("model.name", f"{recipe.model.name!r}: transformers cannot build its model "
                                              f"({type(e).__name__}: {e})"))
        return problems
    if True in _options(recipe, "sample_packing") and packing_probe(config, attn) == "none":
        problems.append(Problem("search.sample_packing", f"true, but {config.model_type} cannot keep packed examples "
                                "apart (its attention ignores position ids and takes no block mask); set "
                                "sample_packing: false"))
    dropouts = [float(d) for d in _options(recipe, "lora_dropout")]
    for targets in _options(recipe, "lora_target_modules"):
        try:
            plan = resolve_targets(model, str(targets))
        except TargetError as e:
            problems.append(Problem("search.lora_target_modules", str(e).removeprefix("lora_target_modules: ")))
            continue
        if plan.target_parameters and any(dropouts):
            problems.append(Problem("search.lora_dropout", f"{[d for d in dropouts if d]} with lora_target_modules "
                                    f"{targets!r}: the MoE expert parameters ({', '.join(plan.target_parameters)}) "
                                    "take LoRA only without dropout (peft); set lora_dropout: 0"))
    return problems


def preflight(recipe: Recipe, *, data: bool = True, model: bool = True) -> list[str]:
    """Raise one `RecipeError` listing every problem the data, the model or this machine has with the recipe;
    return the warnings (bad rows the trials will drop: how many, why, which, the fix)."""
    problems = _machine(recipe)
    warnings: list[str] = []
    if data:
        found, warnings = _data(recipe)
        problems += found
    if model:
        problems += _model(recipe)
    if problems:
        raise RecipeError(problems)
    return warnings
