"""Run each trial in its own child process, with a timeout, and map every ending to a status.

A process that exits gives all of its (GPU) memory back, so one trial's leak or crash never reaches
the next. Parent and child talk over the child's stdin/stdout in JSON lines; everything the child
prints goes to ``trial.log`` instead.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from llmtune import hardware
from llmtune.trial.endings import conclude
from llmtune.trial.fork_server import ForkedProcess, ForkServer, kill_group
from llmtune.trial.result import TrialResult

EXIT_GRACE_S = 5.0
LOW_AVAILABLE_SHARE = 0.05  # the machine's available memory under this share of its total: memory evidence
HIGH_RSS_SHARE = 0.9        # the trial's resident memory at this share of what it could use: memory evidence
DISK_FULL_BYTES = 64 << 20  # a trial that ended without a result on a disk with less free: the disk was full


@dataclass
class TrialJob:
    recipe: dict[str, Any]              # Recipe.to_dict(): the child validates it again
    values: dict[str, Any]              # the trial's settings
    out_dir: Path
    fractions: list[float]              # where to evaluate (eval points and pruning rungs)
    trial_number: int | None = None
    timeout: float = 3600.0
    env: dict[str, str] = field(default_factory=dict)  # e.g. CUDA_VISIBLE_DEVICES, LLMTUNE_THREADS
    fork_server: ForkServer | None = None  # the search's: fork the trial from it (else a fresh process)
    base_eval: dict[str, Any] | None = None  # the untrained adapter's loss and context, if another trial measured it
    probe_steps: int | None = None      # a short probe of the execution settings, not a trial (study/probes.py)
    segment: dict[str, Any] | None = None  # part of the plan, from and to a saved state (harness/resume.py)
    pause: str | None = None            # where the state goes if the pruner stops it (study/promotion.py)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class MemoryWatch:
    """What the parent can see of a trial's memory, to tell the kernel's out-of-memory killer from any
    other SIGKILL: the OOM killer leaves nothing a parent can read portably (its report goes to the
    kernel log), so `evidence` is a heuristic, any of:

    - an oom_kill counter rose while the trial ran: the machine's (/proc/vmstat, Linux >= 4.13) or
      its memory cgroup's (v2 memory.events, v1 memory.oom_control), where readable;
    - the machine's available memory (MemAvailable) fell under LOW_AVAILABLE_SHARE of its total;
    - the trial's resident memory reached HIGH_RSS_SHARE of what it could use: the memory available
      when it started, or its cgroup's limit where lower.

    The last two are polled with the runner's event loop (every 0.25 s), so a spike between two polls
    is seen only through the counters; a trial killed with no evidence ends `killed`, retried once."""

    def __init__(self, pid: int, proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")):
        self.pid, self.proc, self.cgroup = pid, proc, cgroup
        self.counters = self._oom_kills()
        total, available = self._meminfo("MemTotal:"), self._meminfo("MemAvailable:")
        limit = min((v for _, limit_file in self._cgroup_files() if (v := _number(limit_file)) is not None),
                    default=None)
        self.total = min(v for v in (total, limit) if v) if total or limit else None
        self.budget = min(v for v in (available, limit) if v) if available or limit else None
        self.min_available, self.peak_rss = available, 0

    def _meminfo(self, key: str, path: str = "meminfo") -> int | None:
        """A /proc field in bytes (they are written in kB)."""
        try:
            line = next((ln for ln in (self.proc / path).read_text().splitlines() if ln.startswith(key)), "")
            return int(line.split()[1]) * 1024 if line else None
        except (OSError, ValueError, IndexError):
            return None

    def _cgroup_files(self) -> list[tuple[Path, Path]]:
        """(the file with its oom_kill counter, the file with its limit) of each memory cgroup of this
        process (the trial's too: it inherits it). A cgroup namespace shows its own root at the mount."""
        try:
            lines = (self.proc / "self" / "cgroup").read_text().splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
            if controllers and "memory" not in controllers.split(","):
                continue
            root = self.cgroup if not controllers else self.cgroup / "memory"
            base = root / path.strip("/") if (root / path.strip("/")).is_dir() else root
            out.append((base / "memory.events", base / "memory.max") if not controllers
                       else (base / "memory.oom_control", base / "memory.limit_in_bytes"))
        return out

    def _oom_kills(self) -> dict[str, int]:
        sources = [self.proc / "vmstat"] + [events for events, _ in self._cgroup_files()]
        counts = {str(path): _number(path, "oom_kill") for path in sources}
        return {k: v for k, v in counts.items() if v is not None}

    def poll(self) -> None:
        rss, available = self._meminfo("VmRSS:", f"{self.pid}/status"), self._meminfo("MemAvailable:")
        self.peak_rss = max(self.peak_rss, rss or 0)
        if available is not None:
            self.min_available = available if self.min_available is None else min(self.min_available, available)

    def evidence(self) -> str | None:
        """Why the trial most likely ran out of memory, in words, or None when nothing says so."""
        after = self._oom_kills()
        for source, before in self.counters.items():
            if after.get(source, before) > before:
                return f"the oom_kill counter of {source} rose from {before} to {after[source]} while it ran"
        if self.total and self.min_available is not None and self.min_available < LOW_AVAILABLE_SHARE * self.total:
            return f"the machine had only {_gb(self.min_available)} of {_gb(self.total)} available while it ran"
        if self.budget and self.peak_rss >= HIGH_RSS_SHARE * self.budget:
            return f"it used {_gb(self.peak_rss)} of the {_gb(self.budget)} it could use"
        return None


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB"


def _number(path: Path, key: str | None = None) -> int | None:
    """A number file ("max" is no limit), or the value of `key` in a "key value" per line file."""
    try:
        text = path.read_text()
        if key is None:
            return None if text.strip() == "max" else int(text)
        return next((int(v) for k, _, v in (ln.partition(" ") for ln in text.splitlines()) if k == key), None)
    except (OSError, ValueError):
        return None


def disk_full(path: Path) -> str | None:
    """"the disk of PATH had N MB free" when under DISK_FULL_BYTES are free there; else None."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return None
    return f"the disk of {path} had {free / 2**20:.0f} MB free" if free < DISK_FULL_BYTES else None


class TrialProcess:
    """One running trial. `wait` drives it to the end, answering eval events with `on_event`."""

    def __init__(self, job: TrialJob):
        self.job = job
        job.out_dir.mkdir(parents=True, exist_ok=True)
        self.spec_path = job.out_dir / "spec.json"
        self.log_path = job.out_dir / "trial.log"
        self.result_path = job.out_dir / "result.json"
        self.result_path.unlink(missing_ok=True)  # a retried trial must not read an old result
        self.spec_path.write_text(json.dumps({
            "recipe": job.recipe, "values": job.values, "out_dir": str(job.out_dir),
            "fractions": job.fractions, "trial_number": job.trial_number, "base_eval": job.base_eval,
            "probe_steps": job.probe_steps, "segment": job.segment,
            "pause": job.pause},
            default=str))
        env = {**os.environ, **job.env, "PYTHONUNBUFFERED": "1", "LLMTUNE_PARENT_PID": str(os.getpid())}
        # set before the process exists, so no import order can start the allocator without it
        hardware.set_allocator_default(env)
        self._log = open(self.log_path, "ab")
        started = self._forked(env) or self._fresh(env)
        self.started = time.time()  # the timeout counts from here: not the wait for a fork server to start
        self.proc: subprocess.Popen[bytes] | ForkedProcess = started[0]
        self._events, self._answers, self.launch = started[1:]
        self.memory = MemoryWatch(self.proc.pid)
        self._messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _forked(self, env: dict[str, str]) -> tuple[ForkedProcess, IO[bytes], IO[bytes], str] | None:
        """Fork the trial from the search's warm fork server, if it has a working one."""
        server = self.job.fork_server
        if server is None or not server.wait_ready():
            return None
        ours, theirs = socket.socketpair()
        with ours, theirs:
            proc = server.launch(str(self.spec_path), env, theirs, self._log)
            if proc is None:
                return None
            return proc, ours.makefile("rb"), ours.makefile("wb"), "fork-server"  # the files keep it open

    def _fresh(self, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], IO[bytes], IO[bytes], str]:
        """A fresh interpreter: a single `train`, a search without a working fork server, or LLMTUNE_FORK_SERVER=0."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmtune.harness.worker", str(self.spec_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env,
            start_new_session=True,  # its own process group: a kill reaches its helpers too
        )
        assert proc.stdout is not None and proc.stdin is not None
        return proc, proc.stdout, proc.stdin, "fresh"

    def _read(self) -> None:
        for line in self._events:
            try:
                self._messages.put(json.loads(line))
            except json.JSONDecodeError:
                continue
        self._messages.put(None)

    def _reply(self, answer: dict[str, Any]) -> None:
        try:
            self._answers.write((json.dumps(answer) + "\n").encode())
            self._answers.flush()
        except (BrokenPipeError, OSError):
            pass  # the child is gone; its exit is handled below

    def kill(self) -> None:
        kill_group(self.proc.pid, lambda: self.proc.poll() is None)

    def wait(self, on_event: Callable[[dict[str, Any]], Any] | None = None,
             heartbeat: Callable[[], None] | None = None, stop: threading.Event | None = None) -> TrialResult:
        timed_out = interrupted = False
        exited = 0.0
        deadline = self.started + self.job.timeout
        try:
            while True:
                self.memory.poll()
                if stop is not None and stop.is_set():
                    interrupted = True
                    self.kill()
                    break
                if time.time() > deadline:
                    timed_out = True
                    self.kill()
                    break
                try:
                    msg = self._messages.get(timeout=0.25)
                except queue.Empty:
                    if heartbeat:
                        heartbeat()
                    if self.proc.poll() is not None:
                        # Ended, but something it started still holds the channel open: give that a moment
                        # to finish what it says, then stop waiting for it (and kill its group).
                        exited = exited or time.time()
                        if time.time() - exited > EXIT_GRACE_S:
                            self.kill()
                            break
                    continue
                if msg is None:
                    break
                answer = on_event(msg) if on_event else None
                if msg.get("event") == "eval":
                    self._reply({"stop": bool(answer)})
                if heartbeat:
                    heartbeat()
        except KeyboardInterrupt:
            interrupted = True
            self.kill()
        except BaseException:
            self.kill()  # else the child may wait forever for an answer and proc.wait() below never returns
            raise
        finally:
            self.proc.wait()
            self._log.close()
            for f in (self._events, self._answers):
                try:
                    f.close()
                except OSError:
                    pass
        result = TrialResult.load(self.result_path) if self.result_path.exists() else None
        tail = log_tail(self.log_path)
        killed = self.proc.returncode is not None and self.proc.returncode < 0
        result = conclude(self.proc.returncode, result, tail, self.job.values, timed_out=timed_out,
                          interrupted=interrupted, timeout=self.job.timeout,
                          memory_evidence=self.memory.evidence() if killed and result is None else None,
                          disk_full=disk_full(self.job.out_dir) if result is None else None)
        result.info["process_wall_s"] = time.time() - self.started
        result.info["launch"] = self.launch
        return result


def run_trial_process(job: TrialJob, on_event: Callable[[dict[str, Any]], Any] | None = None,
                      heartbeat: Callable[[], None] | None = None, stop: threading.Event | None = None) -> TrialResult:
    """Run one trial in a fresh process and return its classified result."""
    return TrialProcess(job).wait(on_event, heartbeat, stop)
