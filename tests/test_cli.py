"""The command line as a user runs it: `llmtune train` on the shipped offline recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_train_prints_metrics_and_beats_the_base_model(tmp_path, tiny_model_path, tiny_data_path):
    out = subprocess.run(
        [sys.executable, "-m", "llmtune.cli", "train", str(ROOT / "recipes" / "tiny-cpu.yaml"),
         "--set", "learning_rate=3e-3", "--set", "lora_r=8", "--set", "train.budget.examples=160",
         "--set", "data.max_eval_examples=32", "--output-dir", str(tmp_path / "t")],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["status"] == "complete"
    assert summary["settings"]["lora_r"] == 8 and summary["settings"]["learning_rate"] == 3e-3
    assert summary["metrics"]["eval_loss"] < summary["base_eval_loss"]
    assert "base eval_loss (untrained)" in out.stdout and "train_throughput" in out.stdout
    assert (tmp_path / "t" / "adapter" / "adapter_model.safetensors").exists()


def test_train_rejects_a_bad_setting_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "llmtune.cli", "train", str(ROOT / "recipes" / "tiny-cpu.yaml"),
                          "--set", "quantization=nf4", "--output-dir", str(tmp_path / "t")], capture_output=True, text=True)
    assert out.returncode == 2
    assert "search.quantization: 'nf4' is not one of none, 8bit, 4bit" in out.stderr
    assert "Traceback" not in out.stderr


def test_tables_are_not_cut_to_80_columns_in_a_file_or_pipe(capsys):
    """Off a terminal (a file, a pipe) rich would wrap the Pareto table at 80 columns."""
    from llmtune.cli import _console, _table

    row = {f"setting_{i}": f"value_number_{i}" for i in range(12)}
    _console().print(_table("Pareto front (1 of 1 trials)", [row]))
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) > 200 and len(lines) <= 6  # one line per row, not wrapped


def test_train_prints_the_rows_it_drops(tmp_path, tiny_model_path, capfd, monkeypatch):
    """`train` drops bad rows as validate and search do, and says so as they do."""
    import yaml
    from conftest import tiny_recipe_dict

    from llmtune.cli import main

    class Ran(Exception):
        pass

    def no_trial(job):
        raise Ran

    monkeypatch.setattr("llmtune.trial.runner.run_trial_process", no_trial)
    rows = [{"instruction": f"Add {i} and 1.", "input": "", "output": None if i < 3 else str(i + 1)} for i in range(30)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path, data={"source": str(tmp_path / "d.jsonl")})))
    try:
        main(["train", str(recipe), "--output-dir", str(tmp_path / "t")])
    except Ran:
        pass
    err = capfd.readouterr().err
    assert "warning: data.source" in err and "dropped 3 of 30 rows" in err, err


def test_train_refuses_an_empty_output_dir(tmp_path, capfd):
    from llmtune.cli import main

    assert main(["train", str(ROOT / "recipes" / "tiny-cpu.yaml"), "--output-dir", ""]) == 2
    err = capfd.readouterr().err
    assert "--output-dir" in err and "empty" in err and "Traceback" not in err


def test_a_first_build_says_what_it_builds_and_why(tmp_path, monkeypatch):
    """The first run built the tiny model for minutes in silence: the preflight passes a log to the built-ins,
    and the build says what it is and why."""
    from llmtune.builtin.cache import ensure_built
    from llmtune.config.recipe import recipe_from_dict
    from llmtune.preflight import _builtins

    heard: list[str] = []
    ensure_built("thing", lambda out, say: say("step 1/2") or {}, heard.append, home=tmp_path, what="llmtune/thing",
                 why="so that llmtune runs offline")
    assert heard[0].startswith("[llmtune] building llmtune/thing") and "so that llmtune runs offline" in heard[0]
    assert "step 1/2" in heard[1] and heard[-1].startswith("[llmtune] built llmtune/thing")

    logs: list[object] = []
    monkeypatch.setattr("llmtune.builtin.names.MODELS", {"llmtune/tiny": ("", lambda log: logs.append(log) or tmp_path)})
    monkeypatch.setattr("llmtune.builtin.names.DATA", {"llmtune/tiny-tasks": ("", lambda log: logs.append(log) or tmp_path)})
    recipe = recipe_from_dict({"model": {"name": "llmtune/tiny"}, "data": {"source": "llmtune/tiny-tasks"}})
    _builtins(recipe, heard.append)
    assert logs == [heard.append, heard.append]
