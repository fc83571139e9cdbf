"""Deliver a trial's adapter: export it as a PEFT folder with a model card, and push that folder to the Hub.

Tokenizer files: llmtune never changes the tokenizer or the vocabulary, so an adapter of a Hub base
works with the base's own tokenizer and the export leaves it out. When the base is *not* a Hub
repository (a local folder, or the built-in ``llmtune/tiny``), users of the export could not get the
tokenizer anywhere else, so it is copied in. ``tokenizer=True/False`` overrides the rule.

The Hub token comes from huggingface_hub (``HF_TOKEN``, then the ``hf auth login`` cache) and is only
ever handed to its client: it is not printed, logged, stored in the study or written to the export.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial

from llmtune.deliver.lineage import schedule_document
from llmtune.deliver.modelcard import hub_id, render_card
from llmtune.errors import HubError
from llmtune.study.attrs import DIR, FINGERPRINT, METRICS_KEY, REASON, SETTINGS, STATUS
from llmtune.trial.endings import COMPLETE

if TYPE_CHECKING:
    from llmtune.deliver.results import SearchResult

MARKER = "llmtune.json"  # provenance of an export, and its manifest: the files it wrote ("files")
# What an export of an llmtune before the manifest wrote (its llmtune.json has no "files"): all a re-export
# may remove of such a folder.
OLD_EXPORT_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md", MARKER,
                    "schedule.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Export:
    """What `export_adapter` wrote."""

    path: Path
    trial: int
    files: list[str] = field(default_factory=list)  # relative paths, sorted
    tokenizer_included: bool = False
    merged: bool = False


@dataclass
class Push:
    """What `push_to_hub` did (or, with dry_run, would do)."""

    export: Export
    repo_id: str
    revision: str | None
    private: bool
    dry_run: bool
    url: str | None = None
    commit_oid: str | None = None
    commit_url: str | None = None


def _with_adapter(result: SearchResult) -> list[int]:
    return [t.number for t in result.all_trials if (Path(t.user_attrs.get(DIR, "/nonexistent")) / "adapter").is_dir()]


def pick_trial(result: SearchResult, trial: int | None) -> tuple[FrozenTrial, Path]:
    """The trial to export (default: the search's chosen one) and its adapter folder."""
    numbers = _with_adapter(result)
    hint = f"trials with an adapter: {', '.join(map(str, numbers))}" if numbers else "no trial saved an adapter yet"
    trials = result.all_trials
    if trial is None:
        t = result.best
        if t is None:
            raise HubError(f"the search has no feasible completed trial, so none was chosen; pass --trial N ({hint})")
    else:
        if not 0 <= trial < len(trials):
            span = f"0-{len(trials) - 1}" if trials else "none"
            raise HubError(f"--trial {trial}: no such trial (the study has trials {span}); {hint}")
        t = trials[trial]
    status = t.user_attrs.get(STATUS, t.state.name.lower())
    adapter = Path(t.user_attrs.get(DIR, "/nonexistent")) / "adapter"
    if status != COMPLETE or not (adapter / "adapter_config.json").exists():
        why = f" ({t.user_attrs[REASON]})" if t.user_attrs.get(REASON) else ""
        raise HubError(f"--trial {t.number}: the trial ended {status!r}{why} and has no adapter; {hint}")
    return t, adapter


def _files(to: Path) -> set[str]:
    return {str(p.relative_to(to)) for p in to.rglob("*") if p.is_file() or p.is_symlink()}


def _manifest(to: Path) -> list[str] | None:
    """The files an earlier export in `to` wrote, from its llmtune.json (None: `to` holds no llmtune export)."""
    try:
        found = json.loads((to / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict) or "llmtune_version" not in found:
        return None  # a file of that name that llmtune did not write
    files = found.get("files")
    if files is None:  # an export written before the manifest
        return [*OLD_EXPORT_FILES, *TOKENIZER_FILES]
    return [f for f in files if isinstance(f, str)] if isinstance(files, list) else None


def _remove_export(to: Path, files: list[str]) -> None:
    """Remove the files an earlier export wrote (and folders that leaves empty); never a file outside `to`."""
    root = to.resolve()
    for rel in files:
        path = to / rel
        if not path.resolve().is_relative_to(root) or path.resolve() == root:
            continue
        if path.is_file() or path.is_symlink():
            path.unlink()
        parent = path.parent
        while parent.resolve() != root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


def _prepare_dir(to: Path) -> set[str]:
    """Create `to`. In a folder an earlier export wrote, only the files its manifest lists are removed (a file
    a user added stays); any other non-empty folder is refused. Returns the files left there: not this export's."""
    if to.exists() and not to.is_dir():
        raise HubError(f"export folder {str(to)!r} is a file; give a folder")
    if to.is_dir() and any(to.iterdir()):
        earlier = _manifest(to)
        if earlier is None:
            raise HubError(f"export folder {str(to)!r} is not empty and not an llmtune export (it has no {MARKER} "
                           "written by llmtune export), so nothing was written or removed; give a new or empty folder")
        _remove_export(to, earlier)
    to.mkdir(parents=True, exist_ok=True)
    return _files(to)


def _write_manifest(to: Path, kept: set[str], provenance: dict[str, Any]) -> list[str]:
    """Write llmtune.json: the provenance and the files this export wrote (all but `kept`); returns them."""
    files = sorted((_files(to) - kept) | {MARKER})
    (to / MARKER).write_text(json.dumps({**provenance, "files": files}, indent=2, default=str))
    return files


def _copy_tokenizer(result: SearchResult, to: Path) -> None:
    from llmtune.harness.model import resolved_model_path

    src = Path(resolved_model_path(result.recipe.model))
    if src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, to / name)
        return
    from transformers import AutoTokenizer  # a Hub base asked for explicitly: the cached tokenizer

    AutoTokenizer.from_pretrained(result.recipe.model.name, revision=result.recipe.model.revision).save_pretrained(to)


def _merge(result: SearchResult, t: FrozenTrial, adapter: Path, to: Path) -> None:
    settings = t.user_attrs.get(SETTINGS) or {}
    q = settings.get("quantization", "none")
    if q != "none":
        raise HubError(f"--merge: trial {t.number} trained on a {q} base; merging LoRA weights into quantized weights "
                       "is lossy and not supported. Export the adapter alone (drop --merge), or load the base in 16-bit, "
                       "apply the adapter with peft and call merge_and_unload() yourself")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmtune.harness.model import DTYPES, resolved_model_path

    cfg = result.recipe.model
    dtype = DTYPES.get(cfg.dtype, torch.float32)  # auto on CPU = float32, as the trial ran
    base = AutoModelForCausalLM.from_pretrained(resolved_model_path(cfg), revision=cfg.revision, dtype=dtype,
                                                trust_remote_code=cfg.trust_remote_code)
    PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().save_pretrained(to / "merged")


def _versions(trial_dir: Path) -> dict[str, str]:
    """Library versions the trial ran with (its result.json), else the installed ones."""
    from importlib.metadata import PackageNotFoundError, version

    from llmtune.trial.result import TrialResult

    try:
        found = dict(TrialResult.load(trial_dir / "result.json").info.get("versions") or {})
    except (OSError, ValueError, TypeError):
        found = {}
    for pkg in ("peft", "transformers", "torch"):
        if pkg not in found:
            try:
                found[pkg] = version(pkg)
            except PackageNotFoundError:
                pass
    found.pop("llmtune", None)
    return {k: str(v) for k, v in found.items()}


def export_adapter(result: SearchResult, output_dir: str | Path, trial: int | None = None,
                   merge: bool = False, tokenizer: bool | None = None, repo_id: str | None = None) -> Export:
    """Write a trial's adapter (default: the chosen one) as a PEFT folder with a model card.

    Files: adapter_config.json, adapter_model.safetensors, README.md (model card), llmtune.json
    (provenance), the tokenizer when the base is not on the Hub (see the module doc), and with
    ``merge`` a full merged model under merged/ (16/32-bit bases only).
    """
    t, adapter = pick_trial(result, trial)
    to = Path(output_dir)
    kept = _prepare_dir(to)
    from llmtune import __version__

    try:
        files = _export_files(result, t, adapter, to, merge=merge, tokenizer=tokenizer, repo_id=repo_id)
    except BaseException:  # what was written so far is listed, so that the export can be redone in place
        _write_manifest(to, kept, {"llmtune_version": __version__, "complete": False})
        raise
    include_tok, provenance = files
    written = _write_manifest(to, kept, provenance)
    return Export(path=to, trial=t.number, files=written, tokenizer_included=include_tok, merged=merge)


def _export_files(result: SearchResult, t: FrozenTrial, adapter: Path, to: Path, *, merge: bool,
                  tokenizer: bool | None, repo_id: str | None) -> tuple[bool, dict[str, Any]]:
    """Write the export's files but llmtune.json; returns whether the tokenizer is in, and the provenance."""
    from llmtune import __version__

    for f in adapter.iterdir():
        if f.is_file() and f.name != "README.md":  # peft's generic card is replaced by ours
            shutil.copy2(f, to / f.name)
    # Point the config at the base as the recipe names it (not this machine's cache path).
    cfg_path = to / "adapter_config.json"
    config = json.loads(cfg_path.read_text())
    config["base_model_name_or_path"] = result.recipe.model.name
    if result.recipe.model.revision:
        config["revision"] = result.recipe.model.revision
    cfg_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    include_tok = hub_id(result.recipe.model.name) is None if tokenizer is None else tokenizer
    if include_tok:
        _copy_tokenizer(result, to)
    if merge:
        _merge(result, t, adapter, to)
    lora = {k: sorted(config[k]) if isinstance(config[k], list) else config[k]
            for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora") if k in config}
    (to / "README.md").write_text(render_card(result, t, repo_id=repo_id, versions=_versions(adapter.parent),
                                              tokenizer_included=include_tok, lora=lora), encoding="utf-8")
    schedule = schedule_document(t, result.study.user_attrs.get(FINGERPRINT, {}).get("recipe_fingerprint"))
    if schedule is not None:  # a PBT member: its settings per segment, for `llmtune train --schedule`
        (to / "schedule.json").write_text(json.dumps(schedule, indent=2, default=str))
    return include_tok, {
        "trial": t.number, "study": result.study.study_name, "base_model": result.recipe.model.name,
        "selected_by": result.recipe.select.by, "chosen": result.best is not None and result.best.number == t.number,
        "settings": t.user_attrs.get(SETTINGS), "metrics": t.user_attrs.get(METRICS_KEY),
        "llmtune_version": __version__}


def check_repo_id(repo_id: str | None) -> str:
    if not repo_id:
        raise HubError("--repo-id is missing: give user/name (or set hub.repo_id in the recipe)")
    if not REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")) or len(repo_id) > 96:
        raise HubError(f"--repo-id {repo_id!r} is not a Hub repository id; use user/name or org/name "
                       "(letters, digits, '-', '_', '.'), e.g. alice/qwen-lora")
    return repo_id


def _mask(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)


def push_to_hub(result: SearchResult, repo_id: str | None = None, *, private: bool | None = None,
                trial: int | None = None, revision: str | None = None, dry_run: bool = False,
                token: str | None = None, output_dir: str | Path | None = None, endpoint: str | None = None,
                commit_message: str | None = None) -> Push:
    """Export a trial's adapter (default: the chosen one) and upload the folder to the Hub in one commit.

    repo_id / private / revision default to the recipe's ``hub:`` section. The repository is created if
    missing; a private push onto an existing public repository is refused (it would publish the adapter).
    ``revision`` names a branch (created from main if missing). ``dry_run`` exports and lists
    the files without contacting the Hub. ``output_dir``: where to export first (default
    <the search's output_dir>/export/trial-NNNN). On failure the export stays on disk and the error says where.
    """
    hub = result.recipe.hub
    repo_id = check_repo_id(repo_id or hub.repo_id)
    private = hub.private if private is None else private
    revision = revision or hub.revision
    t, _ = pick_trial(result, trial)
    to = Path(output_dir) if output_dir else Path(result.recipe.output_dir) / "export" / f"trial-{t.number:04d}"
    export = export_adapter(result, to, trial=t.number, repo_id=repo_id)
    push = Push(export=export, repo_id=repo_id, revision=revision, private=private, dry_run=dry_run)
    if dry_run:
        return push
    import huggingface_hub
    from huggingface_hub import CommitOperationAdd, HfApi

    kept = f"the export is kept at {export.path}; run the push again when fixed"
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise HubError(f"HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to push ({kept})")
    token = token or huggingface_hub.get_token()
    if not token:
        raise HubError(f"no Hugging Face token: set HF_TOKEN or run `hf auth login` ({kept})")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        # create_repo leaves a repository that already exists as it is: a public one would publish the adapter.
        if private and api.repo_info(repo_id, repo_type="model").private is False:
            raise HubError(f"{repo_id} already exists on the Hub and is public, but this push is private "
                           "(--private, or hub.private: true, the default); nothing was uploaded. Make the repository "
                           f"private first (HfApi().update_repo_settings({repo_id!r}, private=True), or its Settings "
                           "page on the Hub), or push it as public (--public, or hub.private: false), or push to "
                           f"another --repo-id ({kept})")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(export.path / f)) for f in export.files]
        info = api.create_commit(repo_id, operations=ops, revision=revision,
                                 commit_message=commit_message or f"llmtune: adapter of trial {t.number} ({result.study.study_name})")
    except HubError:
        raise
    except Exception as e:  # HTTP errors, refused connections, bad metadata: one message, token masked
        raise HubError(f"push to {repo_id} failed: {_mask(f'{type(e).__name__}: {e}', token)} ({kept})", code=1) from None
    push.url, push.commit_oid, push.commit_url = str(url), info.oid, info.commit_url
    return push


__all__ = ["export_adapter", "push_to_hub", "pick_trial", "check_repo_id", "Export", "Push"]
