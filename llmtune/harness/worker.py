"""Entry point of a trial process: ``python -m llmtune.harness.worker spec.json``.

Protocol: one JSON object per line on the original stdout (events); for each ``eval`` event the
parent answers one line on stdin, ``{"stop": bool}``. Everything else the process prints (libraries,
warnings, tracebacks) goes to stderr, which the parent sends to ``trial.log``. A trial forked by the
fork server (`llmtune.trial.fork_server`) runs `serve` with a socket for events and answers instead.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any, TextIO


def _exit_with_parent(parent: int, search: int | None = None) -> None:
    """A trial whose search process died must not run on unseen, holding a GPU (it is retried).

    ``parent``: the process that started this one (the search, or its fork server, which exits with
    the search); ``search``: the search process itself, when it is not the parent."""
    while True:
        if os.getppid() != parent or (search is not None and not _alive(search)):
            os._exit(3)
        time.sleep(2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's (cannot be ours, but do not kill the trial over it)
        return True
    return True


def serve(spec_path: str, events: TextIO, answers: TextIO, parent: int, search: int | None = None) -> int:
    """Run the trial in ``spec_path``: events go out on ``events``, the pruner's answers come in on ``answers``."""
    spec = json.loads(open(spec_path).read())
    threading.Thread(target=_exit_with_parent, args=(parent, search), daemon=True).start()

    def on_event(event: dict[str, Any]) -> bool:
        events.write(json.dumps(event) + "\n")
        events.flush()
        if event.get("event") != "eval":
            return False
        answer = answers.readline()
        return bool(answer and json.loads(answer).get("stop"))

    from llmtune.config.recipe import recipe_from_dict
    from llmtune.harness.train import run_trial

    recipe = recipe_from_dict(spec["recipe"])
    result = run_trial(recipe, spec["values"], spec["out_dir"], fractions=spec["fractions"],
                       on_event=on_event, trial_number=spec.get("trial_number"),
                       base_eval=spec.get("base_eval"), probe_steps=spec.get("probe_steps"),
                       segment=spec.get("segment"), pause=spec.get("pause"))
    print(f"trial finished: {result.status} {result.reason}", file=sys.stderr)
    return 0


def main(spec_path: str) -> int:
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints must not corrupt the event channel
    sys.stdout = sys.stderr
    # The runner names its pid: a parent that died while this process was still importing is caught too.
    parent = int(os.environ.get("LLMTUNE_PARENT_PID", os.getppid()))
    return serve(spec_path, channel, sys.stdin, parent)


def end(code: int) -> None:
    """End a trial process at once. Interpreter teardown with torch loaded takes ~1 s on a small CPU and
    frees nothing the kernel does not free anyway; the trial closed its trackers and wrote its result."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:  # what C libraries printed through stdio
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass
    os._exit(code)


if __name__ == "__main__":
    end(main(sys.argv[1]))
