"""The notebooks cannot rot: the quickstart is executed end to end; the GPU notebook's recipe is validated."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """A kernelspec that runs this interpreter (the venv's), whatever `python` is on PATH."""
    spec = tmp_path / "jupyter" / "kernels" / "llmtune-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "llmtune tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "llmtune-test"


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def test_quickstart_notebook_runs_and_shows_results(kernel, tmp_path, tiny_model_path, tiny_data_path):
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    work = tmp_path / "work"
    work.mkdir()
    env_before = os.environ.get("HF_HUB_OFFLINE")
    NotebookClient(nb, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(work)}}).execute()
    assert env_before == "1"  # the kernel inherited the offline test environment
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(o.get("output_type") != "error" for c in code for o in c.get("outputs", []))
    text = {c.source.splitlines()[0]: _text(c) for c in code}
    assert "SearchResult(study='quickstart', trials=2, pareto=" in text["result = llmtune.search(recipe)"]
    table = text['result.trials[["trial", "status", "pareto", "chosen", "lora_r", "eval_loss", "trainable_params"]]']
    assert table.count("complete") == 2
    figures = [c for c in code if c.source.startswith(("result.plot_pareto", "result.plot_curves"))]
    assert len(figures) == 2
    for c in figures:  # each shows a plotly figure inline
        assert any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in c.outputs), c.source
    assert "chosen trial:" in text["best = result.best"]
    assert "adapter_model.safetensors" in text['export = result.export("runs/quickstart/export")']
    assert "would upload 7 files to you/tiny-lora" in text['push = result.push_to_hub("you/tiny-lora", dry_run=True)']
    out = work / "runs" / "quickstart"
    assert (out / "report.html").exists() and (out / "export" / "adapter_config.json").exists()
    assert (out / "export" / "README.md").read_text().startswith("---\nbase_model: llmtune/tiny\n")


def test_gpu_notebook_recipe_is_valid():
    import llmtune

    nb = nbformat.read(NOTEBOOKS / "gpu-real-model.ipynb", as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith("recipe = {"))
    scope: dict = {}
    exec(cell.source.replace("llmtune.recipe_from_dict(recipe)", ""), scope)  # the dict only, no GPU work
    recipe = llmtune.recipe_from_dict(scope["recipe"])
    assert recipe.model.name == "Qwen/Qwen2.5-0.5B" and "quantization" in recipe.space.searched
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed without outputs


def test_smollm2_notebook_recipe_is_valid_and_its_committed_run_trained():
    """The SmolLM2 notebook runs minutes on a CPU, so it is committed with the outputs of a real run; here its
    recipe cell is validated and those outputs are checked for a completed search that lowered the loss."""
    import re

    import llmtune

    nb = nbformat.read(NOTEBOOKS / "smollm2-cpu.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    recipe_cell = code[0].source
    overrides = re.search(r"overrides=\[(.*?)\]\)", recipe_cell, re.S).group(1)
    recipe = llmtune.load_recipe(NOTEBOOKS.parent / "recipes" / "smollm2-chat-cpu.yaml",
                                 [o.strip().strip('"') for o in overrides.split(",") if o.strip()])
    assert recipe.model.name == "llmtune/smollm2-135m" and recipe.data.format == "chat"
    text = {c.source.splitlines()[0]: _text(c) for c in code}
    assert "SearchResult(study='smollm2-chat-cpu', trials=3" in text["result = llmtune.search(recipe)"]
    before, after = map(float, re.search(r"eval loss ([\d.]+) \(untrained\) -> ([\d.]+)", text["best = result.best"]).groups())
    assert after < before
