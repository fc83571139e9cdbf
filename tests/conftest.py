"""Shared test setup: offline, CPU, one tiny-model cache per test session."""

from __future__ import annotations

import os

# No test may touch the network: the Hub clients must take their offline paths.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU tests stay on CPU even where a GPU exists

import pytest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # One cache for the whole session (the tiny model is built once, ~1-2 min); LLMTUNE_HOME wins.
    if "LLMTUNE_HOME" not in os.environ:
        import tempfile

        os.environ["LLMTUNE_HOME"] = tempfile.mkdtemp(prefix="llmtune-home-")
    os.environ.setdefault("HF_HOME", os.path.join(os.environ["LLMTUNE_HOME"], "hf-home"))


@pytest.fixture(scope="session")
def tiny_model_path():
    from llmtune.builtin.tiny import ensure_tiny_model

    return ensure_tiny_model(log=None)


@pytest.fixture(scope="session")
def tiny_data_path():
    from llmtune.builtin.tiny import ensure_tiny_data

    return ensure_tiny_data(log=None)


def tiny_recipe_dict(tmp_path, **sections):
    """A small, fast recipe on the tiny model; sections override the defaults."""
    base = {
        "name": "test",
        "model": {"name": "llmtune/tiny"},
        "data": {"source": "llmtune/tiny-tasks", "eval_max_length": 192, "max_eval_examples": 48,
                 "max_train_examples": 600},
        "train": {"budget": {"examples": 96}, "eval_points": 2, "eval_batch_size": 16},
        "measure": {"latency_prompts": 2, "max_new_tokens": 4},
        "search": {"learning_rate": 2e-3, "lora_r": 8, "sequence_len": 128, "micro_batch_size": 8,
                   "lora_target_modules": "all-linear", "lora_dropout": 0.0},
        "objectives": {"eval_loss": "minimize", "peak_memory_gb": "minimize"},
        "study": {"n_trials": 2, "trial_timeout": 300},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def resumable_recipe(tmp_path, **sections):
    """The tiny recipe with one fixed configuration (dropout on, no latency, one eval point): a run that is cut
    and resumed (PBT segments, a paused trial continued) must equal the run that was never cut."""
    from llmtune.config.recipe import recipe_from_dict

    base = {"train": {"budget": {"examples": 96}, "eval_points": 1, "threads": 1},
            "measure": {"latency": False}, "search": {"learning_rate": 2e-3, "lora_r": 8, "sequence_len": 128,
                                                       "micro_batch_size": 8, "lora_dropout": 0.1}}
    base.update(sections)
    return recipe_from_dict(tiny_recipe_dict(tmp_path, **base))


@pytest.fixture()
def pg_url() -> str:
    """The test PostgreSQL server's URL (LLMTUNE_TEST_POSTGRES_URL, which .ci/run sets), or a skip."""
    from llmtune.study.storage import mask_url

    url = os.environ.get("LLMTUNE_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("LLMTUNE_TEST_POSTGRES_URL is not set; .ci/run starts a throwaway PostgreSQL server and sets it")
    try:
        import psycopg2

        psycopg2.connect(url, connect_timeout=5).close()
    except ImportError:
        pytest.skip("psycopg2 is not installed: pip install psycopg2-binary")
    except Exception as e:
        pytest.skip(f"no PostgreSQL server reachable at {mask_url(url)}: {type(e).__name__}")
    return url
