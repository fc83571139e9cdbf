"""A fork server for trial processes: import torch, transformers and peft once, fork a trial from that.

A fresh ``python -m llmtune.harness.worker`` spends seconds importing the ML stack before it trains
(~5 s on a 2-core machine: more than a tiny trial's training). The fork server is one helper process
per search that imports the stack once and never touches CUDA; each trial is ``os.fork()`` of it. So
each trial is still its own process that gives all its memory back when it exits (the design's
isolation holds), it just starts warm.

Safety:
- The server imports with ``PYTORCH_NVML_BASED_CUDA_CHECK=1``, so libraries that ask "is CUDA there?"
  at import (bitsandbytes does) ask NVML and do not create a CUDA context; a forked child must be the
  first to use CUDA. A probe child checks that torch did not mark forks as unusable for CUDA; if it
  did, the server reports it and the runner falls back to fresh processes.
- A server is started with the search's environment (libraries read some of it at import); a search
  started later in the same process with another environment gets a new server (or, while the old one
  still runs trials, fresh processes). Each trial still gets the search's full environment.
- Every trial of a search starts the same way (the first ones wait for the server rather than start
  fresh): on CPU, peak memory is the resident set, and a forked process's is ~10% smaller (library
  pages it has not touched are not counted), so launches must not mix within a search.
- Off with ``LLMTUNE_FORK_SERVER=0``; only on Linux.

Protocol: the search process and the server share a SOCK_SEQPACKET socket pair. The search sends
``{"id", "spec", "env", "cwd"}`` with two file descriptors (the trial's event channel and its log); the
server forks and answers ``{"id", "pid"}``, and ``{"exited": pid, "returncode": rc}`` when it ends. The
server exits when the search process closes its end (or dies: while it still imports, a thread polls
its parent, so a search killed before its first trial takes its server along), and its children follow (they watch
their parent and the search, see `llmtune.harness.worker`); it also exits after
``LLMTUNE_FORK_SERVER_IDLE`` seconds (default 300) without a trial, saying ``{"idle": true}`` first.
"""

from __future__ import annotations

import atexit
import gc
import itertools
import json
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import IO, Any

PRELOAD = ("torch", "transformers", "peft", "llmtune.harness.train")
# What peft imports when it wraps the first layer, whatever the quantization: bitsandbytes, whose import
# also imports torch's compiler (~1.6 s of a 2.2 s tiny-model load on a 2-core CPU when every forked
# trial paid it again). Preloaded only where torch sees no CUDA device: on a GPU machine bitsandbytes
# reads the device's capability at import, which would create a CUDA context and poison every fork.
PRELOAD_WITHOUT_CUDA = ("peft.tuners.lora.bnb",)
START_TIMEOUT_S = 180.0
LAUNCH_TIMEOUT_S = 60.0
MAX_MESSAGE = 1 << 20
IDLE_EXIT_S = 300.0


def _idle_exit_s() -> float:
    """A server with no trial for this long exits (a notebook gets its ~1 GB back); the next search
    starts another. ``LLMTUNE_FORK_SERVER_IDLE`` seconds; a value that is not a number is ignored."""
    try:
        return float(os.environ.get("LLMTUNE_FORK_SERVER_IDLE", IDLE_EXIT_S))
    except ValueError:
        return IDLE_EXIT_S


def enabled() -> bool:
    return (sys.platform == "linux" and hasattr(socket, "send_fds")
            and os.environ.get("LLMTUNE_FORK_SERVER", "1").strip().lower() not in ("0", "false", "no", "off"))


# ---------------------------------------------------------------------------------------------------------
# The search process's side


class ForkedProcess:
    """A trial forked by the server: the part of `subprocess.Popen` the runner uses."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None
        self._done = threading.Event()

    def _exited(self, returncode: int | None) -> None:
        self.returncode = returncode
        self._done.set()

    def wait(self) -> int | None:
        self._done.wait()
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode


class ForkServer:
    def __init__(self, env_key: frozenset[tuple[str, str]]):
        self.env_key = env_key
        env = {k: v for k, v in os.environ.items() if k.startswith("LLMTUNE_")} | dict(env_key)
        env.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # no CUDA context from import-time checks
        from llmtune import hardware

        hardware.set_allocator_default(env)  # torch may read its allocator settings at import
        env["PYTHONUNBUFFERED"] = "1"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._stderr = tempfile.TemporaryFile()
        with theirs:
            self.proc = subprocess.Popen([sys.executable, "-m", "llmtune.trial.fork_server", str(theirs.fileno())],
                                         pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL,
                                         stdout=self._stderr, stderr=self._stderr, start_new_session=True)
        self.sock = ours
        self._ids = itertools.count()
        self._lock = threading.Lock()  # the tables below
        self._send_lock = threading.Lock()  # one sendmsg at a time: workers share the server
        self._closed = False  # the server is gone: launches are refused, waiting children released
        self._launches: dict[int, queue.Queue[int | None]] = {}
        self._children: dict[int, ForkedProcess] = {}
        self._early_exits: dict[int, int] = {}
        self.ready = self.failed = False
        self.why = ""  # why it failed
        self._settled = threading.Event()
        threading.Thread(target=self._read, daemon=True, name="llmtune-fork-server").start()

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> bool:
        """Block until the server can fork trials (True) or has failed (False). A server that does not
        start in time is stopped, so trials wait for it once, not each in turn."""
        if not self._settled.wait(timeout):
            self._settle(False, f"it did not start within {timeout:g}s")
            self.close()
        return self.ready

    def _log_tail(self) -> str:
        try:
            self._stderr.seek(0)
            lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        except (OSError, ValueError):
            return "it stopped"
        return lines[-1][:300] if lines else "it stopped"

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(MAX_MESSAGE)
            except OSError:
                data = b""
            if not data:
                break
            msg = json.loads(data)
            if "ready" in msg:
                self._settle(bool(msg["ready"]), msg.get("why", ""))
            elif "idle" in msg:
                self._closed = True
            elif "exited" in msg:
                with self._lock:
                    child = self._children.pop(msg["exited"], None)
                    if child is None:  # the exit overtook the launch answer
                        self._early_exits[msg["exited"]] = msg["returncode"]
                if child is not None:
                    child._exited(msg["returncode"])
            elif "id" in msg:
                launch = self._launches.pop(msg["id"], None)
                if launch is not None:
                    launch.put(msg.get("pid"))
                elif msg.get("pid"):  # its launcher gave up waiting and started a fresh process instead
                    kill_group(msg["pid"])
        self._settle(False, self._log_tail())
        with self._lock:
            self._closed = True
            orphans, self._children = list(self._children.values()), {}
            waiting, self._launches = list(self._launches.values()), {}
        for child in orphans:
            child._exited(None)
        for launch in waiting:
            launch.put(None)

    def _settle(self, ready: bool, why: str) -> None:
        if not ready and not self.failed:
            self.why = why or "it stopped"
            if not self._closed:  # not a planned stop: say so once; the next trials start as fresh processes
                print(f"llmtune: the next trials start as fresh processes (the fork server is unavailable: "
                      f"{self.why})", file=sys.stderr)
        self.ready, self.failed = ready, not ready
        self._settled.set()

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._children or self._launches)

    def launch(self, spec_path: str, env: dict[str, str], channel: socket.socket, log: IO[bytes]) -> ForkedProcess | None:
        """Fork a trial; None if the server is gone (the caller starts a fresh process instead)."""
        if not self.ready:
            return None
        rid = next(self._ids)
        answer: queue.Queue[int | None] = queue.Queue()
        self._launches[rid] = answer
        request = json.dumps({"id": rid, "spec": spec_path, "env": env, "cwd": os.getcwd()}).encode()
        try:
            with self._send_lock:
                socket.send_fds(self.sock, [request], [channel.fileno(), log.fileno()])
            pid = answer.get(timeout=LAUNCH_TIMEOUT_S)
        except (OSError, queue.Empty):
            self._launches.pop(rid, None)  # a late answer's child is killed by the reader
            return None
        if pid is None:
            return None
        child = ForkedProcess(pid)
        with self._lock:
            early = self._early_exits.pop(pid, None)
            if early is None and not self._closed:
                self._children[pid] = child
        if early is not None or self._closed:  # it ended already, or the server went before it was filed
            child._exited(early)
        return child

    def close(self) -> None:
        self._closed = True
        self.ready, self.failed = False, True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def kill_group(pid: int, unreaped: Callable[[], bool] = lambda: True) -> None:
    """SIGKILL a trial's process group: it outlives its leader while helpers live, and its id is not
    reused meanwhile. A forked trial killed before its setsid has no group yet: then the pid itself,
    unless ``unreaped()`` says the leader is gone (its pid may be someone else's by now)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        if unreaped():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


_server: ForkServer | None = None
_server_lock = threading.Lock()


def _stop_server() -> None:
    global _server
    if _server is not None:
        _server.close()
        _server = None


atexit.register(_stop_server)


def _env_key(env: Mapping[str, str]) -> frozenset[tuple[str, str]]:
    """What a server's imports may have read: the environment, less llmtune's own variables (read at
    run time, from the trial's environment) and pytest's per-test marker."""
    return frozenset((k, v) for k, v in env.items() if not k.startswith("LLMTUNE_") and k != "PYTEST_CURRENT_TEST")


def prewarm(parent_env: dict[str, str] | None = None) -> ForkServer | None:
    """Start the server for this environment in the background (a search calls this before its trials).

    Returns at once (None: no server for this search, its trials start fresh). Trials given the server
    (`TrialJob.fork_server`) wait for it to be ready: that costs nothing a fresh process would not
    spend importing.
    """
    global _server
    if not enabled():
        return None
    key = _env_key(os.environ if parent_env is None else parent_env)
    with _server_lock:
        if _server is not None and (_server.failed or (_server.env_key != key and not _server.busy)):
            _stop_server()
        if _server is None:
            _server = ForkServer(key)
        return _server if _server.env_key == key else None


# ---------------------------------------------------------------------------------------------------------
# The server's side: `python -m llmtune.trial.fork_server FD`


def _cuda_usable_after_fork() -> bool:
    """Fork a probe: does torch let a forked child initialise CUDA? (False if an import poisoned forks.)"""
    import torch

    pid = os.fork()
    if pid == 0:
        os._exit(1 if torch.cuda._is_in_bad_fork() else 0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def _preload_without_cuda() -> None:
    """Import `PRELOAD_WITHOUT_CUDA` where no CUDA device is visible (asked through NVML: no context)."""
    import torch

    if torch.cuda.is_available():
        return
    for name in PRELOAD_WITHOUT_CUDA:
        try:
            __import__(name)
        except Exception:  # a broken optional import must not cost the server: a trial that needs it says why
            pass


def _child(request: dict[str, Any], fds: list[int], server: int) -> None:
    """In the forked child: become the trial process, run it, and end."""
    os.setsid()  # its own process group, as a fresh process gets: a kill reaches its helpers too
    channel_fd, log_fd = fds
    os.set_inheritable(channel_fd, False)  # received fds are inheritable: helpers must not hold the channel
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    from llmtune.harness.worker import end, serve

    try:
        channel = socket.socket(fileno=channel_fd)
        events, answers = channel.makefile("w", buffering=1), channel.makefile("r")
        search = int(request["env"].get("LLMTUNE_PARENT_PID", 0)) or None
        code = serve(request["spec"], events, answers, parent=server, search=search)
    except BaseException:
        traceback.print_exc()  # into trial.log: the runner reads its tail for the reason
        code = 1
    end(code)  # never returns: os._exit, never the server's teardown in a forked child


def _reap(sock: socket.socket) -> set[int]:
    """Report the children that ended; returns their pids."""
    ended: set[int] = set()
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return ended
        if pid == 0:
            return ended
        ended.add(pid)
        sock.send(json.dumps({"exited": pid, "returncode": os.waitstatus_to_exitcode(status)}).encode())


def _exit_with_parent(parent: int, done: threading.Event) -> None:
    """While the server imports it reads no socket, so it would not see its search die: it polls its parent
    instead and exits at once when that is gone (a search killed before its first trial must not leave a
    server importing for a minute). `done`: the server is ready, and its loop watches the socket."""
    while not done.wait(0.2):
        if os.getppid() != parent:
            os._exit(0)


def main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    importing = threading.Event()
    watcher = threading.Thread(target=_exit_with_parent, args=(os.getppid(), importing), daemon=True)
    watcher.start()
    try:
        for name in PRELOAD:
            __import__(name)
        _preload_without_cuda()
        if not _cuda_usable_after_fork():
            sock.send(json.dumps({"ready": False, "why": "an import initialised CUDA, so forks cannot use it"}).encode())
            return
    except Exception as e:  # a broken install: the runner falls back to fresh processes, which report it
        sock.send(json.dumps({"ready": False, "why": f"{type(e).__name__}: {e}"[:300]}).encode())
        return
    importing.set()
    watcher.join()  # no thread of its own when it forks trials
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()  # the imported objects: a collection in a trial then neither walks nor copies their pages
    me = os.getpid()
    sock.send(json.dumps({"ready": True, "pid": me}).encode())
    children: set[int] = set()
    idle_exit = _idle_exit_s()
    idle_since = time.monotonic()
    while True:
        readable, _, _ = select.select([sock], [], [], 0.05)
        children -= _reap(sock)
        if children:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > idle_exit:
            sock.send(json.dumps({"idle": True}).encode())  # a planned exit: the next search starts a new server
            return
        if not readable:
            continue
        try:
            data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 2)
        except OSError:
            return
        if not data:  # the search process closed its end or died: stop (the children follow)
            return
        request = json.loads(data)
        pid = os.fork()
        if pid == 0:
            sock.close()
            _child(request, fds, server=me)  # never returns
        children.add(pid)
        for f in fds:
            os.close(f)
        sock.send(json.dumps({"id": request["id"], "pid": pid}).encode())


if __name__ == "__main__":
    main(int(sys.argv[1]))
