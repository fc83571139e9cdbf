"""The model card (README.md) of an exported adapter: Hub metadata up front, the search behind it below.

The YAML front matter is what the Hub indexes (base_model, library_name: peft, tags, datasets and a
model-index with the trial's measured metrics); the body says how the adapter was chosen.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from optuna.trial import FrozenTrial

from llmtune.builtin.names import DATA, MODELS
from llmtune.config.objectives import METRICS, meaning
from llmtune.study.attrs import CURVE, METRICS_KEY, SETTINGS

if TYPE_CHECKING:
    from llmtune.deliver.results import SearchResult

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BUILTIN_NAMES = (*MODELS, *DATA)  # llmtune's own offline names: not Hub ids


def hub_id(name: str | None) -> str | None:
    """`name` when it names a Hub repository (not a local path, not llmtune's built-in demo assets)."""
    if not name or name in BUILTIN_NAMES or not HUB_ID.match(name) or Path(name).exists():
        return None
    return name


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else str(v).replace("|", "\\|")


def _shown(name: str, settings: dict[str, Any]) -> bool:
    """Unset alternatives (lora_alpha when lora_alpha_ratio is used) and 4-bit options of other bases are noise."""
    if settings.get(name) is None:
        return False
    return not (name.startswith("bnb_4bit_") and settings.get("quantization") != "4bit")


def _md_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_(none)_\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def public_recipe(result: SearchResult) -> dict[str, Any]:
    """The recipe as shipped with the card: no storage coordinates (the study is named, not where it lives:
    host, port, user and database say nothing to a reader and may say too much), local paths cut to their
    last part (a model or data folder on this machine likewise)."""
    data = result.recipe.to_dict()
    study = data.get("study") or {}
    study.pop("storage", None)
    opened = getattr(result, "study", None)
    study["study_name"] = opened.study_name if opened is not None else (study.get("study_name") or data.get("name"))
    data["output_dir"] = Path(str(data.get("output_dir") or "runs")).name
    for section, key in (("model", "name"), ("data", "source"), ("data", "eval_source")):
        value = (data.get(section) or {}).get(key)
        if value and hub_id(str(value)) is None and str(value) not in BUILTIN_NAMES:
            data[section][key] = Path(str(value)).name
    return data


def card_metadata(result: SearchResult, trial: FrozenTrial, repo_id: str | None, versions: dict[str, str]) -> dict[str, Any]:
    """The YAML front matter: Hub card metadata with a model-index of the trial's objective values."""
    from huggingface_hub import EvalResult, ModelCardData

    recipe = result.recipe
    base, data = hub_id(recipe.model.name), hub_id(recipe.data.source)
    metrics = trial.user_attrs.get(METRICS_KEY) or {}
    local_data = Path(recipe.data.source).name  # a local path is not published whole
    evals = [EvalResult(task_type="text-generation", dataset_type=data or "custom", dataset_name=data or local_data,
                        dataset_split="eval", metric_type=name, metric_name=name, metric_value=float(metrics[name]))
             for name in [*recipe.objectives, *(m for m in metrics if m not in recipe.objectives)]
             if (name in METRICS or name in recipe.objectives) and isinstance(metrics.get(name), (int, float))]
    settings = trial.user_attrs.get(SETTINGS) or dict(trial.params)
    tags = ["llmtune", "peft", "lora", "base_model:adapter:" + (base or recipe.model.name)]
    if settings.get("quantization") == "4bit":
        tags.append("qlora")
    card = ModelCardData(
        base_model=base or recipe.model.name, library_name="peft", pipeline_tag="text-generation", tags=tags,
        datasets=[data] if data else None, model_name=(repo_id or recipe.name).split("/")[-1], eval_results=evals or None)
    meta: dict[str, Any] = yaml.safe_load(card.to_yaml())
    meta["llmtune"] = {"version": versions.get("llmtune", ""), "trial": trial.number, "study": result.study.study_name,
                       "selected_by": recipe.select.by}
    return meta


def usage_code(base: str, repo_id: str | None, tokenizer_included: bool) -> str:
    """The card's "Use it" code, as it runs in the export's folder (or from the Hub with `repo_id`). The base is
    loaded as the search loaded it: a Hub id by name; llmtune's built-in bases (not Hub names) through
    llmtune, which builds them offline into $LLMTUNE_HOME; a local folder by its path on the machine that ran
    the search (only its last part is published: the reader points it at their copy)."""
    adapter = repr(repo_id) if repo_id else '"."  # this folder; or the Hub id it was pushed to'
    lines = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    if base in MODELS:
        lines[:0] = ["from llmtune.builtin.names import resolve_model_name  # pip install llmtune"]
        lines += [f"base_path = resolve_model_name({base!r})  # llmtune's built-in base, built offline"]
    elif hub_id(base) is None:
        lines += [f"base_path = {Path(base).name!r}  # the base model's folder (the search used a local copy)"]
    else:
        lines += [f"base_path = {base!r}"]
    lines += [f"adapter = {adapter}",
              "base = AutoModelForCausalLM.from_pretrained(base_path)",
              f"tokenizer = AutoTokenizer.from_pretrained({'adapter' if tokenizer_included else 'base_path'})",
              "model = PeftModel.from_pretrained(base, adapter)"]
    return "```python\n" + "\n".join(lines) + "\n```\n"


def render_card(result: SearchResult, trial: FrozenTrial, *, repo_id: str | None = None,
                versions: dict[str, str] | None = None, tokenizer_included: bool = False,
                lora: dict[str, Any] | None = None) -> str:
    """README.md text: front matter, then usage, the chosen settings, objective values, the Pareto front,
    the search space and the recipe."""
    from llmtune import __version__

    versions = {"llmtune": __version__, **(versions or {})}
    recipe = result.recipe
    meta = card_metadata(result, trial, repo_id, versions)
    title = (repo_id or recipe.name).split("/")[-1]
    settings = trial.user_attrs.get(SETTINGS) or dict(trial.params)
    metrics = trial.user_attrs.get(METRICS_KEY) or {}
    searched = recipe.space.searched
    best = result.best
    chosen = best is not None and best.number == trial.number
    front = result.summary_rows()
    for row in front:
        row["chosen"] = "yes" if row["trial"] == trial.number else ""
    objective_rows = [{"metric": k, "value": metrics.get(k), "direction": d, "meaning": meaning(k, recipe.measure.metrics)}
                      for k, d in recipe.objectives.items()]
    other_rows = [{"metric": k, "value": v, "meaning": meaning(k, recipe.measure.metrics)}
                  for k, v in metrics.items() if k not in recipe.objectives]
    curve = trial.user_attrs.get(CURVE) or []
    how = (f"the trial chosen from the Pareto front by `select.by: {recipe.select.by}`" if chosen
           else f"trial {trial.number}, picked by hand (the search's own choice is trial {best.number if best else 'none'})")
    body = [
        f"# {title}\n",
        f"A LoRA adapter for `{recipe.model.name}`, found by [llmtune](https://github.com/llmtune/llmtune) "
        f"{versions['llmtune']}: a search over LoRA/QLoRA hyperparameters that trades "
        f"{', '.join(recipe.objectives)} against each other. This is {how}.\n",
        "## Use it\n",
        usage_code(recipe.model.name, repo_id, tokenizer_included),
        ("The tokenizer files are included (the base is not a Hub repository)." if tokenizer_included else
         "llmtune never changes the tokenizer or the vocabulary, so the base model's tokenizer is the one to use.") + "\n",
        f"## Chosen hyperparameters (trial {trial.number})\n",
        _md_table([{"setting": k, "value": settings[k], "searched": "yes" if k in searched else ""}
                   for k in sorted(settings, key=lambda k: (k not in searched, k)) if _shown(k, settings)]),
    ]
    if lora:
        body += ["As saved in adapter_config.json: " + ", ".join(f"`{k}` = {v}" for k, v in lora.items()) + ".\n"]
    body += [
        "## Objective values\n", _md_table(objective_rows),
    ]
    if other_rows:
        body += ["Other measurements:\n", _md_table(other_rows)]
    if curve:
        body += ["Eval loss over the training budget: "
                 + ", ".join(f"{frac:.2f}: {loss:.4f}" for frac, loss in curve) + "\n"]
    body += [
        f"## Pareto front ({len(front)} of {result.counted_trials} trials)\n", _md_table(front),
        "## Search space\n",
        _md_table([{"setting": n, "range": recipe.space.specs[n].describe()} for n in searched])
        if searched else "Nothing was searched (one configuration).\n",
        f"Objectives: {', '.join(f'{k} ({d})' for k, d in recipe.objectives.items())}."
        + (f" Constraints: {recipe.constraints}." if recipe.constraints else "") + "\n",
        "## Recipe\n", "```yaml\n" + yaml.safe_dump(public_recipe(result), sort_keys=False) + "```\n",
        "## Framework versions\n",
        "".join(f"- {k}: {v}\n" for k, v in versions.items() if v),
    ]
    return "---\n" + str(yaml.safe_dump(meta, sort_keys=False)) + "---\n\n" + "\n".join(body)


def read_card(path: str | Path) -> tuple[dict[str, Any], str]:
    """(front matter, body) of a README.md written by `render_card`."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        raise ValueError(f"{path}: no YAML front matter")
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head), body


__all__ = ["render_card", "read_card", "card_metadata", "hub_id"]
