"""A corpus of broken recipes and data files: `validate` and `search` each refuse every one before any trial,
with one message (exit 2, no traceback) that names the field and the bad value, and write nothing.

Each case is the tiny test recipe (`conftest.tiny_recipe_dict`) with what breaks it: a section override, a data
file from ``tests/malformed/``, an environment variable, command-line arguments or the recipe's raw YAML.
In the strings, ``{m}`` is the ``tests/malformed`` folder and ``{tmp}`` the test's own temporary folder.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from conftest import tiny_recipe_dict

from llmtune.cli import main

MALFORMED = Path(__file__).resolve().parent / "malformed"


@dataclass(frozen=True)
class Case:
    id: str
    sections: dict[str, Any] = field(default_factory=dict)   # overrides of the tiny recipe's sections
    expect: tuple[str, ...] = ()                                # substrings of the one error message
    absent: tuple[str, ...] = ()                                # what the message must not say
    env: dict[str, str | None] = field(default_factory=dict)  # None: the variable is unset
    argv: tuple[str, ...] = ()                                  # arguments of both commands
    search_argv: tuple[str, ...] = ()                           # arguments of search only
    commands: tuple[str, ...] = ("validate", "search")
    text: Callable[[str], str | bytes] | None = None            # the recipe file, from the YAML of the dict
    files: dict[str, str] = field(default_factory=dict)         # created under {tmp} first
    untouched: tuple[str, ...] = ()                             # paths (outside {tmp}) that must not appear
    patch: dict[str, Any] = field(default_factory=dict)         # attribute path -> replacement
    make: Callable[[Path], None] | None = None                  # makes under {tmp} what text cannot: a FIFO, a link


def data(source: str, **more: Any) -> dict[str, Any]:
    return {"data": {"source": source, **more}}


def with_search(**values: Any) -> dict[str, Any]:
    base = tiny_recipe_dict(Path("/unused"))["search"]
    return {"search": {**base, **values}}


ONE_OBJECTIVE = {"objectives": {"eval_loss": "minimize"}}
CPU_PACKS_4BIT = {"llmtune.hardware.bnb_cpu_packs_4bit": lambda: True}

# A "billion laughs": nine aliases, each nine of the one before: ~430 million strings once expanded.
ALIAS_BOMB = "".join(f"{k}: &{k} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
                     for p, k in zip(["", *"abcdefgh"], "abcdefghi", strict=True))
LLAMA_CONFIG = ('{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, '
                '"intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, '
                '"vocab_size": 128, "max_position_embeddings": 256}')
REMOTE_CONFIG = ('{"model_type": "llmtune-remote", "auto_map": {"AutoConfig": "configuration_x.XConfig", '
                 '"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}')
NO_GPU = {"llmtune.hardware.gpu_count": lambda: 0}
ANY_LIBRARY = {"llmtune.hardware.installed": lambda name: True}


def _gzip_rows(name: str) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        import gzip

        (tmp / name).write_bytes(gzip.compress((MALFORMED / "instruction.jsonl").read_bytes()))
    return make

CASES = [
    # ------------------------------------------------------------------------------------------- data files
    Case("data-missing-file", data("{m}/no-such.jsonl"), ("data.source", "no-such.jsonl", "does not exist")),
    Case("data-missing-folder", data("{tmp}/nowhere/"), ("data.source", "nowhere", "does not exist")),
    Case("data-empty-file", data("{m}/empty.jsonl"), ("data.source", "empty.jsonl", "no rows")),
    Case("data-blank-lines", data("{m}/blank-lines.jsonl"), ("data.source", "blank-lines.jsonl", "no rows")),
    Case("data-empty-array", data("{m}/empty-array.json"), ("data.source", "empty-array.json", "no rows")),
    Case("data-broken-json-array", data("{m}/broken-array.json"),
         ("data.source", "broken-array.json", "not valid JSON", "line 3")),
    Case("data-broken-jsonl-line-41", data("{m}/broken-line-41.jsonl"),
         ("data.source", "broken-line-41.jsonl", "line 41", "not valid JSON"), absent=("line 1 ",)),
    Case("data-not-utf8-jsonl", data("{m}/latin1.jsonl"), ("data.source", "latin1.jsonl", "not UTF-8", "line 11")),
    Case("data-not-utf8-csv", data("{m}/latin1.csv"), ("data.source", "latin1.csv", "not UTF-8", "line 2")),
    Case("data-one-row", data("{m}/one-row.jsonl"), ("data.source", "one-row.jsonl", "1 usable row", "data.eval_source")),
    Case("data-txt-file", data("{m}/notes.txt"), ("data.source", "notes.txt", "'.txt'", ".jsonl")),
    Case("data-folder-without-train", data("{m}/folder-without-train"),
         ("data.source", "folder-without-train", "'train'", "eval")),
    Case("data-scalar-json", data("{m}/scalar.json"), ("data.source", "scalar.json", "line 1", "a number")),
    Case("data-rows-are-arrays", data("{m}/rows-are-arrays.jsonl"),
         ("data.source", "rows-are-arrays.jsonl", "line 1", "list", "object")),
    Case("data-array-of-strings", data("{m}/strings.json"), ("data.source", "strings.json", "item 1", "a string")),
    Case("data-ragged-csv", data("{m}/ragged.csv"), ("data.source", "ragged.csv", "CSV")),
    Case("data-not-parquet", data("{m}/not-parquet.parquet"), ("data.source", "not-parquet.parquet", "parquet")),
    Case("data-empty-csv", data("{m}/no-header.csv"), ("data.source", "no-header.csv", "no rows")),
    Case("data-relative-missing-file", data("no-such-relative.jsonl"),
         ("data.source", "no-such-relative.jsonl", "does not exist", "looked for", os.getcwd())),
    Case("data-source-empty", data(""), ("data.source", "is empty")),
    Case("data-fifo", data("{tmp}/rows.jsonl"), ("data.source", "rows.jsonl", "named pipe"),
         absent=("does not exist",), make=lambda tmp: os.mkfifo(tmp / "rows.jsonl")),
    Case("data-symlink-loop", data("{tmp}/loop.jsonl"), ("data.source", "loop.jsonl", "symbolic link loop"),
         absent=("does not exist",), make=lambda tmp: (tmp / "loop.jsonl").symlink_to(tmp / "loop.jsonl")),
    Case("data-gzip-named-jsonl", data("{tmp}/rows.jsonl"), ("data.source", "rows.jsonl", "compressed (gz)", "gunzip"),
         absent=("UTF-8",), make=_gzip_rows("rows.jsonl")),
    Case("data-gz-file", data("{tmp}/rows.jsonl.gz"), ("data.source", "rows.jsonl.gz", "compressed (gz)", "'rows.jsonl'"),
         make=_gzip_rows("rows.jsonl.gz")),
    Case("data-source-unexpanded-variable", data("$LLMTUNE_TEST_DATA/instruction.jsonl"),
         ("data.source", "$LLMTUNE_TEST_DATA", "${LLMTUNE_TEST_DATA}", "only study.storage")),
    Case("data-hub-dataset-offline", data("nobody-llmtune/no-such-dataset"),
         ("data.source", "nobody-llmtune/no-such-dataset")),
    Case("eval-source-missing", data("{m}/instruction.jsonl", eval_source="{m}/no-such-eval.jsonl"),
         ("data.eval_source", "no-such-eval.jsonl", "does not exist"), absent=("check data.source",)),
    Case("eval-source-broken-line", data("{m}/instruction.jsonl", eval_source="{m}/broken-line-41.jsonl"),
         ("data.eval_source", "line 41")),
    Case("eval-source-empty", data("{m}/instruction.jsonl", eval_source="{m}/empty.jsonl"),
         ("data.eval_source", "empty.jsonl", "no rows")),
    Case("eval-split-missing", data("{m}/folder-without-train", train_split="eval", eval_split="test"),
         ("data.eval_split", "'test'")),
    # ------------------------------------------------------------------------------------------- data rows
    Case("rows-lack-output", data("{m}/answer-not-output.jsonl"),
         ("data.output_field", "'output'", "answer", "20 of 20")),
    Case("rows-lack-text", data("{m}/instruction.jsonl", format="text"),
         ("data.format", "'text'", "data.format: instruction")),
    Case("chat-rows-under-instruction", data("{m}/chat.jsonl"),
         ("data.format", "'messages'", "data.format: chat"), absent=("instruction_field",)),
    Case("chat-rows-under-text", data("{m}/chat.jsonl", format="text"), ("data.format", "data.format: chat")),
    Case("chat-tool-role-refused", data("{m}/chat-tool.jsonl", format="chat"), ("data.source", "'tool'", "row ", "chat-tool.jsonl")),
    Case("rows-mostly-without-output", data("{m}/mostly-no-output.jsonl"), ("'output'", "6 of 10", "more than half")),
    Case("rows-null-output", data("{m}/null-output.jsonl"), ("'output'", "10 of 10")),
    Case("chat-unknown-roles", data("{m}/unknown-roles.jsonl", format="chat"), ("unknown role", "'human'", "role 'user'")),
    Case("chat-no-assistant-turn", data("{m}/chat-no-assistant.jsonl", format="chat"),
         ("no assistant turn", "data.train_on")),
    Case("text-is-a-list", data("{m}/text-is-list.jsonl", format="text"), ("data.text_field", "a list in 'text'")),
    Case("messages-not-a-list", data("{m}/messages-not-list.jsonl", format="chat"), ("'messages'", "not a list")),
    Case("instruction-field-absent", data("{m}/instruction.jsonl", instruction_field="prompt"),
         ("data.instruction_field", "'prompt'")),
    Case("prompts-longer-than-every-sequence-len", data("{m}/long-prompts.jsonl"),
         ("search.sequence_len", "128", "no example keeps an answer token", "raise sequence_len")),
    Case("eval-prompts-longer-than-eval-max-length",
         data("{m}/instruction.jsonl", eval_source="{m}/long-prompts.jsonl"),
         ("data.eval_max_length", "192", "eval_loss would be computed on nothing"), absent=("search.sequence_len",)),
    # ------------------------------------------------------------------------------------------- data settings
    Case("data-format-unknown", data("{m}/instruction.jsonl", format="alpaca"),
         ("data.format", "'alpaca'", "did you mean 'instruction'")),
    Case("data-format-sharegpt", data("{m}/chat.jsonl", format="sharegpt"),
         ("data.format", "'sharegpt'", "did you mean 'chat'")),
    Case("data-eval-fraction", data("{m}/instruction.jsonl", eval_fraction=1.5), ("data.eval_fraction", "1.5")),
    Case("data-max-train-examples-zero", data("{m}/instruction.jsonl", max_train_examples=0),
         ("data.max_train_examples", "0")),
    # ------------------------------------------------------------------------------------------- storage
    Case("storage-bare-file-name", {"study": {"storage": "mystudy.db"}},
         ("study.storage", "'mystudy.db'", "sqlite:///")),
    Case("storage-unknown-scheme", {"study": {"storage": "foo://bar/x"}}, ("study.storage", "foo://bar/x")),
    Case("storage-unset-variable", {"study": {"storage": "${LLMTUNE_TEST_UNSET_URL}"}},
         ("study.storage", "LLMTUNE_TEST_UNSET_URL", "is not set"), env={"LLMTUNE_TEST_UNSET_URL": None}),
    Case("storage-unset-password", {"study": {"storage": "postgresql://u:${LLMTUNE_TEST_UNSET_PW}@127.0.0.1:1/x"}},
         ("study.storage", "LLMTUNE_TEST_UNSET_PW", "is not set"), env={"LLMTUNE_TEST_UNSET_PW": None}),
    Case("storage-server-down", {"study": {"storage": "postgresql://u:pw-s3cret@127.0.0.1:1/x"}},
         ("study.storage", "postgresql://u:***@127.0.0.1:1/x", "reachable"), absent=("pw-s3cret",)),
    Case("storage-missing-driver", {"study": {"storage": "postgresql+pg8000://u:p@127.0.0.1:1/x"}},
         ("study.storage", "pg8000", "pip install")),
    Case("storage-sqlite-missing-folder", {"study": {"storage": "sqlite:///{tmp}/no-such-folder/study.db"}},
         ("study.storage", "no-such-folder", "does not exist")),
    Case("storage-sqlite-under-a-file", {"study": {"storage": "sqlite:///{tmp}/file.txt/study.db"}},
         ("study.storage", "file.txt", "is a file"), files={"file.txt": "x"}),
    Case("storage-sqlite-not-a-database", {"study": {"storage": "sqlite:///{m}/study-not-sqlite.db"}},
         ("study.storage", "study-not-sqlite.db", "not a SQLite database")),
    Case("storage-env-not-a-url", env={"LLMTUNE_STORAGE": "mystudy.db"}, expect=("LLMTUNE_STORAGE", "'mystudy.db'")),
    Case("storage-flag-unknown-scheme", search_argv=("--storage", "foo://bar/x"), commands=("search",),
         expect=("--storage", "foo://bar/x")),
    Case("storage-sqlite-in-memory", {"study": {"storage": "sqlite:///:memory:"}},
         ("study.storage", ":memory:", "in memory", "sqlite:///")),
    Case("storage-unbraced-unset-variable", {"study": {"storage": "postgresql://u:$LLMTUNE_TEST_UNSET_PW@127.0.0.1:1/x"}},
         ("study.storage", "LLMTUNE_TEST_UNSET_PW", "is not set"), env={"LLMTUNE_TEST_UNSET_PW": None}),
    Case("heartbeat-grace-not-a-number", env={"LLMTUNE_HEARTBEAT_GRACE": "abc"},
         expect=("LLMTUNE_HEARTBEAT_GRACE", "'abc'")),
    Case("heartbeat-grace-too-short", env={"LLMTUNE_HEARTBEAT_GRACE": "10"},
         expect=("LLMTUNE_HEARTBEAT_GRACE=10", "twice")),
    Case("heartbeat-interval-zero", env={"LLMTUNE_HEARTBEAT_INTERVAL": "0"}, expect=("LLMTUNE_HEARTBEAT_INTERVAL", "'0'")),
    # ------------------------------------------------------------------------------------------- study, space
    Case("sampler-cmaes-several-objectives", {"study": {"sampler": "cmaes"}, **with_search(learning_rate={"low": 1e-4, "high": 1e-2})},
         ("study.sampler", "cmaes", "objective")),
    Case("sampler-grid-float-range", {"study": {"sampler": "grid"}, **with_search(learning_rate={"low": 1e-4, "high": 1e-2})},
         ("study.sampler", "grid", "learning_rate")),
    Case("sampler-bayes", {"study": {"sampler": "bayes"}}, ("study.sampler", "'bayes'", "did you mean 'tpe'"),
         absent=("cmaes'?",)),
    Case("sampler-typo", {"study": {"sampler": "nsga"}}, ("study.sampler", "'nsga'", "did you mean 'nsga2'")),
    Case("pruner-typo", {"study": {"pruner": "ashaa"}}, ("study.pruner", "'ashaa'", "did you mean 'asha'")),
    Case("n-trials-zero-in-recipe", {"study": {"n_trials": 0}}, ("study.n_trials", "0")),
    Case("optimizer-adam", {"train": {"optimizer": "adam"}}, ("train.optimizer", "'adam'", "did you mean 'adamw_torch'"),
         absent=("adamw_8bit'?",)),
    Case("budget-missing", {"train": {"budget": {}}}, ("train.budget", "exactly one")),
    Case("lora-r-zero", with_search(lora_r=0), ("search.lora_r", "0", "at least 1")),
    Case("lora-r-not-a-number", with_search(lora_r="sixteen"), ("search.lora_r", "'sixteen'")),
    Case("learning-rate-range-inverted", with_search(learning_rate={"low": 1e-3, "high": 1e-5}),
         ("search.learning_rate", "0.001", "1e-05")),
    Case("search-unknown-setting", with_search(lora_rank=8), ("search.lora_rank", "did you mean 'lora_r'")),
    Case("quantization-nf4", with_search(quantization="nf4"), ("search.quantization", "'nf4'", "did you mean '4bit'")),
    Case("objective-unknown", {"objectives": {"accuracy": "maximize"}}, ("objectives.accuracy", "unknown metric")),
    Case("objective-list-repeats", {"objectives": ["eval_loss", "eval_loss"]}, ("objectives.eval_loss", "2 times", "once")),
    Case("objective-not-measured", {"objectives": {"eval_loss": "minimize", "latency_ms": "minimize"},
                                    "measure": {"latency": False}}, ("objectives.latency_ms", "measure.latency")),
    Case("constraint-not-measured", {"constraints": {"ttft_ms": {"max": 50}}, "measure": {"latency": False}},
         ("constraints.ttft_ms", "not measured", "measure.latency")),
    Case("select-weight-negative", {"select": {"by": "knee", "weights": {"eval_loss": -1}}},
         ("select.weights.eval_loss", "-1", ">= 0")),
    Case("quantization-yaml-no", expect=("search.quantization", "false", "YAML", "write none"),
         text=lambda y: y.replace("  lora_dropout: 0.0\n", "  lora_dropout: 0.0\n  quantization: no\n")),
    Case("lora-r-astronomical", with_search(lora_r=10**30), ("search.lora_r", "too large", "8,192"),
         absent=("c10", "C++")),
    Case("lora-alpha-huge", with_search(lora_alpha=1e308), ("search.lora_alpha", "too large"), absent=("diverged",)),
    Case("seed-too-large", {"train": {"seed": 2**70}}, ("train.seed", "1180591620717411303424", "2**32")),
    Case("weight-decay-infinite", {"train": {"weight_decay": float("inf")}}, ("train.weight_decay", "finite")),
    Case("max-grad-norm-nan", {"train": {"max_grad_norm": float("nan")}}, ("train.max_grad_norm", "NaN", "finite")),
    Case("study-timeout-nan", {"study": {"timeout": float("nan")}}, ("study.timeout", "NaN", "finite")),
    Case("trial-timeout-nan-text", {"study": {"trial_timeout": "nan"}}, ("study.trial_timeout", "'nan'", "finite")),
    Case("study-name-parent", {"study": {"study_name": "../.."}}, ("study.study_name", "'../..'", "plain name")),
    Case("study-name-absolute", {"study": {"study_name": "{tmp}/elsewhere"}}, ("study.study_name", "plain name")),
    Case("study-name-flag-empty", search_argv=("--study-name", ""), commands=("search",),
         expect=("--study-name", "''", "empty")),
    Case("threads-env-not-a-number", env={"LLMTUNE_THREADS": "abc"}, expect=("LLMTUNE_THREADS", "'abc'")),
    Case("threads-env-zero", env={"LLMTUNE_THREADS": "0"}, expect=("LLMTUNE_THREADS", "'0'")),
    Case("threads-env-negative", env={"LLMTUNE_THREADS": "-1"}, expect=("LLMTUNE_THREADS", "'-1'")),
    Case("objective-given-twice", {"objectives": {"eval_loss": "minimize", "loss": "minimize"}},
         ("objectives.loss", "eval_loss", "once")),
    Case("constraint-unknown-metric", {"constraints": {"accuracy": {"min": 0.5}}}, ("constraints.accuracy", "unknown")),
    Case("select-by-unknown", {"select": {"by": "speed"}}, ("select.by", "'speed'")),
    Case("unknown-section", {"trainer": {"epochs": 1}}, ("trainer", "did you mean 'train'")),
    Case("dtype-bf16", {"model": {"name": "llmtune/tiny", "dtype": "bf16"}},
         ("model.dtype", "'bf16'", "did you mean 'bfloat16'")),
    # ------------------------------------------------------------------------------------------- recipe files
    Case("yaml-duplicate-searched-key", expect=("search.lora_r", "line", "lora_r: [8, 16, 32]", "lora_r: 8"),
         text=lambda y: y.replace("  lora_r: 8\n", "  lora_r: [8, 16, 32]\n  lora_r: 8\n")),
    Case("yaml-duplicate-section", expect=("study", "twice", "line"),
         text=lambda y: y + "study:\n  n_trials: 50\n"),
    Case("yaml-syntax-error", expect=("not valid YAML", "line"), text=lambda y: y + "search: [unclosed\n"),
    Case("yaml-alias-bomb", expect=("aliases", "10,000 values", "write the values out"), text=lambda y: y + ALIAS_BOMB),
    Case("yaml-alias-loop", expect=("refers to", "infinite"), text=lambda y: y + "loop: &loop [1, *loop]\n"),
    Case("recipe-nul-byte", expect=("NUL byte", "line"), text=lambda y: (y + "description: a\x00b\n").encode()),
    Case("recipe-not-utf8", expect=("not UTF-8",), text=lambda y: (y + "description: caf\xe9\n").encode("latin-1")),
    Case("recipe-is-a-list", expect=("a recipe is a YAML mapping",), text=lambda y: "- model\n- data\n"),
    Case("recipe-empty", expect=("a recipe is a YAML mapping",), text=lambda y: ""),
    Case("set-bad-value", argv=("--set", "lora_r=abc"), expect=("search.lora_r", "'abc'")),
    Case("set-unknown-key", argv=("--set", "lora_rank=8"), expect=("lora_rank", "did you mean 'lora_r'")),
    # ------------------------------------------------------------------------------------------- model, machine
    Case("model-not-found", {"model": {"name": "nobody-llmtune/no-such-model"}},
         ("model.name", "'nobody-llmtune/no-such-model'")),
    Case("model-folder-without-config", {"model": {"name": "{m}/no-config-model"}}, ("model.name", "no-config-model")),
    Case("model-encoder-only", {"model": {"name": "{m}/bert"}}, ("model.name", "encoder-only", "bert", "decoder-only")),
    Case("model-encoder-decoder", {"model": {"name": "{m}/t5"}}, ("model.name", "encoder-decoder", "t5"),
         absent=("GPT2Config", "Model type should be one of", "search.lora_target_modules")),
    Case("model-folder-without-weights", {"model": {"name": "{tmp}/m"}}, ("model.name", "no weights", "config.json"),
         files={"m/config.json": LLAMA_CONFIG, "m/tokenizer_config.json": "{}"}),
    Case("model-remote-code-not-trusted", {"model": {"name": "{tmp}/remote"}},
         ("model.trust_remote_code", "set model.trust_remote_code: true"), files={"remote/config.json": REMOTE_CONFIG}),
    Case("train-device-cuda-without-gpu", {"train": {"device": "cuda"}}, ("train.device", "'cuda'", "no CUDA GPU")),
    Case("attention-flash-without-flash-attn", {"model": {"name": "llmtune/tiny", "attn_implementation": "flash_attention_2"}},
         ("model.attn_implementation", "flash")),
    Case("target-modules-the-model-lacks", with_search(lora_target_modules="c_attn,c_proj"),
         ("search.lora_target_modules", "c_attn")),
    Case("target-preset-typo", with_search(lora_target_modules="atention"),
         ("search.lora_target_modules", "did you mean 'attention'")),
    Case("quantization-4bit-odd-dims-on-cpu",
         {"model": {"name": "{m}/odd-dims-llama"}, "train": {"device": "cpu"}, **with_search(quantization="4bit")},
         ("search.quantization", "4bit", "q_proj", "40"), patch=CPU_PACKS_4BIT),
    Case("packing-bloom", {"model": {"name": "{m}/bloom"}, **with_search(sample_packing=True)},
         ("search.sample_packing", "bloom")),
    Case("liger-kernels-on-cpu", {"train": {"device": "cpu"}, **with_search(liger_kernels=[False, True])},
         ("search.liger_kernels", "Triton GPU kernels", "liger_kernels: false")),
    Case("liger-kernels-not-installed", with_search(liger_kernels=True),
         ("search.liger_kernels", "pip install 'liger-kernel"),
         patch={"llmtune.hardware.gpu_count": lambda: 1, "llmtune.hardware.installed": lambda name: name != "liger_kernel"}),
    Case("liger-kernels-for-an-architecture-it-lacks", with_search(liger_kernels=True),
         ("search.liger_kernels", "no kernels for llama models", "mistral"),
         patch={"llmtune.hardware.gpu_count": lambda: 1, "llmtune.hardware.liger_model_types": lambda: frozenset({"mistral"})}),
    Case("report-to-unknown", {"train": {"report_to": ["wandbb"]}}, ("train.report_to[0]", "'wandbb'")),
    Case("report-to-wandb-offline", {"train": {"report_to": ["wandb"]}}, ("train.report_to[0]", "WANDB_MODE=offline"),
         env={"WANDB_MODE": None}, patch=ANY_LIBRARY),
    # ------------------------------------------------------------------------------------------- where it writes
    Case("output-dir-under-a-file", {"output_dir": "{tmp}/file.txt/run"}, ("output_dir", "file.txt", "is a file"),
         files={"file.txt": "x"}),
    Case("output-dir-is-a-file", {"output_dir": "{tmp}/file.txt"}, ("output_dir", "file.txt", "is a file"),
         files={"file.txt": "x"}),
    Case("output-dir-unwritable", {"output_dir": "/proc/llmtune/run"}, ("output_dir", "/proc/llmtune/run"),
         untouched=("/proc/llmtune",)),
    Case("output-dir-flag-under-a-file", search_argv=("--output-dir", "{tmp}/file.txt/run"), commands=("search",),
         expect=("--output-dir", "file.txt", "is a file"), files={"file.txt": "x"}),
    Case("output-dir-flag-unwritable", search_argv=("--output-dir", "/proc/llmtune/run"), commands=("search",),
         expect=("--output-dir", "/proc/llmtune/run"), untouched=("/proc/llmtune",)),
    # ------------------------------------------------------------------------------------------- command line
    Case("n-trials-zero", search_argv=("--n-trials", "0"), commands=("search",), expect=("--n-trials", "0")),
    Case("n-trials-negative", search_argv=("--n-trials", "-1"), commands=("search",), expect=("--n-trials", "-1")),
    Case("workers-zero", search_argv=("--workers", "0"), commands=("search",), expect=("--workers", "0")),
    Case("workers-thousand", search_argv=("--workers", "1000"), commands=("search",), expect=("--workers", "1000", "64")),
    Case("gpus-without-a-gpu", search_argv=("--gpus", "99"), commands=("search",),
         expect=("--gpus 99", "no NVIDIA GPU"), patch=NO_GPU),
    Case("gpus-given-twice", search_argv=("--gpus", "0,0"), commands=("search",), expect=("--gpus", "GPU 0", "twice"),
         patch={"llmtune.hardware.gpu_count": lambda: 2}),
    Case("output-dir-flag-empty", search_argv=("--output-dir", ""), commands=("search",),
         expect=("--output-dir", "''", "empty")),
]


def _fill(value: Any, tmp: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{m}", str(MALFORMED)).replace("{tmp}", str(tmp))
    if isinstance(value, dict):
        return {k: _fill(v, tmp) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_fill(v, tmp) for v in value)
    return value


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every file under the roots with a hash of its bytes (folders too, as empty entries)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
    return out


class _PreflightPassed(Exception):
    pass


def test_the_corpus_is_large_and_its_ids_unique():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input_is_refused_before_any_trial(case, tmp_path, capfd, monkeypatch, tiny_model_path,
                                                     tiny_data_path):
    for name, value in case.env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    for target, replacement in case.patch.items():
        monkeypatch.setattr(target, replacement)

    def no_search(*args: Any, **kwargs: Any) -> None:
        raise _PreflightPassed  # the search loop is never reached: every case is refused before it

    monkeypatch.setattr("llmtune.study.loop.Search", no_search)
    for name, content in case.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    if case.make is not None:
        case.make(tmp_path)
    recipe = _fill(tiny_recipe_dict(tmp_path, **case.sections), tmp_path)
    path = tmp_path / "recipe.yaml"
    text = yaml.safe_dump(recipe, sort_keys=False)
    if case.text is not None:
        made = case.text(text)
        path.write_bytes(made if isinstance(made, bytes) else made.encode())
    else:
        path.write_text(text)
    before = _snapshot(tmp_path, MALFORMED)
    expect = [_fill(s, tmp_path) for s in case.expect]
    for command in case.commands:
        argv = [command, str(path), *_fill(case.argv, tmp_path)]
        if command == "search":
            argv += ["--quiet", *_fill(case.search_argv, tmp_path)]
        code = main(argv)
        out, err = capfd.readouterr()
        assert code == 2, f"{command}: exit {code}\n{out}\n{err}"
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, f"{command}: one error expected:\n{err}"
        assert "Traceback" not in out + err
        for s in expect:
            assert s in err, f"{command}: {s!r} not in:\n{err}"
        for s in case.absent:
            assert s not in err, f"{command}: {s!r} in:\n{err}"
        # nothing written: the folders are as they were, no output_dir, no study.db, no trials/
        assert _snapshot(tmp_path, MALFORMED) == before, command
        for p in case.untouched:
            assert not os.path.exists(p)
    assert not (tmp_path / "run").exists()


def test_messages_as_a_json_string_validate(tmp_path, capfd, tiny_model_path):
    """Not malformed: chat rows whose messages are a JSON string (as CSV cells are) are read as lists."""
    path = tmp_path / "recipe.yaml"
    recipe = tiny_recipe_dict(tmp_path, data={"source": str(MALFORMED / "chat-json-string.jsonl"), "format": "chat"})
    path.write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(path)]) == 0, capfd.readouterr().err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------- reading commands


@pytest.fixture
def finished_run(tmp_path, tiny_model_path, tiny_data_path):
    """The output_dir of a search with its study (llmtune's recipe stored, no trials): enough to report."""
    from llmtune.config.recipe import recipe_from_dict
    from llmtune.study.attrs import RECIPE
    from llmtune.study.storage import masked_recipe

    run = tmp_path / "done"
    run.mkdir()
    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path, output_dir=str(run)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{run / 'study.db'}", study_name="test",
                                directions=list(recipe.objectives.values()))
    study.set_user_attr(RECIPE, masked_recipe(recipe))
    return run


@pytest.mark.parametrize("command", ["search", "train", "report", "export"])
@pytest.mark.parametrize("where", ["under-a-file", "unwritable"])
def test_an_output_dir_that_cannot_be_made_is_one_message(command, where, tmp_path, capfd, finished_run,
                                                          monkeypatch):
    monkeypatch.setattr("llmtune.study.loop.Search", None)  # never reached
    (tmp_path / "file.txt").write_text("x")
    bad = str(tmp_path / "file.txt" / "run") if where == "under-a-file" else "/proc/llmtune/run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path)))
    target = [str(recipe)] if command in ("search", "train") else [str(finished_run)]
    before = _snapshot(tmp_path)
    assert main([command, *target, "--output-dir", bad]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1, err
    assert "--output-dir" in err and bad in err
    assert ("is a file" in err) if where == "under-a-file" else ("cannot be created" in err), err
    assert _snapshot(tmp_path) == before
    assert not os.path.exists("/proc/llmtune")


@pytest.mark.parametrize("url, expect", [
    ("postgresql://u:pw-s3cret@127.0.0.1:1/x", ("postgresql://u:***@127.0.0.1:1/x", "reachable")),
    ("postgresql+pg8000://u:pw-s3cret@127.0.0.1:1/x", ("pg8000", "pip install")),
    ("foo://bar/x", ("foo://bar/x",)),
    ("mystudy.db", ("'mystudy.db'", "does not exist")),
])
@pytest.mark.parametrize("command", ["report", "export"])
def test_reading_a_run_from_a_bad_storage_is_one_message(command, url, expect, tmp_path, capfd):
    argv = [command, url, "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1, err
    for s in expect:
        assert s in err, err
    assert "pw-s3cret" not in err
    assert not (tmp_path / "out").exists()


def test_reading_a_run_from_postgresql_with_a_wrong_password_or_database(capfd, tmp_path):
    """Against a real server (LLMTUNE_TEST_POSTGRES_URL): wrong password, missing database."""
    url = os.environ.get("LLMTUNE_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("LLMTUNE_TEST_POSTGRES_URL is not set; .ci/run starts a throwaway PostgreSQL server and sets it")
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    wrong_password = f"{scheme}://{user}:not-the-pw-s3cret@{host}"
    missing_db = f"{scheme}://{creds}@{host.rsplit('/', 1)[0]}/llmtune_no_such_db"
    for bad in (wrong_password, missing_db):
        assert main(["report", bad, "--output-dir", str(tmp_path / "out")]) == 2
        err = capfd.readouterr().err
        assert "Traceback" not in err and err.startswith("error: cannot open the study storage"), err
        assert "not-the-pw-s3cret" not in err and creds.partition(":")[2] not in err
