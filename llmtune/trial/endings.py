"""How a trial can end: one table, read by everything that asks.

Each row says, for one status, what Optuna is told (its state), whether the configuration teaches the
sampler it is infeasible, whether the trial counts towards ``study.n_trials``, whether its exact
settings are queued again (and how often), and whether the pruner may rank other trials against its
curve. Adding or changing an ending is one row here; `classify` decides which row a finished trial
process gets, and the marker lists below say what text in an error or a log means.

It is also the one place that *decides* how a trial ended (ARCHITECTURE decision 10): the child writes
what it saw (`result.json`), the parent what it saw (`classify`, `conclude`), and `decide` settles the
rest (a missing objective, a PBT segment, the retry limits) before `llmtune.study.record` records it.

Imports nothing heavy (no optuna, no torch): the trial process, the search loop, the pruner and the
readers all use it.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llmtune.trial.result import TrialResult, finite


@dataclass(frozen=True)
class Ending:
    status: str          # stored on the trial as the user attribute llmtune.status
    optuna_state: str    # what the study is told: COMPLETE (with values), PRUNED or FAIL
    infeasible: bool     # told as a constraint violation, so the sampler avoids its neighbourhood
    counts: bool         # counts towards study.n_trials
    retried: bool        # its exact settings are queued again, to run before any new configuration
    pruner_uses: bool    # its learning curve takes part in the pruner's ranking at a rung
    help: str
    retry_limit: int | None = None  # with retried: how many times one configuration is retried for this
    #                                 ending (None: each time); past it, the trial ends `crashed` (final)


COMPLETE = "complete"
PRUNED = "pruned"
OOM = "oom"
OVER_BUDGET = "over_budget"
CRASHED = "crashed"
TIMEOUT = "timeout"
INTERRUPTED = "interrupted"
KILLED = "killed"
ENVIRONMENT = "environment"
SURPLUS = "surplus"
DIVERGED = "diverged"
SEGMENT = "segment"

# Infeasible trials are told COMPLETE with penalty values: Optuna's samplers learn only from COMPLETE
# trials, and the constraint value > 0 keeps them off every front (decision 3).
ENDINGS: dict[str, Ending] = {e.status: e for e in [
    #      status        optuna      infeas. counts retried pruner
    Ending(COMPLETE,     "COMPLETE", False,  True,  False,  True,  "trained, evaluated and measured"),
    Ending(PRUNED,       "PRUNED",   False,  True,  False,  True,  "stopped early by the pruner; partial metrics kept"),
    Ending(OOM,          "COMPLETE", True,   True,  False,  False, "ran out of memory"),
    Ending(OVER_BUDGET,  "COMPLETE", True,   True,  False,  False, "predicted or measured over the memory budget; not run"),
    Ending(DIVERGED,     "COMPLETE", True,   True,  False,  False, "its loss blew up (non-finite, or far above the "
           "untrained model's: `llmtune.harness.train.diverged`); stopped at once, the sampler avoids its neighbourhood"),
    Ending(SEGMENT,      "COMPLETE", False,  True,  False,  True,  "a population-based training member trained and "
           "evaluated to the end of one segment (study.pbt_settings.interval), saved; it goes on in a later trial"),
    Ending(CRASHED,      "FAIL",     False,  True,  False,  False, "any other error; the log tail is kept"),
    Ending(TIMEOUT,      "FAIL",     False,  True,  False,  False, "killed at study.trial_timeout"),
    Ending(INTERRUPTED,  "FAIL",     False,  False, True,   False, "the search was stopped or its worker died; retried"),
    Ending(KILLED,       "FAIL",     False,  False, True,   False, "killed by SIGKILL with no sign of running out of "
           "memory (see `classify`); retried once, a second kill of the same settings is final (crashed)",
           retry_limit=1),
    Ending(ENVIRONMENT,  "FAIL",     False,  False, True,   False, "its surroundings failed, not its settings: the disk "
           "filled up or a connection dropped (ENVIRONMENT_MARKERS); retried, with a growing wait, and never final: "
           "a disk that stays full stops the search instead (study/outages.py, ENVIRONMENT_STOP endings in a row), "
           "and the next start runs the configuration again"),
    Ending(SURPLUS,      "FAIL",     False,  False, False,  False, "never run: another worker took the last of n_trials"),
]}
STATUSES = tuple(ENDINGS)
RUNNING = "running"  # the status a trial carries while it runs; not an ending


def ending(status: str | None) -> Ending | None:
    """The row of a status, or None for a trial that has not ended (or was not written by llmtune)."""
    return ENDINGS.get(status) if status else None


def is_infeasible(status: str | None) -> bool:
    row = ending(status)
    return row is not None and row.infeasible


def counts(status: str | None) -> bool:
    row = ending(status)
    return row is not None and row.counts


def retried(status: str | None) -> bool:
    """Whether a trial that ended so is queued again (its configuration is not done)."""
    row = ending(status)
    return row is not None and row.retried


def pruner_ignores(status: str | None) -> bool:
    """True for trials that stopped for reasons unrelated to their loss: their curves say nothing
    honest about the configuration, so they must not raise or lower anyone's cutoff."""
    row = ending(status)
    return row is not None and not row.pruner_uses


# Text in an error or in a trial's log that says how it ended. DefaultCPUAllocator is torch's host allocator:
# a CPU trial that runs out of memory raises a plain RuntimeError with that text.
OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "torch.OutOfMemoryError", "MemoryError", "CUBLAS_STATUS_ALLOC_FAILED",
               "DefaultCPUAllocator: can't allocate memory")
# A full disk (ENOSPC, EDQUOT, in Python's and in Rust's words: safetensors) or a dropped connection (a Hub
# download, a database): nothing the configuration did, so the trial is retried, never recorded as its result.
ENVIRONMENT_MARKERS = ("No space left on device", "Disk quota exceeded", "StorageFull", "[Errno 28]",
                       "Connection reset by peer", "Connection refused", "Network is unreachable",
                       "Temporary failure in name resolution", "server closed the connection unexpectedly",
                       "could not connect to server")


def from_text(text: str, *, last: int | None = None) -> tuple[str, str] | None:
    """The ending an error message or a log tail names, with its reason: out of memory or an environment
    failure; None when it names neither. Out of memory wins: it is about the configuration. With `last`,
    an environment failure counts only in the last lines (the error a log ends with, not a warning some
    library printed before it crashed for another reason)."""
    tail = "\n".join(text.strip().splitlines()[-last:]) if last else text
    for status, markers, where, what in ((OOM, OOM_MARKERS, text, "out of memory"),
                                         (ENVIRONMENT, ENVIRONMENT_MARKERS, tail, "its environment failed, not its settings")):
        found = next((m for m in markers if m in where), None)
        if found:
            line = next((ln.strip() for ln in reversed(where.splitlines()) if found in ln), found)
            return status, f"{what}: {line[:300]}"
    return None


def classify(returncode: int | None, result: TrialResult | None, tail: str, *, timed_out: bool,
             interrupted: bool, timeout: float, memory_evidence: str | None = None,
             disk_full: str | None = None) -> tuple[str, str]:
    """How a trial process ended: (status, reason). What the parent saw wins over what the child wrote.

    A SIGKILL the parent did not send is the kernel's out-of-memory killer only with evidence of it
    (`memory_evidence`, gathered by the runner: an oom_kill counter that rose, memory nearly exhausted
    while it ran); without any it is `killed` (a person, another process or a scheduler), retried once.
    `disk_full`: the trial's disk had no space left when it ended without a result (then its own log
    may be empty too)."""
    if interrupted:
        return INTERRUPTED, "the search was interrupted while this trial ran"
    if timed_out:
        return TIMEOUT, f"killed after study.trial_timeout of {timeout:g}s"
    if result is not None and result.status in ENDINGS:
        return result.status, result.reason
    named = from_text(tail, last=3)
    if named:
        status, reason = named
        return status, f"{reason} (from the trial log)"
    if returncode is not None and returncode < 0 and -returncode == signal.SIGKILL:
        if memory_evidence:
            return OOM, f"killed by SIGKILL with no result, and {memory_evidence}: the kernel's out-of-memory killer"
        return KILLED, ("killed by SIGKILL with no result and no sign of running out of memory "
                        "(a person, another process or a scheduler killed it)")
    if disk_full:
        return ENVIRONMENT, f"ended with no result while {disk_full}"
    if returncode is None:
        return CRASHED, "the trial process was lost: the fork server that started it stopped"
    last = tail.strip().splitlines()[-1] if tail.strip() else "no output"
    return CRASHED, f"trial process exited with code {returncode}: {last[:300]}"


def conclude(returncode: int | None, result: TrialResult | None, tail: str, settings: dict[str, Any], *,
             timed_out: bool, interrupted: bool, timeout: float, memory_evidence: str | None = None,
             disk_full: str | None = None) -> TrialResult:
    """The trial process's result with the ending `classify` gives it (a new result when it wrote none)."""
    status, reason = classify(returncode, result, tail, timed_out=timed_out, interrupted=interrupted,
                              timeout=timeout, memory_evidence=memory_evidence, disk_full=disk_full)
    if result is None:
        result = TrialResult(status=status, reason=reason, settings=settings)
    result.status, result.reason = status, reason
    if status != COMPLETE and tail:
        result.info.setdefault("log_tail", tail)
    return result


def not_run(status: str, reason: str, settings: dict[str, Any], predicted_memory_gb: float | None = None) -> TrialResult:
    """A trial (or a probe) that never ran: predicted over the memory budget, or no layout of it fits."""
    result = TrialResult(status=status, reason=reason, settings=settings)
    if predicted_memory_gb is not None:
        result.metrics["predicted_memory_gb"] = predicted_memory_gb
    return result


def no_layout_fits(found: Sequence[TrialResult], summary: str, settings: dict[str, Any]) -> TrialResult:
    """The ending of a learning configuration none of whose execution variants could run (study/probes.py):
    a probe's crash when one crashed (so that fail-fast sees it), else out of memory or over budget."""
    failed = next((r for r in found if r.status not in (OVER_BUDGET, OOM, COMPLETE)), None)
    if failed is not None:
        return failed
    status = OOM if any(r.status == OOM for r in found) else OVER_BUDGET
    return not_run(status, f"no execution variant fits: {summary}", settings)


@dataclass(frozen=True)
class SegmentEnd:
    """What a PBT segment's ending depends on beyond its result (study/pbt.py)."""

    member: int
    index: int       # 0-based segment
    count: int       # segments per member
    state_dir: str   # where it had to save its state
    saved: bool      # whether it did


def decide(result: TrialResult, objectives: Sequence[str], *, earlier: Callable[[str], int] = lambda status: 0,
           segment: SegmentEnd | None = None) -> TrialResult:
    """Settle a trial's ending, once, before it is recorded; returns the result, changed where needed.

    - a PBT segment that trained: `segment` unless it is the member's last (then `complete`); `crashed`
      when it saved no state to go on from;
    - a trial that says complete (or segment) but did not measure every objective crashed: it cannot be ranked;
    - a retried ending (`Ending.retried`) whose settings already ended so `retry_limit` times
      (`earlier(status)`: counted along the trial's retry chain) is final: `crashed`.
    Non-finite metrics are dropped first (they are no measurement)."""
    result.metrics = {k: v for k, v in result.metrics.items() if finite(v)}
    if segment is not None and result.status == COMPLETE:
        if not segment.saved:
            result.status, result.reason = CRASHED, f"the segment saved no state in {segment.state_dir}"
        elif segment.index < segment.count - 1:
            result.status = SEGMENT
            result.reason = (f"member {segment.member}, segment {segment.index + 1} of {segment.count}: "
                             "continued by a later trial")
    missing = [m for m in objectives if m not in result.metrics]
    if result.status in (COMPLETE, SEGMENT) and missing:
        result.status, result.reason = CRASHED, f"the trial did not measure {', '.join(missing)}"
    row = ENDINGS[result.status]
    if row.retried and row.retry_limit is not None:
        before = earlier(result.status)
        if before >= row.retry_limit:
            result.reason = f"{result.reason}; its settings ended {result.status} {before} time(s) before: final"
            result.status = CRASHED
    return result
