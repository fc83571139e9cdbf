"""The base model's exact match on a recipe's eval rows: the answers a trial would score before any training.

Loads the recipe's model as a trial does (`llmtune.harness.model.load_base`) with an untrained LoRA adapter
(`apply_lora`: B = 0, so the model is exactly the base), answers the same fixed subset of eval rows a trial
answers (`measure.generation_examples`, drawn with `data.split_seed`) with the same code
(`llmtune.harness.generate.answer`), and scores them with the built-in metrics the recipe names.

    python benchmarks/exact_match_base.py recipes/smollm2-exact-match-cpu.yaml \
        --out benchmarks/results/exact_match_smollm2_base.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe override, as llmtune's --set")
    ap.add_argument("--out", default=None, help="write the answers here (JSONL, as a trial's generations.jsonl)")
    args = ap.parse_args()

    import torch

    from llmtune import hardware
    from llmtune.config.objectives import TASK_METRICS
    from llmtune.config.recipe import load_recipe
    from llmtune.config.settings import TrialSettings
    from llmtune.harness import model as M
    from llmtune.harness.data_sources import load_splits
    from llmtune.harness.generate import answer, pick_rows
    from llmtune.harness.quality import BUILTIN

    recipe = load_recipe(args.recipe, args.set)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    device = hardware.resolve_device(recipe.train.device)
    dtype = M.pick_dtype(recipe.model.dtype, device, M.checkpoint_dtype(recipe.model))
    tokenizer = M.load_tokenizer(recipe.model)
    splits = load_splits(recipe.data)
    settings = TrialSettings.of(recipe.space.complete(recipe.space.default()))
    model = M.apply_lora(M.load_base(recipe.model, settings, device, dtype), settings)
    rows = pick_rows(splits.eval, recipe.measure.generation_examples, recipe.data.split_seed)
    t = time.perf_counter()
    answers = answer(model, tokenizer, recipe, rows, device)
    seconds = time.perf_counter() - t
    predictions, references = [a["prediction"] for a in answers], [a["reference"] for a in answers]
    named = set(recipe.objectives) | set(recipe.constraints)
    scores = {m: BUILTIN[m](predictions, references) for m in TASK_METRICS if m in named}
    if args.out:
        Path(args.out).write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers), encoding="utf-8")
    print(json.dumps({"model": recipe.model.name, "dtype": str(dtype).removeprefix("torch."), "device": device,
                      "rows": len(rows), "generation_s": round(seconds, 1), **scores}))


if __name__ == "__main__":
    main()
