"""Could the standard library's ``multiprocessing`` forkserver replace llmtune's own fork server?

Two parts:

``python benchmarks/fork_server_vs_stdlib.py --checks``
    Behavioural checks of the stdlib forkserver against what llmtune's fork server must do (per-trial
    environment, trial.log, a private event channel, own session, kill and exit codes, server lifetime,
    preload failures, concurrent launches, ``__main__`` preloading). Standard library only, so it runs
    on any interpreter: ``for v in 3.10 3.11 3.12 3.13; do python$v benchmarks/fork_server_vs_stdlib.py --checks; done``.

``python benchmarks/fork_server_vs_stdlib.py`` (the project's venv)
    Time from "start a trial" until the child runs the trial function with the stack imported, and the
    child's memory, for (a) a fresh interpreter, (b) the stdlib forkserver with
    ``set_forkserver_preload`` and a thin wrapper that does what llmtune's fork server does in its child,
    (c) llmtune's fork server through its public API (``prewarm`` + ``ForkServer.launch``, as the runner
    does). Interleaved rounds (the first a discarded warm-up), medians.

How "the child is running the trial function" is seen, the same way for all three: the trial's spec
path is a FIFO. Every launch ends in `llmtune.harness.worker.serve`, whose first act is to open the
spec; the parent's open of the FIFO for writing succeeds at that moment, with torch, transformers,
peft and ``llmtune.harness.train`` imported (preloaded in (b) and (c), imported first in (a)). The
parent then reads the child's memory (it is blocked in ``read``) and kills its process group, which
also checks that the kill arrives and that the parent sees ``-9``.

Keep this file's top level cheap: the stdlib forkserver runs ``__main__`` again in every child.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # measurement processes single-threaded (children inherit it)
os.environ.setdefault("MKL_NUM_THREADS", "1")

if os.environ.get("FSB_MARK"):  # --checks: which processes run this file's top level, and as what
    with open(os.environ["FSB_MARK"], "a") as _f:
        _f.write(f"{os.getpid()} {__name__}\n")


# ---------------------------------------------------------------------------------------------------------
# What a thin wrapper over the stdlib forkserver needs: pass an fd, and the child side of zygote's _child


class PassFd:
    """An fd that travels to a forkserver child the way sockets do (SCM_RIGHTS with the launch request)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        from multiprocessing import reduction

        return _rebuild_fd, (reduction.DupFd(self.fd),)


def _rebuild_fd(dup) -> PassFd:
    return PassFd(dup.detach())


def stdlib_trial(spec_path: str, env: dict, cwd: str, channel: socket.socket, log: PassFd, search: int) -> None:
    """The forkserver child: what `llmtune.zygote._child` does after its fork, then the same `serve`."""
    os.setsid()
    os.set_inheritable(channel.fileno(), False)
    os.dup2(log.fd, 1)
    os.dup2(log.fd, 2)
    os.close(log.fd)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    from llmtune.harness.worker import end, serve

    events, answers = channel.makefile("w", buffering=1), channel.makefile("r")
    end(serve(spec_path, events, answers, parent=os.getppid(), search=search))


# ---------------------------------------------------------------------------------------------------------
# Measurement


def memory_mb(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "Threads:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    rollup = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "kB":
                    rollup[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        pass
    return {"rss_mb": out["VmRSS"] / 1024, "pss_mb": rollup.get("Pss", 0) / 1024,
            "uss_mb": (rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0)) / 1024,
            "threads": out.get("Threads")}


def wait_for_reader(fifo: str, alive, timeout: float = 300.0) -> tuple[float, int]:
    """Open the FIFO for writing once the child opens it for reading (1 ms resolution)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            return time.monotonic(), fd
        except OSError as e:
            if e.errno != 6:  # ENXIO: no reader yet
                raise
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError("the trial process ended (or hung) before it opened its spec")
        time.sleep(0.001)


class Bench:
    def __init__(self, workdir: str, preload: list[str]):
        self.workdir = workdir
        self.preload = preload
        self.stdlib_extra: list[str] = []
        self.n = 0
        try:
            from llmtune.trial import fork_server as zygote  # the module's newer home
        except ImportError:
            from llmtune import zygote
        from llmtune import hardware

        self.zygote = zygote
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "LLMTUNE_PARENT_PID": str(os.getpid()),
               "CUDA_VISIBLE_DEVICES": "", "LLMTUNE_THREADS": "1"}
        hardware.set_allocator_default(env)
        self.env = env
        # the stdlib server takes the environment of this process when it starts: give it what zygote's gets
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        hardware.set_allocator_default(os.environ)

    def _paths(self) -> tuple[str, str]:
        self.n += 1
        d = os.path.join(self.workdir, f"t{self.n}")
        os.makedirs(d)
        fifo = os.path.join(d, "spec.json")
        os.mkfifo(fifo)
        return fifo, os.path.join(d, "trial.log")

    def _finish(self, t0: float, fifo: str, pid: int, alive, kill, wait) -> dict:
        t1, fd = wait_for_reader(fifo, alive)
        mem = memory_mb(pid)
        kill()
        rc = wait()
        os.close(fd)
        return {"launch_s": t1 - t0, "returncode": rc, **mem}

    def fresh(self) -> dict:
        fifo, log_path = self._paths()
        code = ("import sys; " + "; ".join(f"import {m}" for m in self.preload) +
                "; from llmtune.harness.worker import end, main; end(main(sys.argv[1]))")
        with open(log_path, "ab") as log:
            t0 = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-c", code, fifo], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=log, env=self.env, start_new_session=True)
            r = self._finish(t0, fifo, proc.pid, lambda: proc.poll() is None,
                             lambda: os.killpg(proc.pid, signal.SIGKILL), proc.wait)
        proc.stdin.close()
        proc.stdout.close()
        return r

    def stdlib(self) -> dict:
        import multiprocessing

        fifo, log_path = self._paths()
        ctx = multiprocessing.get_context("forkserver")
        # no effect once the server runs; the last entry freezes what the others imported
        ctx.set_forkserver_preload(self.preload + self.stdlib_extra + ["_fsb_gc_freeze"])
        ours, theirs = socket.socketpair()
        with open(log_path, "ab") as log, ours:
            t0 = time.monotonic()
            p = ctx.Process(target=stdlib_trial, args=(fifo, self.env, os.getcwd(), theirs, PassFd(log.fileno()),
                                                       os.getpid()))
            p.start()
            theirs.close()
            r = self._finish(t0, fifo, p.pid, lambda: p.exitcode is None,
                             lambda: self.zygote.kill_group(p.pid), lambda: (p.join(), p.exitcode)[1])
        from multiprocessing import forkserver

        r["server_pid"] = forkserver._forkserver._forkserver_pid
        return r

    def stdlib_stop(self) -> None:
        from multiprocessing import forkserver

        forkserver._forkserver._stop()  # private (the stdlib's tests use it); there is no public stop

    def zygote_launch(self) -> dict:
        fifo, log_path = self._paths()
        with open(log_path, "ab") as log:
            t0 = time.monotonic()
            server = self.zygote.prewarm()  # a search calls this first; the runner then does what follows
            if server is None or not server.wait_ready():
                raise RuntimeError(f"llmtune's fork server is unavailable: {server.why if server else 'off'}")
            ours, theirs = socket.socketpair()
            with ours, theirs:
                proc = server.launch(fifo, self.env, theirs, log)
            if proc is None:
                raise RuntimeError("launch failed")
            r = self._finish(t0, fifo, proc.pid, lambda: proc.poll() is None,
                             lambda: self.zygote.kill_group(proc.pid, lambda: proc.poll() is None), proc.wait)
        r["server_pid"] = server.proc.pid
        return r

    def zygote_stop(self) -> None:
        self.zygote._stop_server()  # what the search process's atexit does


def run_bench(args) -> None:
    work = tempfile.mkdtemp(prefix="fsb-", dir=args.workdir)
    # A preload module with a side effect: freeze the preloaded objects, as zygote does before its forks.
    # (PYTHONPATH, not sys.path: the stdlib server ignores the sys.path it is sent before 3.12.8/3.13.1.)
    with open(os.path.join(work, "_fsb_gc_freeze.py"), "w") as f:
        f.write("import gc\ngc.freeze()\n")
    os.environ["PYTHONPATH"] = os.pathsep.join([work] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    preload = ["torch", "transformers", "peft", "llmtune.harness.train"]
    bench = Bench(work, preload)
    if stdlib_trial.__module__ != "__main__":  # see main(): the stdlib server preloads the wrapper's module too
        bench.stdlib_extra = [stdlib_trial.__module__]
    rng = random.Random(args.seed)
    rows: dict[str, list[dict]] = {k: [] for k in ("fresh", "stdlib first", "stdlib steady", "zygote first",
                                                    "zygote steady")}
    servers: dict[str, list[dict]] = {"stdlib": [], "zygote": []}
    for rnd in range(args.rounds + 1):
        order = ["fresh", "stdlib", "zygote"]
        rng.shuffle(order)
        got: dict[str, list[dict]] = {k: [] for k in rows}
        for method in order:
            if method == "fresh":
                got["fresh"].append(bench.fresh())
                continue
            launch, stop = (bench.stdlib, bench.stdlib_stop) if method == "stdlib" else (bench.zygote_launch, bench.zygote_stop)
            first = launch()
            got[f"{method} first"].append(first)
            if rnd:
                servers[method].append(memory_mb(first["server_pid"]))
            for _ in range(args.steady):
                got[f"{method} steady"].append(launch())
            stop()
        summary = ", ".join(f"{k} {statistics.median(r['launch_s'] for r in v):.3f}s" for k, v in got.items() if v)
        print(f"round {rnd}{' (warm-up, discarded)' if rnd == 0 else ''}: order {'/'.join(order)}: {summary}",
              flush=True)
        if rnd:
            for k, v in got.items():
                rows[k].extend(v)

    def med(k: str, field: str) -> float:
        return statistics.median(r[field] for r in rows[k])

    codes = {k: sorted({r["returncode"] for r in v}) for k, v in rows.items()}
    base = med("fresh", "launch_s")
    print(f"\n{args.rounds} interleaved rounds, medians; Python {sys.version.split()[0]}, "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, {os.cpu_count()} CPUs; steady = {args.steady} "
          f"launches per round after the first; preload {preload}; stdlib children "
          f"{'preload the wrapper module' if bench.stdlib_extra else 'run this file again as __mp_main__'}")
    print(f"{'launch':<16}{'to trial fn (s)':>16}{'vs fresh':>10}{'RSS MB':>9}{'PSS MB':>9}{'USS MB':>9}  exit codes after killpg")
    for k in rows:
        print(f"{k:<16}{med(k, 'launch_s'):>16.3f}{med(k, 'launch_s') / base:>9.3f}x{med(k, 'rss_mb'):>9.0f}"
              f"{med(k, 'pss_mb'):>9.0f}{med(k, 'uss_mb'):>9.0f}  {codes[k]}")
    for k, v in servers.items():
        print(f"{k} server (idle, after its first launch): RSS {statistics.median(m['rss_mb'] for m in v):.0f} MB, "
              f"threads {statistics.median(m['threads'] for m in v):.0f}")
    s, z = med("stdlib steady", "launch_s"), med("zygote steady", "launch_s")
    print(f"ratios: stdlib steady / zygote steady {s / z:.2f}x; stdlib first / zygote first "
          f"{med('stdlib first', 'launch_s') / med('zygote first', 'launch_s'):.2f}x; fresh / zygote steady {base / z:.0f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "servers": servers, "preload": preload, "python": sys.version,
                       "rounds": args.rounds, "steady": args.steady}, f, indent=1)


# ---------------------------------------------------------------------------------------------------------
# Behavioural checks of the stdlib forkserver (standard library only)


def probe(out: str, extra: dict | None = None) -> None:
    """Child: report what it inherited."""
    import gc

    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[name] = [os.readlink(f"/proc/self/fd/{name}"), os.get_inheritable(int(name))]
        except OSError:
            pass
    mods = {m: getattr(sys.modules[m], "PID", "?") for m in ("fsb_mark", "fsb_late", "fsb_pathonly") if m in sys.modules}
    info = {"pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgid(0), "sid": os.getsid(0),
            "FSB_X": os.environ.get("FSB_X"), "preloaded_by": mods, "main": sys.modules["__main__"].__name__,
            "fds": fds, "alive_fd": _fs_alive_fd(), "gc_frozen": gc.get_freeze_count() if hasattr(gc, "get_freeze_count") else None, **(extra or {})}
    with open(out, "w") as f:
        json.dump(info, f)


def _fs_alive_fd():
    from multiprocessing import forkserver

    return forkserver._forkserver._forkserver_alive_fd


def trial_like(channel: socket.socket, log: PassFd, env: dict, atexit_file: str) -> None:
    """Child: the wrapper's duties, then a helper in its group, an exchange on the channel, and sleep."""
    import atexit

    os.setsid()
    os.dup2(log.fd, 1)
    os.dup2(log.fd, 2)
    os.close(log.fd)
    os.environ.update(env)
    atexit.register(lambda: open(atexit_file, "a").write(f"child-registered {os.getpid()}\n"))
    print("to stdout", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    helper = subprocess.Popen(["sleep", "60"])
    f = channel.makefile("rw", buffering=1)
    f.write(json.dumps({"event": "eval", "helper": helper.pid, "env": env and {k: os.environ.get(k) for k in env},
                        "pgid": os.getpgid(0), "stdin": os.readlink("/proc/self/fd/0")}) + "\n")
    answer = json.loads(f.readline())
    print(f"answer {answer}", flush=True)
    if answer.get("return"):
        return
    time.sleep(60)


def sleeper(seconds: float) -> None:
    time.sleep(seconds)


def noop() -> None:
    pass


def watch_parent(out: str) -> None:
    import multiprocessing
    from multiprocessing.connection import wait

    t0 = time.time()
    ready = wait([multiprocessing.parent_process().sentinel], timeout=10)
    with open(out, "w") as f:
        json.dump({"parent_gone_seen": bool(ready), "at": time.time(), "waited": time.time() - t0,
                   "ppid_now": os.getppid()}, f)
    time.sleep(1.0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def run_checks(args) -> None:
    import multiprocessing
    from multiprocessing import forkserver

    fs = forkserver._forkserver
    ctx = multiprocessing.get_context("forkserver")
    tmp = tempfile.mkdtemp(prefix="fsb-checks-", dir=args.workdir)
    mods, pathonly = os.path.join(tmp, "mods"), os.path.join(tmp, "pathonly")
    os.makedirs(mods)
    os.makedirs(pathonly)
    for name, body in {"fsb_mark": "import os\nPID = os.getpid()\n", "fsb_late": "import os\nPID = os.getpid()\n",
                       "fsb_boom": "raise RuntimeError('boom while preloading')\n",
                       "fsb_slow": "import time\ntime.sleep(2.0)\n",
                       "fsb_atexit": "import atexit, os\natexit.register(lambda: open(os.environ['FSB_ATEXIT'], 'a')"
                                     ".write(f'server-registered {os.getpid()}\\n'))\n"}.items():
        with open(os.path.join(mods, name + ".py"), "w") as f:
            f.write(body)
    with open(os.path.join(pathonly, "fsb_pathonly.py"), "w") as f:
        f.write("import os\nPID = os.getpid()\n")
    os.environ["PYTHONPATH"] = mods
    sys.path.insert(0, mods)
    sys.path.insert(0, pathonly)  # only on this process's sys.path: the server is sent it as sys_path
    mark = os.path.join(tmp, "mark")
    os.environ["FSB_MARK"] = mark
    os.environ["FSB_ATEXIT"] = atexit_file = os.path.join(tmp, "atexit")
    results: dict[str, object] = {"python": sys.version.split()[0]}
    n = iter(range(10**6))

    def run_probe(extra: dict | None = None) -> dict:
        out = os.path.join(tmp, f"probe{next(n)}.json")
        p = ctx.Process(target=probe, args=(out, extra))
        p.start()
        p.join(30)
        with open(out) as f:
            return json.load(f)

    def restart(preload: list[str]) -> None:
        fs._stop()
        ctx.set_forkserver_preload(preload)

    # 1. Preloading: where it runs, __main__, ImportError, sys.path, env snapshot, late changes
    results["default preload list"] = list(fs._preload_modules)
    open(mark, "w").close()
    os.environ["FSB_X"] = "at server start"
    ctx.set_forkserver_preload(["__main__", "fsb_mark", "fsb_missing_xyz", "fsb_pathonly", "fsb_atexit"])
    t = time.monotonic()
    forkserver.ensure_running()
    results["ensure_running() returns after (s)"] = round(time.monotonic() - t, 4)
    server = fs._forkserver_pid
    os.environ["FSB_X"] = "changed later"
    a, b = run_probe(), run_probe()
    with open(mark) as f:
        runs = [line.split() for line in f]
    results["server pid"] = server
    results["fsb_mark imported in (server?)"] = "server" if a["preloaded_by"].get("fsb_mark") == server else a["preloaded_by"]
    results["preload module on the parent's sys.path only: preloaded"] = a["preloaded_by"].get("fsb_pathonly") == server
    results["missing preload module: launch still works, silently"] = a["pid"] > 0
    results["__main__ top level ran in"] = sorted({("server" if int(pid) == server else "child" if int(pid) in (a["pid"], b["pid"]) else pid) + " as " + name for pid, name in runs})
    results["child env FSB_X (set 'at server start', then 'changed later')"] = a["FSB_X"]
    results["server session == parent session; own session?"] = (os.getsid(server) == os.getsid(0), os.getsid(server) == server)
    results["child pgid == server pgid (before any setsid)"] = a["pgid"] == os.getpgid(server)
    results["child sys.modules['__main__'].__name__"] = a["main"]
    results["child inheritable fds beyond 0-2"] = {k: v[0] for k, v in a["fds"].items() if v[1] and int(k) > 2}
    results["  of which the server's 'alive' fd"] = str(a["alive_fd"]) in a["fds"] and a["fds"][str(a["alive_fd"])][1]
    results["gc.get_freeze_count() in child (multiprocessing never calls gc.freeze)"] = a["gc_frozen"]
    ctx.set_forkserver_preload(["fsb_late"])
    results["preload set after the server started: fsb_late in child"] = "fsb_late" in run_probe()["preloaded_by"]

    # 2. A trial: log fd, channel, env, own session, helper killed with the group, exit code
    open(atexit_file, "w").close()
    log_path = os.path.join(tmp, "trial.log")
    for variant in ("killed", "returns"):
        ours, theirs = socket.socketpair()
        with open(log_path, "wb") as log:
            p = ctx.Process(target=trial_like, args=(theirs, PassFd(log.fileno()),
                                                     {"CUDA_VISIBLE_DEVICES": "3", "LLMTUNE_THREADS": "2"}, atexit_file))
            p.start()
        theirs.close()
        f = ours.makefile("rw", buffering=1)
        hello = json.loads(f.readline())
        f.write(json.dumps({"stop": False, "return": variant == "returns"}) + "\n")
        f.flush()
        time.sleep(0.3)
        if variant == "killed":
            os.killpg(p.pid, signal.SIGKILL)
        else:
            os.kill(hello["helper"], signal.SIGKILL)
        p.join(10)
        time.sleep(0.2)
        results[f"trial ({variant}): exitcode"] = p.exitcode
        if variant == "killed":
            results["trial: env in child / own group / stdin"] = (hello["env"], hello["pgid"] == p.pid, hello["stdin"])
            results["trial: helper dead after killpg"] = not _alive(hello["helper"])
            results["trial: channel round trip + log has stdout and stderr"] = open(log_path).read().split("\n")[:3]
        ours.close()
    with open(atexit_file) as fh:
        results["atexit handlers run in children (server-registered / child-registered)"] = (
            "server-registered" in fh.read(), "child-registered" in open(atexit_file).read())

    # 3. Preload failures that are not ImportError; a slow preload; readiness
    restart(["fsb_slow"])
    t = time.monotonic()
    forkserver.ensure_running()
    t_ens = time.monotonic() - t
    p = ctx.Process(target=noop)
    p.start()
    results["slow preload (2 s): ensure_running / first start() (s)"] = (round(t_ens, 3), round(time.monotonic() - t, 3))
    p.join()
    err = os.path.join(tmp, "server-stderr")
    for attempt in (1, 2, 3):
        if attempt == 1:
            restart(["fsb_boom"])
        time.sleep(0.2 if attempt == 3 else 0)
        saved = os.dup(2)
        with open(err, "ab") as e:
            os.dup2(e.fileno(), 2)
        t = time.monotonic()
        try:
            p = ctx.Process(target=noop)
            p.start()
            p.join(10)
            what = f"started, exitcode {p.exitcode}"
        except BaseException as e:  # noqa: BLE001
            what = f"{type(e).__name__}: {e}"
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        results[f"preload raising RuntimeError, start() #{attempt}"] = f"{what} after {time.monotonic() - t:.2f}s"
    results["  server's traceback went to the parent's stderr"] = "boom while preloading" in open(err).read()

    # 4. Server lifetime: killed while a trial runs; stop while a trial runs; parent death
    restart([])
    p = ctx.Process(target=sleeper, args=(5,))
    p.start()
    old = fs._forkserver_pid
    os.kill(old, signal.SIGKILL)
    t = time.monotonic()
    p.join(10)
    results["server SIGKILLed during a trial: exitcode / seen after (s) / trial still running"] = (
        p.exitcode, round(time.monotonic() - t, 3), _alive(p.pid))
    os.kill(p.pid, signal.SIGKILL)
    tries = []
    for _ in range(3):  # ensure_running() restarts a server it can waitpid as dead; a dying one is not yet
        q = ctx.Process(target=noop)
        try:
            q.start()
            q.join()
            tries.append(f"exitcode {q.exitcode}, new server {fs._forkserver_pid not in (None, old)}")
            break
        except (EOFError, OSError) as e:
            tries.append(f"{type(e).__name__}: {e}")
    results["start() right after the server's death"] = tries
    p = ctx.Process(target=sleeper, args=(2,))
    p.start()
    t = time.monotonic()
    fs._stop()
    results["_stop() (private; no public stop, no idle exit) while a 2 s trial runs: blocks (s)"] = round(time.monotonic() - t, 2)
    p.join()
    out = os.path.join(tmp, "watch.json")
    subprocess.run([sys.executable, __file__, "--_subparent", out], stdout=subprocess.DEVNULL, timeout=60)
    with open(out + ".parent") as f:
        info = json.load(f)
    time.sleep(0.5)
    server_alive_after_parent = _alive(info["server"])
    deadline = time.time() + 10
    while not os.path.exists(out) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)
    with open(out) as f:
        w = json.load(f)
    results["parent exits during a trial: child sees parent_process().sentinel after (s)"] = round(w["at"] - info["exited_at"], 3)
    results["  server alive 0.5 s after the parent's exit / after the child ended"] = (server_alive_after_parent,
                                                                                        _alive(info["server"]))

    # 5. Concurrent launches from threads
    restart([])
    forkserver.ensure_running()
    outcome: list = []
    barrier = threading.Barrier(8)

    def launch() -> None:
        barrier.wait()
        p = ctx.Process(target=noop)
        p.start()
        p.join()
        outcome.append((p.pid, p.exitcode))

    threads = [threading.Thread(target=launch) for _ in range(8)]
    t = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    results["8 threads start() at once: distinct pids, exit codes, seconds"] = (
        len({o[0] for o in outcome}), sorted({o[1] for o in outcome}), round(time.monotonic() - t, 3))
    fs._stop()

    width = max(len(k) for k in results)
    for k, v in results.items():
        print(f"{k:<{width}}  {v}")


def _subparent(out: str) -> None:
    import multiprocessing
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([])
    p = ctx.Process(target=watch_parent, args=(out,))
    p.start()
    time.sleep(0.3)
    with open(out + ".parent", "w") as f:
        json.dump({"server": forkserver._forkserver._forkserver_pid, "child": p.pid, "exited_at": time.time()}, f)
    os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checks", action="store_true", help="behavioural checks of the stdlib forkserver (stdlib only)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steady", type=int, default=3, help="launches per round after a server's first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where the FIFOs and logs go (default: the temp dir)")
    ap.add_argument("--json", default=None, help="write every measurement here")
    ap.add_argument("--main-rerun", action="store_true",
                    help="run as __main__ (the stdlib children then run this file again each launch)")
    ap.add_argument("--_subparent", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._subparent:
        _subparent(args._subparent)
    elif args.checks:
        run_checks(args)
    elif __name__ == "__main__" and not args.main_rerun:
        # Before 3.13.8/3.14.1 the stdlib forkserver runs the parent's __main__ file again in every child
        # (multiprocessing/spawn.py: prepare -> _fixup_main_from_path -> runpy.run_path; ~10 ms for this
        # file). llmtune's __main__ is a 5-line console script and a wrapper would live in a preloaded
        # module, so run this file as such a module under a `-c` main (nothing to run again).
        here = os.path.dirname(os.path.abspath(__file__))
        os.environ["PYTHONPATH"] = os.pathsep.join([here] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        name = os.path.splitext(os.path.basename(__file__))[0]
        os.execv(sys.executable, [sys.executable, "-c", f"import {name}; {name}.main()", *sys.argv[1:]])
    else:
        run_bench(args)


if __name__ == "__main__":
    main()
