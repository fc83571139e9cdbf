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
