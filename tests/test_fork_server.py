"""The fork server: trials forked from a warm interpreter behave exactly as fresh trial processes."""

from __future__ import annotations

import os
import time

import pytest
from conftest import tiny_recipe_dict

from llmtune.config.recipe import recipe_from_dict
from llmtune.harness.train import eval_fractions
from llmtune.trial import fork_server
from llmtune.trial.runner import TrialJob, TrialProcess, run_trial_process

pytestmark = pytest.mark.skipif(not fork_server.enabled(), reason="the fork server runs on Linux only")

FAST = {"data": {"source": "llmtune/tiny-tasks", "eval_max_length": 128, "max_eval_examples": 16, "max_train_examples": 200},
        "train": {"budget": {"examples": 32}, "eval_points": 2},
        "measure": {"latency_prompts": 1, "max_new_tokens": 2}}


@pytest.fixture
def server(tiny_model_path, tiny_data_path):
    started = fork_server.prewarm()
    assert started is not None and started.wait_ready(), started.why if started else "fork server off"
    return started


def job(tmp_path, name: str, timeout: float = 300, fork_server: fork_server.ForkServer | None = None) -> TrialJob:
    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path, **FAST))
    return TrialJob(recipe=recipe.to_dict(), values=recipe.space.complete({}), out_dir=tmp_path / name,
                    fractions=eval_fractions(recipe), timeout=timeout, fork_server=fork_server)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its parent to reap it has ended too
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_forked_trial_gives_the_same_result_as_a_fresh_process(tmp_path, server, monkeypatch):
    forked = run_trial_process(job(tmp_path, "forked", fork_server=server))
    fresh = run_trial_process(job(tmp_path, "fresh"))
    assert (forked.info["launch"], fresh.info["launch"]) == ("fork-server", "fresh")
    assert forked.status == fresh.status == "complete"
    assert forked.curve == fresh.curve and len(forked.curve) == 3  # the same eval losses, bit for bit
    assert forked.metrics["trainable_params"] == fresh.metrics["trainable_params"]
    assert (tmp_path / "forked" / "adapter" / "adapter_model.safetensors").exists()
    assert "trial finished: complete" in (tmp_path / "forked" / "trial.log").read_text()  # its output is logged
    # what the warm start saves: the imports (seconds) that the fresh process pays before loading
    assert forked.info["process_wall_s"] - forked.info["wall_time_s"] < fresh.info["process_wall_s"] - fresh.info["wall_time_s"]


def test_the_pruners_answer_reaches_a_forked_trial(tmp_path, server):
    seen: list[float] = []

    def stop_after_first_rung(event: dict) -> bool:
        if event.get("event") == "eval":
            seen.append(event["fraction"])
            return event["fraction"] > 0
        return False

    result = TrialProcess(job(tmp_path, "pruned", fork_server=server)).wait(on_event=stop_after_first_rung)
    assert result.info["launch"] == "fork-server"
    assert result.status == "pruned" and seen == [0.0, 0.5]
    assert [f for f, _ in result.curve] == [0.0, 0.5]


@pytest.mark.parametrize("fault, status, reason", [("oom", "oom", "out of memory"),
                                                   ("crash", "crashed", "injected crash")])
def test_a_forked_trial_that_fails_gets_its_status(tmp_path, server, monkeypatch, fault, status, reason):
    monkeypatch.setenv("LLMTUNE_FAULT", fault)  # llmtune's own variables do not need a new server
    result = run_trial_process(job(tmp_path, fault, fork_server=server))
    assert result.info["launch"] == "fork-server"
    assert result.status == status and reason in result.reason


def test_a_hanging_forked_trial_is_killed_at_its_timeout(tmp_path, server, monkeypatch):
    monkeypatch.setenv("LLMTUNE_FAULT", "hang")
    trial = TrialProcess(job(tmp_path, "hang", timeout=8, fork_server=server))
    result = trial.wait()
    assert trial.launch == "fork-server"
    assert result.status == "timeout" and result.info["process_wall_s"] < 30
    assert not alive(trial.proc.pid)


def test_a_forked_trial_ends_when_the_fork_server_dies(tmp_path, server, monkeypatch):
    monkeypatch.setenv("LLMTUNE_FAULT", "hang")
    trial = TrialProcess(job(tmp_path, "orphan", fork_server=server))
    assert trial.launch == "fork-server"
    time.sleep(1.0)
    server.proc.kill()
    result = trial.wait()
    assert result.status == "crashed" and "fork server" in result.reason
    deadline = time.time() + 15  # it notices its parent is gone within its 2 s watch interval
    while alive(trial.proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not alive(trial.proc.pid)
    monkeypatch.delenv("LLMTUNE_FAULT")
    after = run_trial_process(job(tmp_path, "after", fork_server=server))  # a dead server: a fresh process
    assert after.status == "complete" and after.info["launch"] == "fresh"
    replacement = fork_server.prewarm()  # the next search gets a new one
    assert replacement is not None and replacement is not server and replacement.wait_ready()


def test_a_search_in_another_environment_gets_its_own_server(tmp_path, server, monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "changed")  # libraries may read their variables at import
    other = fork_server.prewarm()
    assert other is not None and other is not server and other.wait_ready()
    assert server.failed  # the idle old one was stopped
    assert run_trial_process(job(tmp_path, "env", fork_server=other)).info["launch"] == "fork-server"
    monkeypatch.setenv("LLMTUNE_FAULT", "hang")  # llmtune's own variables are read at run time: no new server
    assert fork_server.prewarm() is other


def test_every_trial_of_a_search_is_forked_from_one_server(tmp_path, tiny_model_path, tiny_data_path):
    import llmtune
    from llmtune.study.attrs import INFO

    fork_server._stop_server()  # the search starts its own; its first trial waits for it instead of starting fresh
    data = tiny_recipe_dict(tmp_path, **FAST, study={"n_trials": 2, "sampler": "random", "trial_timeout": 300})
    data["search"] = {**data["search"], "lora_r": [4, 8]}
    result = llmtune.search(data)
    launches = [t.user_attrs[INFO]["launch"] for t in result.study.trials]
    assert launches == ["fork-server", "fork-server"]  # so their CPU peak memory (resident set) compares


def test_an_idle_server_exits_quietly_and_the_next_search_starts_another(monkeypatch, capfd, tiny_model_path):
    fork_server._stop_server()
    monkeypatch.setenv("LLMTUNE_FORK_SERVER_IDLE", "1")
    idle = fork_server.prewarm()
    assert idle is not None and idle.wait_ready()
    deadline = time.time() + 20
    while not idle.failed and time.time() < deadline:
        time.sleep(0.2)
    assert idle.failed and idle.proc.wait(timeout=10) == 0
    assert "fresh processes" not in capfd.readouterr().err  # a planned exit is not reported as a failure
    monkeypatch.delenv("LLMTUNE_FORK_SERVER_IDLE")
    following = fork_server.prewarm()
    assert following is not None and following is not idle and following.wait_ready()


def test_the_server_preloads_bitsandbytes_where_no_cuda_is_visible(server):
    """peft imports bitsandbytes when it wraps the first layer (~1.6 s, most of a tiny model's load): on a
    machine without CUDA the server has it loaded, so a forked trial does not import it again."""
    import torch

    with open(f"/proc/{server.proc.pid}/maps") as f:
        mapped = f.read()
    assert ("libbitsandbytes_cpu" in mapped) == (not torch.cuda.is_available())


@pytest.mark.parametrize("cuda", [False, True])
def test_bitsandbytes_is_preloaded_only_without_cuda(cuda):
    """With a CUDA device, importing bitsandbytes reads its capability: a CUDA context, and no usable fork."""
    import subprocess
    import sys

    code = (f"import sys, torch; torch.cuda.is_available = lambda: {cuda}\n"
            "from llmtune.trial import fork_server; fork_server._preload_without_cuda()\n"
            "print('bitsandbytes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == str(not cuda)
