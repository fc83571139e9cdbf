"""Tests for llmtune.builtin.tiny and tiny_data: the self-built tiny model, tokenizer and instruction data.

The model is built once per session (by two concurrent processes, which doubles as the
locking test); everything else reuses it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: E402

from llmtune.builtin import cache, names, tiny, tiny_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MARKER = "llmtune-build.json"
# Runs in a fresh interpreter: offline from the start, with any network attempt doomed by a dead proxy.
BUILD_AND_LOAD = textwrap.dedent(
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmtune.builtin.tiny import ensure_tiny_model
    path = ensure_tiny_model()
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("The red fox sees 42 apples.", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == len(tok)
    print("RESULT", path)
    """
)


def _offline_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "LLMTUNE_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.update(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _format(row: dict[str, str]) -> str:
    """llmtune's instruction prompt format (the data is written to read naturally in it)."""
    prompt = f"### Instruction:\n{row['instruction']}\n\n"
    if row["input"]:
        prompt += f"### Input:\n{row['input']}\n\n"
    return prompt + "### Response:\n"


def _rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not os.environ.get("LLMTUNE_HOME"):
        os.environ["LLMTUNE_HOME"] = str(tmp_path_factory.mktemp("llmtune_home"))
    return Path(os.environ["LLMTUNE_HOME"])


@pytest.fixture(scope="session")
def model_build(tiny_home: Path) -> dict:
    """Build (or find) the session's model from two processes at once."""
    final = tiny_home / "tiny-model-v1"
    was_cached = (final / MARKER).is_file()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD_AND_LOAD],
            cwd=REPO,
            env=_offline_env(tiny_home),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=1200)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out
    return {"path": final, "outputs": outputs, "was_cached": was_cached}


@pytest.fixture(scope="session")
def model_dir(model_build: dict) -> Path:
    return model_build["path"]


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def data_dir(tiny_home: Path) -> Path:
    return tiny.ensure_tiny_data(log=None)


def test_llmtune_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMTUNE_HOME", str(tmp_path / "h"))
    assert cache.llmtune_home() == tmp_path / "h"
    monkeypatch.delenv("LLMTUNE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache.llmtune_home() == tmp_path / ".cache" / "llmtune"


def test_concurrent_build_gives_one_model(model_build: dict, tiny_home: Path) -> None:
    results = {
        line.split(" ", 1)[1]
        for out in model_build["outputs"]
        for line in out.splitlines()
        if line.startswith("RESULT ")
    }
    assert results == {str(model_build["path"])}
    builders = [out for out in model_build["outputs"] if "building llmtune/tiny in" in out]
    assert len(builders) == (0 if model_build["was_cached"] else 1)
    if builders:  # the log callback saw progress during the build
        assert "pretrain step" in builders[0] and "built tiny model" in builders[0]
    assert not list(tiny_home.glob(".tiny-model-v1.tmp-*")), "temp build dir left behind"
    info = json.loads((model_build["path"] / MARKER).read_text())
    assert info["params"] > 500_000


def test_model_is_gqa_llama_in_safetensors(model_dir: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    config = AutoConfig.from_pretrained(model_dir)
    assert config.model_type == "llama"
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.hidden_size == 128 and config.num_hidden_layers == 4
    assert config.max_position_embeddings >= 1024 and config.vocab_size == len(tokenizer)
    assert (model_dir / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= leaf_names
    assert model.model.layers[0].self_attn.k_proj.out_features == 64  # 2 kv heads x head_dim 32
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == ids
    gen = model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == ids
    assert len(set(ids)) == 3  # pad distinct from eos


def test_tokenizer_round_trips(tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert 1024 <= len(tokenizer) <= 2048
    texts = [
        "The red fox sees 42 apples.",
        "### Instruction:\nSort the numbers.\n\n### Input:\n3, 1, 2\n\n### Response:\n1, 2, 3",
        "Unseen: qwerty ZXCV {json: [1.5, -2]} \t tabs  double  spaces ~!@#$%^&*()",
    ]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id  # Llama-style: bos is prepended
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    # Task words were in the tokenizer's training text, so they are compact.
    assert len(tokenizer("The red fox sees 42 apples.", add_special_tokens=False)["input_ids"]) <= 8


def test_chat_template(tokenizer) -> None:  # type: ignore[no-untyped-def]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 plus 4?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.startswith(tokenizer.bos_token)
    for role in ("system", "user", "assistant"):
        assert f"<|{role}|>\n" in text
    assert "5" + tokenizer.eos_token in text and not text.endswith("<|assistant|>\n")
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in ids
    assert tokenizer.decode(ids) == prompt


def test_second_call_is_cache_hit(model_dir: Path) -> None:
    before = (model_dir / MARKER).stat().st_mtime_ns
    logs: list[str] = []
    start = time.perf_counter()
    assert tiny.ensure_tiny_model(log=logs.append) == model_dir
    assert time.perf_counter() - start < 1.0
    assert logs == [] and (model_dir / MARKER).stat().st_mtime_ns == before


def test_pretraining_happened(model_dir: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    docs = tiny_data.corpus_documents(random.Random(2024), 32)  # unseen documents, same style
    batch = tokenizer(docs, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    pretrained = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(0)
    fresh = LlamaForCausalLM(AutoConfig.from_pretrained(model_dir)).eval()
    with torch.no_grad():
        trained_loss = pretrained(**batch, labels=labels).loss.item()
        fresh_loss = fresh(**batch, labels=labels).loss.item()
    assert fresh_loss > 6.0  # ~ln(vocab): uniform guessing
    assert trained_loss < 3.5 and trained_loss < 0.5 * fresh_loss


def test_data_files_and_split(data_dir: Path) -> None:
    train, evals = _rows(data_dir / "train.jsonl"), _rows(data_dir / "eval.jsonl")
    assert 2500 <= len(train) <= 5000 and 200 <= len(evals) <= 500
    for row in train + evals:
        assert set(row) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) for v in row.values()) and row["instruction"] and row["output"]
    keys = {(r["instruction"], r["input"]) for r in train}
    assert len(keys) == len(train)
    assert not keys & {(r["instruction"], r["input"]) for r in evals}
    assert any(r["input"] == "" for r in train) and any(r["input"] for r in train)
    assert len({r["instruction"] for r in train}) >= 7  # several task families


def test_data_is_deterministic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    built = []
    for name in ("a", "b"):
        monkeypatch.setenv("LLMTUNE_HOME", str(tmp_path / name))
        built.append(tiny.ensure_tiny_data(log=None))
    assert built[0] != built[1]
    for fname in ("train.jsonl", "eval.jsonl"):
        assert (built[0] / fname).read_bytes() == (built[1] / fname).read_bytes()


def test_lengths_vary(data_dir: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    rows = _rows(data_dir / "train.jsonl")
    lengths = [len(tokenizer(_format(r) + r["output"] + tokenizer.eos_token)["input_ids"]) for r in rows]
    assert min(lengths) < 48 and max(lengths) > 256
    assert 0.05 < sum(n > 128 for n in lengths) / len(lengths) < 0.5
    assert max(lengths) <= 1024  # fits the model's positions


def test_resolve_names(model_dir: Path, data_dir: Path) -> None:
    assert names.resolve_model_name(names.TINY_MODEL, log=None) == str(model_dir)
    assert names.resolve_model_name("meta-llama/Llama-3.2-1B", log=None) == "meta-llama/Llama-3.2-1B"
    assert names.resolve_data_source(names.TINY_DATA, log=None) == str(data_dir)
    assert names.resolve_data_source("data/my.jsonl", log=None) == "data/my.jsonl"


def test_failed_build_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMTUNE_HOME", str(tmp_path))

    def broken(out: Path, log) -> dict:  # type: ignore[no-untyped-def]
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        cache.ensure_built("thing", broken, None)
    assert [p.name for p in tmp_path.iterdir()] == [".thing.lock"]

    def ok(out: Path, log) -> dict:  # type: ignore[no-untyped-def]
        (out / "done.txt").write_text("ok")
        return {}

    assert (cache.ensure_built("thing", ok, None) / "done.txt").read_text() == "ok"


def test_lock_serialises_processes(tmp_path: Path) -> None:
    """Two processes racing on a slow build: one builds, the other waits and reuses it."""
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from llmtune.builtin import cache
        def build(out, log):
            with open({str(tmp_path / "builds.txt")!r}, "a") as f:
                f.write("built\\n")
            time.sleep(1.5)
            (out / "x").write_text("x")
            return {{}}
        print(cache.ensure_built("slow", build, None))
        """
    )
    env = _offline_env(tmp_path / "home")
    procs = [
        subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] == str(tmp_path / "home" / "slow")
    assert (tmp_path / "builds.txt").read_text() == "built\n"
