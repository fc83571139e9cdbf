"""Export and push: the adapter round-trips through PEFT, the card parses, a push reaches a stand-in Hub.

One tiny search (module fixture) feeds every test. The "Hub" is an HTTP server on 127.0.0.1 that
speaks the few endpoints huggingface_hub's HfApi calls for create_repo / repo_info / create_branch /
create_commit; a guard on the client refuses any other host, so no test can reach the real Hub.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_recipe_dict

import llmtune
from llmtune import HubError, export_adapter, push_to_hub
from llmtune.cli import main
from llmtune.deliver.modelcard import read_card

TOKEN = "hf_FakeTokenForTests1234567890abcdef"
FAST = {
    "data": {"source": "llmtune/tiny-tasks", "eval_max_length": 128, "max_eval_examples": 16, "max_train_examples": 200},
    "train": {"budget": {"examples": 32}, "eval_points": 1},
    "measure": {"latency_prompts": 1, "max_new_tokens": 2},
}


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_model_path, tiny_data_path):
    tmp = tmp_path_factory.mktemp("hub")
    base = tiny_recipe_dict(tmp)
    data = tiny_recipe_dict(tmp, **FAST, search={**base["search"], "lora_r": [2, 8]},
                            study={"n_trials": 2, "sampler": "grid", "trial_timeout": 300})
    result = llmtune.search(data)
    assert result.best is not None
    return result


class FakeHub(BaseHTTPRequestHandler):
    """Just enough of the Hub API for HfApi.create_repo / repo_info / create_branch / create_commit.

    state["repos"] maps each repository that exists to whether it is private; a test may seed it."""

    state: dict[str, Any]

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        st = self.state
        st["requests"].append((self.command, self.path, self.headers.get("Authorization")))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._reply(401, {"error": "Invalid credentials"})
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}"
            if repo in st["repos"]:  # as the Hub answers: a conflict, which exist_ok=True accepts
                return self._reply(409, {"error": "You already created this model repo", "url": f"{st['base']}/{repo}"})
            st["created"].append(payload)
            st["repos"][repo] = payload.get("visibility") == "private"
            return self._reply(200, {"url": f"{st['base']}/{repo}"})
        if path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        parts = path.split("/")  # /api/models/<ns>/<name>/<op>/<rev>
        if len(parts) == 7 and parts[:3] == ["", "api", "models"]:
            repo, op, rev = f"{parts[3]}/{parts[4]}", parts[5], parts[6]
            if op == "preupload":
                files = json.loads(body)["files"]
                return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                   for f in files]})
            if op == "branch":
                st["branches"].append((repo, rev))
                return self._reply(200, {})
            if op == "commit":
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                files = {v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines if v["key"] == "file"}
                st["commits"].append({"repo": repo, "revision": rev, "header": lines[0]["value"], "files": files,
                                      "keys": [v["key"] for v in lines]})
                oid = f"{len(st['commits']):040x}"
                return self._reply(200, {"commitUrl": f"{st['base']}/{repo}/commit/{oid}", "commitOid": oid})
        st["unknown"].append(self.path)
        return self._reply(404, {"error": f"not implemented: {self.path}"})

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        st = self.state
        if self.path.split("?")[0] == "/api/agent-harnesses":
            # huggingface_hub's own registry fetch, once a process and without the token: no part of a push.
            # A 404 makes it give up without caching anything under HF_HOME.
            return self._reply(404, {"error": "not served here"})
        st["requests"].append((self.command, self.path, self.headers.get("Authorization")))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._reply(401, {"error": "Invalid credentials"})
        parts = self.path.split("?")[0].split("/")  # /api/models/<ns>/<name>[/revision/<rev>]
        if len(parts) in (5, 7) and parts[:3] == ["", "api", "models"]:
            repo = f"{parts[3]}/{parts[4]}"
            if repo not in st["repos"]:
                return self._reply(404, {"error": "Repository not found"})
            return self._reply(200, {"id": repo, "private": st["repos"][repo], "sha": "0" * 40})
        st["unknown"].append(self.path)
        return self._reply(404, {"error": f"not implemented: {self.path}"})


@pytest.fixture
def hub(monkeypatch):
    """A stand-in Hub on 127.0.0.1; offline mode lifted for the huggingface_hub client only while it runs."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.utils._http import hf_request_event_hook

    state: dict[str, Any] = {"requests": [], "created": [], "repos": {}, "branches": [], "commits": [], "unknown": []}
    handler = type("Hub", (FakeHub,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    state["base"] = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def loopback_only(request: Any) -> None:
        assert request.url.host == "127.0.0.1", f"test tried to reach {request.url}"

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", state["base"])
    huggingface_hub.set_client_factory(lambda: httpx2.Client(
        event_hooks={"request": [loopback_only, hf_request_event_hook]}, trust_env=False, timeout=30))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield state
    huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)
    server.shutdown()
    server.server_close()


def _no_token_anywhere(*roots: Path, text: str = "") -> None:
    assert TOKEN not in text
    for root in roots:
        for f in root.rglob("*"):
            if f.is_file():
                assert TOKEN.encode() not in f.read_bytes(), f


def test_exported_adapter_reproduces_the_recorded_eval_loss(searched, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmtune.harness import data as D
    from llmtune.harness import model as M
    from llmtune.harness.data_sources import load_splits
    from llmtune.harness.train import evaluate

    exp = searched.export(tmp_path / "exp")
    best = searched.best
    assert exp.trial == best.number
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= set(exp.files)
    config = json.loads((exp.path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "llmtune/tiny"  # the recipe's name, not this machine's cache path
    assert config["r"] == best.user_attrs["llmtune.settings"]["lora_r"]
    recipe = searched.recipe
    tok = M.load_tokenizer(recipe.model)
    examples, _ = D.encode_all(load_splits(recipe.data).eval, recipe.data, tok, recipe.data.eval_max_length)
    batches = D.eval_batches(examples, recipe.train.eval_batch_size, tok.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(M.resolved_model_path(recipe.model))
    model = PeftModel.from_pretrained(base, str(exp.path))
    loss = evaluate(model, batches, "cpu")
    recorded = best.user_attrs["llmtune.metrics"]["eval_loss"]
    assert loss == pytest.approx(recorded, abs=1e-4)
    assert loss < best.user_attrs["llmtune.curve"][0][1] - 0.1  # and it is the trained adapter, not the base


def test_model_card_front_matter_and_body(searched, tmp_path):
    other = next(t.number for t in searched.pareto_front if t.number != searched.best.number) \
        if len(searched.pareto_front) > 1 else searched.best.number
    exp = export_adapter(searched.recipe.output_dir, tmp_path / "card", trial=other)
    meta, body = read_card(exp.path / "README.md")
    assert meta["base_model"] == "llmtune/tiny" and meta["library_name"] == "peft"
    assert {"llmtune", "peft", "lora"} <= set(meta["tags"])
    t = searched.study.trials[other]
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["eval_loss"] == pytest.approx(t.user_attrs["llmtune.metrics"]["eval_loss"])
    assert metrics["peak_memory_gb"] == pytest.approx(t.user_attrs["llmtune.metrics"]["peak_memory_gb"])
    assert meta["llmtune"]["trial"] == other and meta["llmtune"]["version"] == llmtune.__version__
    lora_r = t.user_attrs["llmtune.settings"]["lora_r"]
    assert f"| lora_r | {lora_r} | yes |" in body
    assert "## Pareto front" in body and "## Search space" in body and "| lora_r | {2, 8} |" in body
    for p in searched.pareto_front:  # every front trial is a row of the table
        assert f"\n| {p.number} | " in body
    assert "## Recipe" in body and "source: llmtune/tiny-tasks" in body and str(searched.recipe.output_dir) not in body
    assert json.loads((exp.path / "llmtune.json").read_text())["trial"] == other


def test_push_sends_the_export_in_one_commit_and_never_leaks_the_token(searched, hub, tmp_path, capfd):
    out = Path(searched.recipe.output_dir)
    code = main(["push", str(out), "--repo-id", "alice/tiny-lora", "--revision", "experiments",
                 "--output-dir", str(tmp_path / "push")])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert hub["unknown"] == [] and len(hub["commits"]) == 1
    commit = hub["commits"][0]
    assert commit["repo"] == "alice/tiny-lora" and commit["revision"] == "experiments"
    assert hub["branches"] == [("alice/tiny-lora", "experiments")]
    assert hub["created"] == [{"name": "tiny-lora", "organization": "alice", "visibility": "private", "type": "model"}]
    exported = sorted(p.name for p in (tmp_path / "push").iterdir())
    assert sorted(commit["files"]) == exported and "adapter_model.safetensors" in exported
    for name, content in commit["files"].items():
        assert content == (tmp_path / "push" / name).read_bytes(), name
    assert "trial" in commit["header"]["summary"]
    assert "pushed 7 file(s)" in captured.out or f"pushed {len(exported)} file(s)" in captured.out
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in hub["requests"])  # the token went to the Hub, only there
    _no_token_anywhere(out, tmp_path, text=captured.out + captured.err)


def test_push_api_public_to_main_and_dry_run(searched, hub, tmp_path, capfd):
    dry = searched.push_to_hub("alice/dry", dry_run=True, output_dir=tmp_path / "dry")
    assert sorted(dry.export.files) == sorted(p.name for p in (tmp_path / "dry").iterdir())
    assert main(["push", searched.recipe.output_dir, "--repo-id", "alice/dry", "--public", "--dry-run",
                 "--output-dir", str(tmp_path / "dry")]) == 0
    listed = capfd.readouterr().out
    assert f"would upload {len(dry.export.files)} file(s)" in listed and "as public" in listed
    assert all(f"  {f}  (" in listed for f in dry.export.files)
    assert hub["requests"] == [] and dry.commit_oid is None
    done = push_to_hub(searched, "org/name.v2", private=False, output_dir=tmp_path / "real")
    assert done.commit_oid == f"{1:040x}" and hub["commits"][0]["revision"] == "main" and hub["branches"] == []
    assert hub["created"][0]["visibility"] == "public"


def test_push_failures_are_clear_and_keep_the_export(searched, hub, tmp_path, monkeypatch, capfd):
    import huggingface_hub

    out = Path(searched.recipe.output_dir)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert main(["push", str(out), "--repo-id", "alice/x", "--output-dir", str(tmp_path / "a")]) == 2
    err = capfd.readouterr().err
    assert "no Hugging Face token" in err and "HF_TOKEN" in err and str(tmp_path / "a") in err
    assert (tmp_path / "a" / "adapter_model.safetensors").exists() and hub["requests"] == []
    # Endpoint down: a closed port on loopback.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(HubError) as e:
        push_to_hub(out, "alice/x", token=TOKEN, endpoint=dead, output_dir=tmp_path / "b")
    msg = str(e.value)
    assert "push to alice/x failed" in msg and "Connect" in msg and str(tmp_path / "b") in msg and TOKEN not in msg
    assert e.value.code == 1 and (tmp_path / "b" / "README.md").exists()
    # A token the Hub refuses: the HTTP error is reported, the token is not.
    with pytest.raises(HubError) as e:
        push_to_hub(out, "alice/x", token=TOKEN + "x", output_dir=tmp_path / "c")
    assert "401" in str(e.value) and TOKEN not in str(e.value)
    # Offline mode is named as the cause.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_to_hub(out, "alice/x", token=TOKEN, output_dir=tmp_path / "d")


def test_private_push_onto_an_existing_public_repo_is_refused_and_uploads_nothing(searched, hub, tmp_path, capfd):
    hub["repos"].update({"alice/shared": False, "alice/secret": True})  # both exist: one public, one private
    with pytest.raises(HubError) as e:
        push_to_hub(searched, "alice/shared", private=True, revision="exp", output_dir=tmp_path / "a")
    msg = str(e.value)
    assert "alice/shared already exists on the Hub and is public" in msg and "nothing was uploaded" in msg
    assert "HfApi().update_repo_settings('alice/shared', private=True)" in msg and "--public" in msg
    assert e.value.code == 2 and str(tmp_path / "a") in msg and TOKEN not in msg
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()  # the export is kept for the next try
    # The CLI default is private (hub.private: true): the same refusal, one line, no traceback.
    out = str(searched.recipe.output_dir)
    assert main(["push", out, "--repo-id", "alice/shared", "--output-dir", str(tmp_path / "b")]) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: alice/shared already exists on the Hub and is public") and "Traceback" not in err
    assert hub["commits"] == [] and hub["branches"] == [] and hub["created"] == []
    assert hub["repos"]["alice/shared"] is False  # left as it was
    assert ("GET", "/api/models/alice/shared", f"Bearer {TOKEN}") in hub["requests"]
    # A private push onto an existing private repository goes ahead; so does a public push onto the public one.
    done = push_to_hub(searched, "alice/secret", private=True, output_dir=tmp_path / "c")
    assert done.commit_oid == f"{1:040x}" and hub["commits"][0]["repo"] == "alice/secret"
    assert main(["push", out, "--repo-id", "alice/shared", "--public", "--output-dir", str(tmp_path / "d")]) == 0
    assert [c["repo"] for c in hub["commits"]] == ["alice/secret", "alice/shared"]
    assert hub["created"] == [] and hub["unknown"] == []


@pytest.mark.parametrize("argv, expected", [
    (["export", "{missing}", "--output-dir", "{tmp}/x"], "does not exist"),
    (["export", "{out}", "--output-dir", "{tmp}/x", "--trial", "99"], "--trial 99: no such trial (the study has trials 0-1)"),
    (["push", "{out}", "--repo-id", "not a repo", "--dry-run"], "--repo-id 'not a repo' is not a Hub repository id"),
    (["push", "{out}", "--dry-run"], "--repo-id is missing"),
    (["export", "{out}", "--output-dir", "{out}"], "is not empty and not an llmtune export"),
], ids=["missing-dir", "unknown-trial", "bad-repo-id", "no-repo-id", "non-empty-target"])
def test_cli_errors(searched, tmp_path, capfd, argv, expected):
    fill = {"missing": str(tmp_path / "nope"), "tmp": str(tmp_path), "out": str(searched.recipe.output_dir)}
    assert main([a.format(**fill) for a in argv]) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: ") and expected in err and "Traceback" not in err


def test_cli_export_lists_files_and_refuses_unfinished_trials_and_quantized_merge(searched, tmp_path, capfd, monkeypatch):
    out = str(searched.recipe.output_dir)
    assert main(["export", out, "--output-dir", str(tmp_path / "e"), "--tokenizer", "no"]) == 0
    listed = capfd.readouterr().out
    assert "adapter_model.safetensors" in listed and "tokenizer.json" not in listed
    assert main(["export", out, "--to", str(tmp_path / "e")]) == 0  # an earlier export is replaced in place
    assert (tmp_path / "e" / "tokenizer.json").exists()
    # A trial that never finished, and 4-bit trials asked to merge (copies of the study's trials, edited).
    import copy

    import optuna

    trials = copy.deepcopy(searched.study.get_trials())
    for t in trials:
        t.user_attrs["llmtune.settings"]["quantization"] = "4bit"
    crashed = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params=trials[0].params,
                                        distributions=trials[0].distributions,
                                        user_attrs={"llmtune.status": "crashed", "llmtune.reason": "boom"})
    crashed.number = len(trials)
    monkeypatch.setattr(type(searched), "all_trials", property(lambda self: [*trials, crashed]))
    with pytest.raises(HubError, match=r"ended 'crashed' \(boom\) and has no adapter; trials with an adapter: 0, 1"):
        export_adapter(searched, tmp_path / "f", trial=crashed.number)
    with pytest.raises(HubError, match="4bit base; merging"):
        export_adapter(searched, tmp_path / "g", merge=True)


def test_merged_export_matches_the_adapter(searched, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmtune.harness.model import resolved_model_path

    exp = export_adapter(searched, tmp_path / "m", merge=True)
    assert exp.merged and (tmp_path / "m" / "merged" / "config.json").exists()
    path = resolved_model_path(searched.recipe.model)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), str(exp.path))(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "merged")(ids).logits
    assert torch.allclose(adapted, merged, atol=1e-4)


def test_model_card_recipe_does_not_publish_local_paths(tmp_path):
    from types import SimpleNamespace

    from conftest import tiny_recipe_dict

    from llmtune.config.recipe import recipe_from_dict
    from llmtune.deliver.modelcard import public_recipe

    data_file = tmp_path / "private-folder" / "train.jsonl"
    data_file.parent.mkdir()
    data_file.write_text('{"text": "a b c"}\n')
    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path, data={"source": str(data_file), "format": "text"}))
    shipped = public_recipe(SimpleNamespace(recipe=recipe))
    assert shipped["data"]["source"] == "train.jsonl"
    assert shipped["model"]["name"] == "llmtune/tiny"  # built-in names stay as they are
    assert "private-folder" not in str(shipped)


def test_export_and_push_pick_a_study_of_a_shared_storage_by_name(searched, tmp_path, capfd):
    """A storage holding two studies: export and push need --study-name, and read the one it names."""
    import optuna

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    name = searched.study.study_name
    src = f"sqlite:///{Path(searched.recipe.output_dir).resolve() / 'study.db'}"
    for copy in ("first", "second"):
        optuna.copy_study(from_study_name=name, from_storage=src, to_storage=url, to_study_name=copy)
    second = optuna.load_study(study_name="second", storage=url)
    second.set_user_attr("llmtune.recipe", {**second.user_attrs["llmtune.recipe"], "name": "second-run"})

    assert main(["export", url, "--output-dir", str(tmp_path / "x")]) == 2
    err = capfd.readouterr().err
    assert "holds studies ['first', 'second']; pass --study-name" in err and "Traceback" not in err
    assert main(["export", url, "--study-name", "nope", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--study-name 'nope': no such study" in capfd.readouterr().err

    assert main(["export", url, "--study-name", "second", "--output-dir", str(tmp_path / "x")]) == 0
    provenance = json.loads((tmp_path / "x" / "llmtune.json").read_text())
    assert provenance["study"] == "second"
    # a folder whose study lives in another storage: --storage names it
    assert main(["push", str(tmp_path), "--storage", url, "--study-name", "first", "--repo-id", "alice/first",
                 "--dry-run", "--output-dir", str(tmp_path / "p")]) == 0
    assert "dry run: would upload" in capfd.readouterr().out
    assert json.loads((tmp_path / "p" / "llmtune.json").read_text())["study"] == "first"


def test_old_flag_spellings_still_work_with_a_warning(searched, tmp_path, capfd):
    out = str(searched.recipe.output_dir)
    assert main(["export", out, "--to", str(tmp_path / "old")]) == 0
    assert "warning: --to is deprecated; use --output-dir" in capfd.readouterr().err
    assert (tmp_path / "old" / "adapter_model.safetensors").exists()


def test_model_card_names_the_study_and_publishes_no_storage_coordinates(searched, tmp_path, monkeypatch):
    from llmtune.deliver.modelcard import public_recipe

    searched.recipe.study.storage = "postgresql://alice:pw@db.internal.example:6543/llmtune_prod"
    try:
        shown = public_recipe(searched)
    finally:
        searched.recipe.study.storage = None
    assert "storage" not in shown["study"] and shown["study"]["study_name"] == searched.study.study_name
    assert "db.internal" not in json.dumps(shown) and "6543" not in json.dumps(shown)
