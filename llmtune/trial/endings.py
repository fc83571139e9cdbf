"""How a trial can end: one table, read by everything that asks.

Each row says, for one status, what Optuna is told (its state), whether the configuration teaches the
sampler it is infeasible, whether the trial counts towards ``study.n_trials``, whether its exact
settings are queued again, and whether the pruner may rank other trials against its curve. Adding or
changing an ending is one row here; `classify` decides which row a finished trial process gets.

Imports nothing heavy: the trial process, the search loop, the pruner and the readers all use it.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from llmtune.trial.result import TrialResult


@dataclass(frozen=True)
class Ending:
    status: str          # stored on the trial as the user attribute llmtune.status
    optuna_state: str    # what the study is told: COMPLETE (with values), PRUNED or FAIL
    infeasible: bool     # told as a constraint violation, so the sampler avoids its neighbourhood
    counts: bool         # counts towards study.n_trials
    retried: bool        # its exact settings are queued again, to run before any new configuration
    pruner_uses: bool    # its learning curve takes part in the pruner's ranking at a rung
    help: str


COMPLETE = "complete"
PRUNED = "pruned"
OOM = "oom"
OVER_BUDGET = "over_budget"
CRASHED = "crashed"
TIMEOUT = "timeout"
INTERRUPTED = "interrupted"
SURPLUS = "surplus"

# Infeasible trials are told COMPLETE with penalty values: Optuna's samplers learn only from COMPLETE
# trials, and the constraint value > 0 keeps them off every front (decision 3).
ENDINGS: dict[str, Ending] = {e.status: e for e in [
    #      status        optuna      infeas. counts retried pruner
    Ending(COMPLETE,     "COMPLETE", False,  True,  False,  True,  "trained, evaluated and measured"),
    Ending(PRUNED,       "PRUNED",   False,  True,  False,  True,  "stopped early by the pruner; partial metrics kept"),
    Ending(OOM,          "COMPLETE", True,   True,  False,  False, "ran out of memory"),
    Ending(OVER_BUDGET,  "COMPLETE", True,   True,  False,  False, "predicted or measured over the memory budget; not run"),
    Ending(CRASHED,      "FAIL",     False,  True,  False,  False, "any other error; the log tail is kept"),
    Ending(TIMEOUT,      "FAIL",     False,  True,  False,  False, "killed at study.trial_timeout"),
    Ending(INTERRUPTED,  "FAIL",     False,  False, True,   False, "the search was stopped or its worker died; retried"),
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


def pruner_ignores(status: str | None) -> bool:
    """True for trials that stopped for reasons unrelated to their loss: their curves say nothing
    honest about the configuration, so they must not raise or lower anyone's cutoff."""
    row = ending(status)
    return row is not None and not row.pruner_uses


OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "torch.OutOfMemoryError", "MemoryError", "CUBLAS_STATUS_ALLOC_FAILED")


def classify(returncode: int | None, result: TrialResult | None, tail: str, *, timed_out: bool,
             interrupted: bool, timeout: float) -> tuple[str, str]:
    """How a trial process ended: (status, reason). What the parent saw wins over what the child wrote."""
    if interrupted:
        return INTERRUPTED, "the search was interrupted while this trial ran"
    if timed_out:
        return TIMEOUT, f"killed after study.trial_timeout of {timeout:g}s"
    if result is not None and result.status in ENDINGS:
        return result.status, result.reason
    if any(m in tail for m in OOM_MARKERS):
        return OOM, "out of memory (from the trial log)"
    if returncode is not None and returncode < 0 and -returncode == signal.SIGKILL:
        return OOM, "killed by SIGKILL with no result: most likely the kernel's out-of-memory killer"
    if returncode is None:
        return CRASHED, "the trial process was lost: the fork server that started it stopped"
    last = tail.strip().splitlines()[-1] if tail.strip() else "no output"
    return CRASHED, f"trial process exited with code {returncode}: {last[:300]}"


def check_measured(result: TrialResult, objectives: list[str]) -> None:
    """A trial that says complete but did not measure every objective has crashed (it cannot be ranked)."""
    missing = [m for m in objectives if m not in result.metrics]
    if result.status == COMPLETE and missing:
        result.status, result.reason = CRASHED, f"the trial did not measure {', '.join(missing)}"
