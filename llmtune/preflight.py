"""One preflight before any trial: what the recipe asks of the data, the model and this machine.

`validate`, `search` and `train` all run it (through the API), so a problem found here never costs a
trial. The recipe itself was checked when it was built (`config/recipe.py`); this looks outside it:

- the data: it loads, the train and eval splits are not empty, and every row of both is checked against
  ``data.format`` (`harness/formats.py`): bad rows are dropped and each reason comes back as a warning
  (count, first row numbers, fix), exactly as the trials will drop them; more than half bad is a problem.
  The check runs over every row, since the trial applies it to every row too (it costs less than reading
  the file). For ``chat`` the tokenizer's chat template is tried on one row per distinct sequence of roles
  among the first 100,000 rows (`PROBE_ROWS`, at most `PROBE_RENDERS` rows rendered), so a template that
  refuses a role (``tool``, ``system``) or an order is reported here, with the row, not in every trial.
  With a model that passed, the rows are tokenized as the trials will (`_tokens`, the first `TOKEN_ROWS`
  training rows and every eval row): a prompt that fills every ``sequence_len`` searched leaves nothing to
  train on, and an eval set without an answer token within ``data.eval_max_length`` would score 0 and win,
  so either is a problem; some such rows are a warning;
- the model: it is built first when it is a built-in (with progress, `_builtins`); it is found (a built-in, a local folder, or a Hub name in the local cache when offline), its
  config is read (a model with its own code needs ``model.trust_remote_code``), it is a decoder-only
  causal LM (not encoder-only, not encoder-decoder), a local folder holds weights, the config is
  instantiated on the meta device (no weights), and every LoRA target choice of the
  space is resolved against its own modules (`harness/targets.py`); MoE expert targets need dropout 0;
  the attention implementation is one the model supports (and its library is installed); with sample
  packing, a 1-layer random copy of the architecture shows whether it can keep packed examples apart;
- this machine: a CUDA device when ``train.device: cuda``; bitsandbytes when the space quantizes or the
  optimizer is 8-bit (and, for 4-bit on the CPU, layer shapes its CPU kernels can pack); the trackers
  ``train.report_to`` names (``wandb`` on an offline machine only with ``WANDB_MODE=offline``); a
  ``LLMTUNE_THREADS`` that is a whole number above 0;
- the metrics on generations: each user metric (``measure.metrics``, from an objective written
  ``{metric: 'module:function'}``) imports and takes (predictions, references, rows)
  (`harness/quality.py`); ``data.reference_source`` (forgetting's general text) is a readable file;
- where it writes, without writing: the output folder can be made (no file in its way, a file system that
  takes it); the study storage (``--storage``, ``LLMTUNE_STORAGE`` or ``study.storage``) is a URL whose
  ``${VARIABLES}`` are set, a SQLite file (not ``:memory:``) in an existing folder (and a SQLite database if it exists), or a
  database server that accepts a connection (nothing is created there); the heartbeat settings are numbers.

Every problem is collected and raised at once as one `RecipeError` (field, value, fix); what is worth
knowing but does not stop a search (rows dropped) is returned as warnings.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune import hardware
from llmtune.config.problems import shorten
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
    from llmtune.harness.optimizers import OPTIMIZERS
    from llmtune.harness.trackers import TRACKERS

    problems = []
    if recipe.train.device == "cuda" and not hardware.cuda_available():
        problems.append(Problem("train.device", "'cuda', but torch sees no CUDA GPU here; install a CUDA build of "
                                                "torch, or set train.device: auto (or cpu)"))
    quantized = [q for q in _options(recipe, "quantization") if q != "none"]
    needs_bnb = quantized or OPTIMIZERS[recipe.train.optimizer].eight_bit
    if needs_bnb and not hardware.installed("bitsandbytes"):
        what = f"search.quantization {quantized}" if quantized else f"train.optimizer {recipe.train.optimizer!r}"
        problems.append(Problem(what.split(" ")[0], f"{what.split(' ', 1)[1]} needs bitsandbytes: pip install bitsandbytes"))
    for i, name in enumerate(recipe.train.report_to):
        module = TRACKERS[name][0]
        if not hardware.installed(module):
            problems.append(Problem(f"train.report_to[{i}]", f"{name!r} is not installed: pip install {module}"))
        elif name == "wandb" and _offline() and os.environ.get("WANDB_MODE", "").lower() not in WANDB_LOCAL:
            problems.append(Problem(f"train.report_to[{i}]", "'wandb' sends each trial's logs to wandb.ai, and this "
                                    "machine is offline (HF_HUB_OFFLINE is set), so every trial would fail to start "
                                    "its run; export WANDB_MODE=offline (and wandb sync the runs later), or use "
                                    "tensorboard or mlflow, which write locally"))
    threads = os.environ.get("LLMTUNE_THREADS")
    if threads is not None and threads.strip() and not (threads.strip().isdigit() and int(threads) > 0):
        problems.append(Problem("LLMTUNE_THREADS", f"{threads!r} is not a whole number of threads above 0; export "
                                                   "LLMTUNE_THREADS=4 (say), or unset it for the cores this process "
                                                   "may use"))
    return problems


# WANDB_MODE values under which wandb writes locally and never connects.
WANDB_LOCAL = ("offline", "dryrun", "disabled")


def _offline() -> bool:
    """Whether this machine is offline, as the Hub client decides it (HF_HUB_OFFLINE), as `deliver/hub.py` does."""
    import huggingface_hub

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _data(recipe: Recipe, model: bool = True) -> tuple[list[Problem], list[str], str | None]:
    """The data's problems, the warnings about rows dropped, and the data's fingerprint. With ``model``, the
    rows are also tokenized as the trials will (`_tokens`)."""
    from llmtune.harness.data_sources import load_splits
    from llmtune.harness.formats import TooManyBadRows

    try:
        splits = load_splits(recipe.data)
    except TooManyBadRows as e:
        return e.problems, [], None
    except LlmtuneError as e:
        return [Problem(getattr(e, "field", "") or "data.source", str(e))], [], None
    problems = _chat_template(recipe, splits.train + splits.eval) if recipe.data.format == "chat" else []
    warnings = list(splits.warnings)
    if model and not problems:
        found, more = _tokens(recipe, splits.train, splits.eval)
        problems += found
        warnings += more
    return problems, warnings, splits.fingerprint


TOKEN_ROWS = 5_000  # training rows tokenized to see what sequence_len leaves of them (all eval rows are)


def _tokens(recipe: Recipe, train: list[dict[str, Any]], eval_rows: list[dict[str, Any]]) -> tuple[list[Problem], list[str]]:
    """Tokenize the rows as the trials will: an example whose answer starts past ``sequence_len`` (training)
    or ``data.eval_max_length`` (eval) keeps no token to learn from or score, and the trials drop it. None
    left is a problem (training would stop at once; an eval loss over no tokens would read 0 and win);
    some dropped is a warning."""
    from llmtune.harness.data import IGNORE, _encode_rows
    from llmtune.harness.model import load_tokenizer

    try:
        tokenizer = load_tokenizer(recipe.model)
    except Exception:  # noqa: BLE001 - `_model` (or `_chat_template`) says why the tokenizer cannot be read
        return [], []
    lengths = [int(v) for v in _options(recipe, "sequence_len")]
    longest, shortest = max(lengths), min(lengths)
    try:  # whole (no cut): where each answer starts, compared below with each length
        train_ex = _encode_rows(train[:TOKEN_ROWS], recipe.data, tokenizer, sys.maxsize)
        eval_ex = _encode_rows(eval_rows, recipe.data, tokenizer, sys.maxsize)
    except LlmtuneError:  # a row the chat template refuses: `_chat_template` reports it
        return [], []

    def starts(examples: list[Any]) -> list[int]:  # the position of the first token that carries loss
        return [next((i for i, t in enumerate(e.labels) if i > 0 and t != IGNORE), len(e.labels)) for e in examples]

    problems, warnings = [], []
    sampled = f"the first {len(train_ex):,}" if len(train) > len(train_ex) else f"all {len(train_ex):,}"
    train_starts = starts(train_ex)
    if train_starts and all(start >= longest for start in train_starts):
        problems.append(Problem("search.sequence_len", f"{_spec(recipe, 'sequence_len')}: in {sampled} training rows the "
                                f"prompt is {longest} tokens or longer (the shortest is {min(train_starts):,}), so no example "
                                "keeps an answer token to train on and every trial would stop at once; raise "
                                f"sequence_len above {min(train_starts):,}, or shorten the prompts"))
    elif cut := sum(start >= shortest for start in train_starts):
        warnings.append(f"search.sequence_len: at sequence_len {shortest}, {cut:,} of {sampled} training rows keep no "
                        "answer token (the prompt fills the context) and trials at that length drop them; raise "
                        "sequence_len to keep them")
    eval_starts = starts(eval_ex)
    limit = recipe.data.eval_max_length
    lost = sum(start >= limit for start in eval_starts)
    if eval_starts and lost == len(eval_starts):
        problems.append(Problem("data.eval_max_length", f"{limit}: {'every one of the' if len(eval_ex) > 1 else 'the'} "
                                f"{len(eval_ex):,} eval row{'s' if len(eval_ex) > 1 else ''} has a prompt of {limit} tokens or more (the shortest is {min(eval_starts):,}), so no answer "
                                "token is left to score and eval_loss would be computed on nothing; raise "
                                f"data.eval_max_length above {min(eval_starts):,}, or give shorter eval prompts"))
    elif lost:
        warnings.append(f"data.eval_max_length: {lost:,} of {len(eval_ex):,} eval rows keep no answer token within "
                        f"{limit} tokens and are left out of eval_loss; raise data.eval_max_length to score them")
    return problems, warnings


def _spec(recipe: Recipe, name: str) -> str:
    return recipe.space.specs[name].describe()


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
        if "trust_remote_code" in str(e) and not m.trust_remote_code:
            return [remote_code_problem(m.name)]
        why = shorten(" ".join(str(e).split()))
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
        config = AutoConfig.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except Exception as e:  # not found, offline without a cached copy, remote code refused, broken config
        if "trust_remote_code" in str(e) and not m.trust_remote_code:
            return None, [remote_code_problem(m.name)]
        why = shorten(" ".join(str(e).split()))
        return None, [Problem("model.name", f"{m.name!r} cannot be read ({type(e).__name__}: {why}); give a local "
                                           "folder, a Hub name that is cached here (or reachable online), or "
                                           "llmtune/tiny")]
    return config, _model_kind(m.name, config)


def remote_code_problem(name: str) -> Problem:
    """The model ships its own code, which runs only when the recipe allows it."""
    return Problem("model.trust_remote_code", f"false, and {name!r} ships its own model code (its config names it in "
                                              "auto_map), which transformers runs only when allowed; if you trust "
                                              "that code, set model.trust_remote_code: true")


def _model_kind(name: str, config: Any) -> list[Problem]:
    """llmtune tunes causal (decoder-only) language models: an encoder-decoder (T5, BART) or an encoder-only
    model (BERT, RoBERTa) has no causal LM to train, or one that sees the answer it predicts."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", "") or type(config).__name__
    fix = "give a decoder-only causal language model (Llama, Qwen, Mistral, GPT-2, SmolLM2, ...) or llmtune/tiny"
    if getattr(config, "is_encoder_decoder", False):
        return [Problem("model.name", f"{name!r} is an encoder-decoder model ({kind}); llmtune tunes decoder-only "
                                      f"causal language models; {fix}")]
    # Accepted: an encoder family configured as a decoder (is_decoder: true, e.g. a BERT turned causal for
    # generation): transformers builds it as a causal LM with a causal mask, so it trains as the others do.
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return [Problem("model.name", f"{name!r} is an encoder-only model ({kind}, trained to fill in masked tokens, "
                                      f"seeing the whole text); llmtune tunes decoder-only causal language models; {fix}")]
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "auto_map", None):
        return [Problem("model.name", f"{name!r} is a {kind} model, which this transformers cannot build as a causal "
                                      f"language model; {fix}")]
    return []


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5")


def _weights(name: str, path: str) -> list[Problem]:
    """A local model folder must hold weights (a config and a tokenizer alone would crash every trial)."""
    folder = Path(path).expanduser()
    if not folder.is_dir() or any(next(folder.glob(pattern), None) for pattern in WEIGHT_FILES):
        return []
    return [Problem("model.name", f"{name!r} is a folder with {', '.join(sorted(p.name for p in folder.iterdir())[:6])} "
                                  "but no weights (model.safetensors, pytorch_model.bin or their shards); copy the "
                                  "weights there (save_pretrained writes them), or give the Hub name")]


def _model(recipe: Recipe) -> list[Problem]:
    from llmtune.builtin.names import resolve_model_name
    from llmtune.harness.targets import (
        AttentionError,
        TargetError,
        attention_implementation,
        meta_model,
        packing_probe,
        resolve_targets,
    )

    config, problems = _model_config(recipe)
    if config is None or problems:  # not a causal LM: what follows would only repeat it
        return problems
    problems += _weights(recipe.model.name, resolve_model_name(recipe.model.name, log=None))
    try:
        attn = attention_implementation(config, recipe.model.attn_implementation)
    except AttentionError as e:
        problems.append(Problem("model.attn_implementation", str(e).removeprefix("model.attn_implementation: ")))
        attn = "eager"
    if attn.startswith("flash_attention") and not hardware.installed("flash_attn"):
        problems.append(Problem("model.attn_implementation", f"{attn!r} needs flash-attn: pip install flash-attn "
                                                             "(CUDA only), or use auto"))
    try:
        model = meta_model(config)
    except Exception as e:  # an architecture this transformers cannot build
        problems.append(Problem("model.name", f"{recipe.model.name!r}: transformers cannot build its model "
                                              f"({type(e).__name__}: {shorten(' '.join(str(e).split()))})"))
        return problems
    if True in _options(recipe, "sample_packing") and packing_probe(config, attn) == "none":
        problems.append(Problem("search.sample_packing", f"true, but {config.model_type} cannot keep packed examples "
                                "apart (its attention ignores position ids and takes no block mask); set "
                                "sample_packing: false"))
    problems += _cpu_4bit(recipe, model)
    problems += _liger(recipe, config.model_type)
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


def _on_cpu(recipe: Recipe) -> bool:
    return recipe.train.device == "cpu" or (recipe.train.device == "auto" and hardware.gpu_count() == 0)


def _liger(recipe: Recipe, model_type: str) -> list[Problem]:
    """`liger_kernels: true` needs a CUDA device (Triton kernels), the package, and kernels for the architecture."""
    if True not in _options(recipe, "liger_kernels"):
        return []
    fix = "or set liger_kernels: false"
    if _on_cpu(recipe):
        return [Problem("search.liger_kernels", "true, but Liger's kernels are Triton GPU kernels and this search trains "
                                                f"on the CPU (train.device {recipe.train.device!r}); train on a CUDA GPU, {fix}")]
    known = hardware.liger_model_types()
    if isinstance(known, str):
        return [Problem("search.liger_kernels", f"true, but {known}; {fix}")]
    if model_type not in known:
        usual = [t for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral") if t in known]
        return [Problem("search.liger_kernels", f"true, but Liger has no kernels for {model_type} models (it has them for "
                                                f"{len(known)} types: {', '.join(usual)}, ...); {fix}")]
    return []


def _cpu_4bit(recipe: Recipe, model: Any) -> list[Problem]:
    """On a CPU with AVX512-BF16, bitsandbytes repacks each 4-bit weight for its CPU kernel at the first
    evaluation, which needs out_features in blocks of 32 and an even in_features: other shapes crash every trial."""
    if "4bit" not in _options(recipe, "quantization") or not _on_cpu(recipe) or not hardware.bnb_cpu_packs_4bit():
        return []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    shapes: dict[tuple[int, int], str] = {}
    for name, module in model.named_modules():
        kind = type(module).__name__
        if module is head or kind not in ("Linear", "Conv1D"):
            continue
        in_f, out_f = (module.in_features, module.out_features) if kind == "Linear" else tuple(module.weight.shape)
        if out_f % 32 or in_f % 2:
            shapes.setdefault((in_f, out_f), name)
    if not shapes:
        return []
    shown = "; ".join(f"{name}: {i} inputs, {o} outputs" for (i, o), name in list(shapes.items())[:3])
    return [Problem("search.quantization", f"'4bit' on this CPU: bitsandbytes packs 4-bit weights for its CPU kernel "
                    f"in blocks of 32 outputs and pairs of inputs, and {recipe.model.name!r} has layers that do not fit "
                    f"({shown}), so every trial would crash at its first evaluation; use quantization none or 8bit "
                    "on the CPU, or train on a GPU")]


# ----------------------------------------------------------------------------------------- where it writes


def folder_problem(path: str | os.PathLike[str], field: str) -> Problem | None:
    """Why a folder cannot be made (or written) at ``path``, or None. Writes nothing that stays: a probe
    folder is made and removed where the first missing part of the path would go (tests run as root, for
    whom permissions never fail, so only a real attempt tells)."""
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        return Problem(field, f"{str(path)!r} is a file, not a folder; give a folder (new, or one llmtune wrote)")
    parent = p
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return Problem(field, f"{str(path)!r} cannot be created: {str(parent)!r} is a file, not a folder; give a "
                              "path whose parents are folders")
    try:
        tempfile.TemporaryDirectory(dir=parent, prefix=".llmtune-probe-").cleanup()
    except OSError as e:
        why = f"cannot be written ({e.strerror})" if parent == p else \
            f"cannot be created (writing in {str(parent)!r} fails: {e.strerror})"
        return Problem(field, f"{str(path)!r} {why}; give a folder you may write to, e.g. runs/NAME")
    return None


def storage_problem(url: str) -> str | None:
    """Why the study storage at ``url`` cannot be used, found without writing anything, or None."""
    from llmtune.study.storage import mask_url

    # os.path.expandvars (which the recipe and `storage_url` use) leaves unset variables as they are written
    unset = re.findall(r"\$\{(\w+)\}", url) + re.findall(r"\$([A-Z_][A-Z0-9_]*)\b", url)
    if unset:
        names = ", ".join(unset)
        return (f"{mask_url(url)!r} uses the environment variable{'s' if len(unset) > 1 else ''} {names}, which "
                f"{'are' if len(unset) > 1 else 'is'} not set here; export {unset[0]}=... before running, or write "
                "the value into the URL")
    if "://" not in url:
        example = url if url.endswith((".db", ".sqlite", ".sqlite3")) else "path/study.db"
        return (f"{url!r} is not a database URL; use sqlite:///{example} (a file) or "
                "postgresql://user:password@host:5432/db")
    if url.startswith("sqlite:"):
        return _sqlite_problem(url)
    import sqlalchemy

    from llmtune.study.storage import _with_driver, storage_error

    engine = None
    try:
        engine = sqlalchemy.create_engine(_with_driver(url), poolclass=sqlalchemy.pool.NullPool,
                                          connect_args={"connect_timeout": 10} if url.startswith("postgres") else {})
        with engine.connect():
            pass
    except (ImportError, ValueError, sqlalchemy.exc.SQLAlchemyError) as e:
        return storage_error(url, e)
    finally:
        if engine is not None:
            engine.dispose()
    return None


def _sqlite_problem(url: str) -> str | None:
    import sqlite3

    path = url.partition(":///")[2].partition("?")[0]
    if not path or path == ":memory:" or "mode=memory" in url:
        return (f"{url!r} is a database in memory: it lives inside one process, and a search needs one that its "
                "workers, its trial processes and a later resumed run share; give a file, e.g. "
                "sqlite:///runs/NAME/study.db, or leave study.storage out (a study.db in output_dir)")
    p = Path(path)
    if p.is_dir():
        return f"{path!r} is a folder; give a SQLite file, e.g. sqlite:///{path.rstrip('/')}/study.db"
    if p.is_file():
        db = None
        try:  # read-only: a check must not create tables, nor a journal
            db = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True)
            db.execute("select count(*) from sqlite_master").fetchone()
        except sqlite3.DatabaseError as e:
            return f"{path!r} is not a SQLite database ({e}); give a new file name, or the study.db of a search"
        finally:
            if db is not None:
                db.close()
    folder = p.absolute().parent
    if not folder.is_dir():
        shadow = next((a for a in folder.parents if a.exists()), None)
        if folder.exists() or (shadow is not None and not shadow.is_dir()):
            return f"{str(folder if folder.exists() else shadow)!r} is a file, not a folder; give a path in a folder"
        return (f"the folder {str(folder)!r} of the SQLite file does not exist; create it (mkdir -p {folder}) or give "
                "a file in an existing folder")
    problem = folder_problem(folder, "")
    return problem.message if problem else None


def _study(recipe: Recipe, storage: str | None) -> list[Problem]:
    """The storage the search would open (--storage, else LLMTUNE_STORAGE, else study.storage, as
    `study.storage.storage_url` picks it) and the heartbeat settings."""
    from llmtune.errors import SearchError
    from llmtune.study.storage import heartbeat_settings

    problems = []
    try:
        heartbeat_settings()
    except SearchError as e:
        problems.append(Problem("", str(e)))
    env = os.environ.get("LLMTUNE_STORAGE")
    field, url = (("storage (--storage)", storage) if storage else ("LLMTUNE_STORAGE", env) if env
                  else ("study.storage", recipe.study.storage))
    why = storage_problem(os.path.expandvars(url)) if url else None  # None: SQLite in output_dir, checked there
    if why:
        problems.append(Problem(field, why))
    return problems


@dataclass(frozen=True)
class Checked:
    """What a passed preflight found: warnings (bad rows the trials will drop: how many, why, which, the fix),
    and the data's fingerprint, so that the search need not load the data again to get it."""

    warnings: list[str]
    data_fingerprint: str | None


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _builtins(recipe: Recipe, log: Callable[[str], None] | None) -> None:
    """Build the built-in model and data the recipe names (once per cache), saying what is built and why:
    the first run may spend minutes here (the tiny model is pretrained on this CPU). A build that fails is
    reported by the checks that follow."""
    from llmtune.builtin.names import DATA, MODELS, resolve_data_source, resolve_model_name

    if log is None:
        return
    for name, table, resolve in ((recipe.model.name, MODELS, resolve_model_name),
                                 (recipe.data.source, DATA, resolve_data_source),
                                 (recipe.data.eval_source, DATA, resolve_data_source)):
        if name in table:
            try:
                resolve(name, log=log)
            except LlmtuneError:
                pass


def _quality(recipe: Recipe) -> list[Problem]:
    """User metrics that do not import or take the wrong arguments; a reference set that cannot be read."""
    from llmtune.harness.quality import metric_problem

    problems = []
    for name, spec in recipe.measure.metrics.items():
        why = metric_problem(spec)
        if why:
            path = f"objectives.{name}" if name in recipe.objectives else f"measure.metrics.{name}"
            problems.append(Problem(path, f"{why}; check that the module imports from here (or give "
                                          "'path/to/file.py:function') and what the function takes"))
    ref = recipe.data.reference_source
    if ref and not Path(ref).expanduser().is_file():
        problems.append(Problem("data.reference_source", f"{shorten(ref)!r} is not a file; give a .txt (one passage a "
                                                         "line) or .jsonl ('text' a line) file, or leave it unset"))
    return problems


def preflight(recipe: Recipe, *, data: bool = True, model: bool = True, study: bool = True,
              storage: str | None = None, output_dir: tuple[str, str] | None = None,
              log: Callable[[str], None] | None = _say) -> Checked:
    """Raise one `RecipeError` listing every problem the data, the model, this machine or the places it writes
    have with the recipe; return what it found (`Checked`).

    ``study``: also check the study storage (``storage`` as --storage gives it) and heartbeat settings.
    ``output_dir``: (folder, field) of where the command writes; default the recipe's output_dir.
    ``log``: where the one-time build of a built-in model or data set reports its progress (default stderr)."""
    _builtins(recipe, log)
    problems = _machine(recipe) + _quality(recipe)
    where = folder_problem(*(output_dir or (recipe.output_dir, "output_dir")))
    if where:
        problems.append(where)
    if study:
        problems += _study(recipe, storage)
    warnings: list[str] = []
    fingerprint = None
    model_problems = _model(recipe) if model else []
    if data:  # the rows are tokenized only with a model that passed: its tokenizer is then readable
        found, warnings, fingerprint = _data(recipe, model and not model_problems)
        problems += found
    problems += model_problems
    if problems:
        raise RecipeError(problems)
    return Checked(warnings, fingerprint)
