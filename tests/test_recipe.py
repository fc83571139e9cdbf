"""Recipe validation: every problem at once, each with the field, the bad value and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmtune.config.recipe import RecipeError, load_recipe, recipe_from_dict
from llmtune.config.space import Choice, Fixed, Range, SearchSpace

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"model": {"name": "llmtune/tiny"}, "data": {"source": "llmtune/tiny-tasks"}}


def problems_of(data) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data)
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.objectives, "a shipped recipe names its objectives"
    assert recipe.space.searched, "a shipped recipe searches something"


def test_minimal_recipe_gets_defaults():
    r = recipe_from_dict(GOOD)
    assert r.objectives == {"eval_loss": "minimize"}
    assert r.select.by == "eval_loss"
    assert r.train.budget.kind == "examples"
    assert r.space.searched == []


@pytest.mark.parametrize("data, expected", [
    ({**GOOD, "modle": {}}, "modle: unknown setting; did you mean 'model'?"),
    ({**GOOD, "data": {"source": "x", "formt": "chat"}}, "data.formt: unknown setting; did you mean 'format'?"),
    ({**GOOD, "search": {"lora_rank": 8}}, "search.lora_rank: unknown setting; did you mean 'lora_r'?"),
    ({**GOOD, "search": {"quantization": "4bits"}}, "search.quantization: '4bits' is not one of none, 8bit, 4bit; did you mean '4bit'?"),
    ({**GOOD, "search": {"lora_r": {"low": 32, "high": 8}}}, "search.lora_r: low 32 must be below high 8"),
    ({**GOOD, "search": {"lora_r": 0}}, "search.lora_r: 0 must be at least 1"),
    ({**GOOD, "search": {"lora_r": 8.5}}, "search.lora_r: 8.5 is not a whole number"),
    ({**GOOD, "search": {"learning_rate": {"low": 0, "high": 1e-3}}}, "a log range needs low > 0"),
    ({**GOOD, "search": {"learning_rate": {"low": 1e-5, "hi": 1e-3}}}, "did you mean 'high'?"),
    ({**GOOD, "search": {"sample_packing": "yes"}}, "search.sample_packing: 'yes' is not true or false"),
    ({**GOOD, "search": {"sample_packing": {"low": 0, "high": 1}}}, "takes a value or a list of choices, not a range"),
    ({**GOOD, "search": {"lora_r": []}}, "search.lora_r: an empty list of choices"),
    ({**GOOD, "search": {"lora_dropout": [0.0, 1.5]}}, "search.lora_dropout[1]: 1.5 must be in [0, 1)"),
    ({**GOOD, "search": {"lora_target_modules": "atention"}}, "did you mean 'attention'?"),
    ({**GOOD, "search": {"lora_alpha": 16, "lora_alpha_ratio": 2}}, "give lora_alpha or lora_alpha_ratio, not both"),
    ({**GOOD, "train": {"budget": {"tokens": 10, "epochs": 1}}}, "set exactly one of tokens, examples, epochs (got tokens, epochs)"),
    ({**GOOD, "train": {"budget": {"examples": -5}}}, "train.budget.examples: -5 must be positive"),
    ({**GOOD, "train": {"lr_scheduler": "cosin"}}, "did you mean 'cosine'?"),
    ({**GOOD, "train": {"report_to": ["tensorbord"]}}, "train.report_to[0]: 'tensorbord' is not one of tensorboard, mlflow, wandb; did you mean 'tensorboard'?"),
    ({**GOOD, "objectives": {"eval_los": "minimize"}}, "objectives.eval_los: unknown metric; did you mean 'eval_loss'?"),
    ({**GOOD, "objectives": {"eval_loss": "lowest"}}, "objectives.eval_loss: 'lowest' is not one of minimize, maximize"),
    ({**GOOD, "constraints": {"peak_memory_gb": {"maxi": 3}}}, "constraints.peak_memory_gb: {\"maxi\": 3} must be {max: x} and/or {min: y}"),
    ({**GOOD, "study": {"sampler": "nsga"}}, "study.sampler: 'nsga' is not one of auto, tpe, nsga2"),
    ({**GOOD, "study": {"n_trials": 0}}, "study.n_trials: 0 must be at least 1"),
    ({**GOOD, "study": {"n_trials": None}}, "set n_trials or timeout"),
    ({**GOOD, "select": {"by": "latency_ms"}}, "select.by: 'latency_ms' is not an objective of this recipe"),
    ({**GOOD, "data": {"source": "x", "eval_fraction": 1.5}}, "data.eval_fraction: 1.5 must be between 0 and 1"),
    ({**GOOD, "model": {"name": "x", "dtype": "fp16"}}, "model.dtype: 'fp16' is not one of auto, bfloat16, float16, float32"),
    ({**GOOD, "model": {"name": "x", "trust_remote_code": "no"}}, "model.trust_remote_code: 'no' is not true or false"),
    ({"data": {"source": "x"}}, "model.name: is required"),
    ({**GOOD, "study": {"pruner": "asha", "pruner_settings": {"eta": 1}}}, "study.pruner_settings: pruner 'asha': setting 'eta'=1 is invalid"),
    ({**GOOD, "train": "fast"}, "train: expected a mapping of settings, got 'fast'"),
])
def test_bad_recipe_names_field_value_and_fix(data, expected):
    problems = problems_of(data)
    assert any(expected in p for p in problems), problems


def test_all_problems_reported_at_once():
    bad = {"model": {"name": "x", "dtype": "fp8"}, "data": {"source": "x", "train_on": "answers"},
           "train": {"budget": {"tokens": -1}}, "search": {"lora_r": "big", "quantization": ["nf3"]},
           "objectives": {"loss": "minimize", "speed": "maximize"}}
    problems = problems_of(bad)
    joined = "\n".join(problems)
    for field in ("model.dtype", "data.train_on", "train.budget.tokens", "search.lora_r", "search.quantization[0]", "objectives.speed"):
        assert field in joined
    assert len(problems) == 6


def test_search_values_parse_to_specs():
    r = recipe_from_dict({**GOOD, "search": {
        "learning_rate": {"low": "1e-5", "high": 1e-3},  # YAML reads 1e-5 (no dot) as text
        "lora_r": [8, 16], "sequence_len": {"low": 128, "high": 512, "step": 128},
        "lora_target_modules": {"choices": [["q_proj", "v_proj"], "all-linear"]}}})
    specs = r.space.specs
    assert specs["learning_rate"] == Range(1e-5, 1e-3, True, None, False)
    assert specs["lora_r"] == Choice((8, 16))
    assert specs["sequence_len"] == Range(128, 512, False, 128, True)
    assert specs["lora_target_modules"] == Choice(("q_proj,v_proj", "all-linear"))
    assert specs["lora_dropout"] == Fixed(0.05)
    assert r.space.grid() is None  # a float range: no grid
    assert SearchSpace.from_dict({"lora_r": [4, 8], "sequence_len": {"low": 128, "high": 512, "step": 128}}).grid_size() == 8


def test_conditional_settings_are_sampled_only_when_active():
    import optuna

    space = SearchSpace.from_dict({"quantization": ["none", "4bit"], "bnb_4bit_quant_type": ["nf4", "fp4"]})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        t = study.ask()
        v = space.suggest(t)
        seen.add(v["quantization"])
        assert ("bnb_4bit_quant_type" in t.params) == (v["quantization"] == "4bit")
        study.tell(t, 0.0)
    assert seen == {"none", "4bit"}


def test_overrides_and_env_storage(tmp_path, monkeypatch):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "study": {"storage": "postgresql://u:${PGPASS}@h/db"}}))
    monkeypatch.setenv("PGPASS", "s3cret")
    r = load_recipe(path, ["search.lora_r=[4, 8]", "train.budget.examples=50"])
    assert r.space.specs["lora_r"] == Choice((4, 8))
    assert r.train.budget.examples == 50
    assert r.study.storage == "postgresql://u:s3cret@h/db"
    assert r.name == "r"


def test_cli_validate_exit_codes_and_no_traceback(tmp_path):
    good = subprocess.run([sys.executable, "-m", "llmtune.cli", "validate", str(ROOT / "recipes" / "tiny-cpu.yaml")],
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "ok" in good.stdout and "lora_r" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: x}\ndata: {source: y}\nsearch: {quantisation: 4bit}\n")
    out = subprocess.run([sys.executable, "-m", "llmtune.cli", "validate", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "search.quantisation: unknown setting; did you mean 'quantization'?" in out.stderr
    assert "Traceback" not in out.stderr
    missing = subprocess.run([sys.executable, "-m", "llmtune.cli", "validate", str(tmp_path / "nope.yaml")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    out = subprocess.run([sys.executable, "-m", "llmtune.cli", "validate", str(broken)], capture_output=True, text=True)
    assert out.returncode == 2 and "not valid YAML" in out.stderr


# --------------------------------------------------------------------------------------------- issue 23 edges

_VALIDATE = """
import atexit, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # 1 GiB: the bomb expanded needs tens of GB
def peak():  # VmHWM: this program's own peak (ru_maxrss carries the forking parent's across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("peak_kib", line.split()[1])
atexit.register(peak)
from llmtune.cli import main
sys.exit(main(["validate", sys.argv[1]]))
"""


def test_an_alias_bomb_is_refused_in_little_memory_with_a_short_message(tmp_path):
    """A 1 KB "billion laughs" recipe once grew validate past 2.5 GB and printed a 144 MB message: run it in
    a child whose address space is capped at 1 GiB, and measure what it used."""
    from test_malformed import ALIAS_BOMB

    path = tmp_path / "bomb.yaml"
    path.write_text(yaml.safe_dump(GOOD) + ALIAS_BOMB + "description: [*i, *i, *i]\n")
    assert path.stat().st_size < 1500
    out = subprocess.run([sys.executable, "-c", _VALIDATE, str(path)], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "MemoryError" not in out.stderr
    assert "aliases" in out.stderr and len(out.stderr) < 1000
    # Its own peak: VmHWM starts afresh at exec (RUSAGE_CHILDREN is the largest child this test process ever
    # waited for, and a child's ru_maxrss starts from the forking parent's: pytest holds ~1 GB in the full suite)
    assert int(out.stdout.split("peak_kib")[-1]) < 1_000_000  # KiB: well under 1 GiB


def test_aliases_that_share_a_few_settings_still_load(tmp_path):
    """Accepted: an anchor and merge key (``<<: *base``) reused a few times, the documented use of aliases."""
    text = ("model: {name: llmtune/tiny}\ndata: &d {source: llmtune/tiny-tasks}\n"
            "train: {budget: &b {examples: 64}}\nsearch:\n  lora_r: &r [8, 16]\n"
            "study: {<<: {n_trials: 4}, seed: 1}\ndescription: shared\n")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    recipe = load_recipe(path)
    assert recipe.train.budget.examples == 64 and recipe.study.n_trials == 4


def test_a_printed_value_is_cut(tmp_path):
    long = "x" * 100_000
    [problem] = problems_of({**GOOD, "model": {"name": "llmtune/tiny", "dtype": long}})
    assert len(problem) < 600 and "100,000 characters" in problem


def test_every_error_class_survives_pickling():
    """A message crossing a process boundary must arrive whole (it once read "337 problems: - i - z - e ...")."""
    import pickle

    import llmtune.builtin.smollm2  # noqa: F401  (each module's own subclasses, below)
    import llmtune.harness.data  # noqa: F401
    import llmtune.harness.formats  # noqa: F401
    import llmtune.harness.targets  # noqa: F401
    from llmtune import errors

    def every(cls: type) -> list[type]:
        return [cls] + [c for sub in cls.__subclasses__() for c in every(sub)]

    classes = every(errors.LlmtuneError)
    assert {errors.RecipeError, errors.DataError, errors.SearchError, errors.HubError,
            errors.MissingDependency} <= set(classes)
    problems = [errors.Problem("search.lora_r", "0 must be at least 1"), errors.Problem("", "the file is empty")]
    for cls in classes:
        if cls is errors.RecipeError:
            error = cls(problems, "recipe.yaml")
        elif cls.__name__ == "TooManyBadRows":
            error = cls(problems)
        elif cls.__name__ == "BadRow":
            error = cls({"instruction": "x"}, "no 'output'", "set data.output_field")
        elif cls.__name__ == "TemplateRefused":
            error = cls("row 3: the template refused 'tool'", "refused 'tool'")
        elif cls is errors.DataError:
            error = cls("data file 'x.jsonl' has no rows", 3, field="data.eval_source")
        else:
            error = cls(f"{cls.__name__}: what went wrong, and the fix", 1)
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is cls and str(back) == str(error) and back.exit_code == error.exit_code, cls
        assert back.__dict__ == error.__dict__, cls
    back = pickle.loads(pickle.dumps(errors.RecipeError(problems, "recipe.yaml")))
    assert back.problems == problems and back.source == "recipe.yaml" and str(back).startswith("2 problems in recipe.yaml")


def test_set_one_budget_key_replaces_the_budget(tmp_path):
    """``--set train.budget.epochs=10`` on a recipe with ``budget: {examples: N}``: a budget is one amount."""
    from llmtune.config.recipe import apply_overrides

    data = {**GOOD, "train": {"budget": {"examples": 500}, "seed": 3}}
    recipe = recipe_from_dict(apply_overrides(data, ["train.budget.epochs=10"]))
    assert (recipe.train.budget.epochs, recipe.train.budget.examples, recipe.train.seed) == (10, None, 3)
    recipe = recipe_from_dict(apply_overrides(data, ["train.budget={tokens: 1000}"]))
    assert (recipe.train.budget.tokens, recipe.train.budget.examples) == (1000, None)


def test_study_names_that_leave_their_folder_are_refused():
    for bad in ("../..", "/tmp/elsewhere", "a/b", ".", "", " ", "a\x00b", "x" * 300):
        [problem] = problems_of({**GOOD, "study": {"study_name": bad}})
        assert problem.startswith("study.study_name:"), problem
    # accepted: any plain name (the recipe's name is the default, so it is held to the same rule)
    assert recipe_from_dict({**GOOD, "study": {"study_name": "Qwen2.5 lr sweep #2"}}).study.study_name
    assert problems_of({**GOOD, "name": "../up"})[0].startswith("name:")
    assert recipe_from_dict({**GOOD, "name": "../up", "study": {"study_name": "ok"}}).study.study_name == "ok"


def test_storage_expands_braced_and_plain_variables_as_before(monkeypatch):
    """Accepted: study.storage expands ${VAR} and $VAR (os.path.expandvars) when the variable is set."""
    monkeypatch.setenv("LLMTUNE_TEST_PW", "pw")
    for url in ("postgresql://u:${LLMTUNE_TEST_PW}@h/x", "postgresql://u:$LLMTUNE_TEST_PW@h/x"):
        assert recipe_from_dict({**GOOD, "study": {"storage": url}}).study.storage == "postgresql://u:pw@h/x"
