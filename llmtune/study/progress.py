"""Showing a search as it runs: a live terminal view, or plain lines for logs and CI."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from llmtune.trial.result import TrialResult


def fmt_metric(name: str, value: Any) -> str:
    if value is None:
        return "—"
    if name == "trainable_params":
        return f"{value / 1e6:.2f}M" if value >= 1e5 else f"{int(value)}"
    if name == "train_throughput":
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class PlainProgress:
    """One line per trial start/end: for CI logs and `--quiet`."""

    def __init__(self, stream: Any = None):
        self.stream = stream or sys.stderr
        self.search: Any = None

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def start(self, search: Any) -> None:
        self.search = search
        self.t0 = time.time()

    def trial_started(self, number: int, values: dict[str, Any]) -> None:
        # Under probes the sampler's space is the learning settings; the execution variant comes after probing.
        searched = getattr(self.search, "sample_space", self.search.space).searched if self.search else []
        self._print(f"trial {number} started: " + ", ".join(f"{k}={fmt_metric(k, values.get(k))}" for k in searched))

    def trial_event(self, number: int, event: dict[str, Any]) -> None:
        pass

    def trial_finished(self, number: int, result: TrialResult) -> None:
        metrics = ", ".join(f"{k}={fmt_metric(k, result.metrics.get(k))}" for k in self.search.recipe.objectives)
        if getattr(self.search, "probing", False) and result.settings:
            from llmtune.study.probes import probed_settings

            metrics += " in " + ", ".join(f"{k}={result.settings.get(k)}" for k in probed_settings(self.search.space))
        reason = f" ({result.reason})" if result.reason else ""
        self._print(f"trial {number} {result.status}{reason}: {metrics} [{_fmt_duration(time.time() - self.t0)} elapsed]")

    def stop(self) -> None:
        pass


class LiveProgress(PlainProgress):
    """A rich live panel: trials i/N, elapsed and ETA, each running trial's phase, the front so far."""

    def __init__(self) -> None:
        super().__init__()
        self.running: dict[int, dict[str, Any]] = {}
        self.finished: list[tuple[int, TrialResult, float]] = []
        self._lock = threading.Lock()

    def start(self, search: Any) -> None:
        from rich.console import Console
        from rich.live import Live

        super().start(search)
        self.console = Console(stderr=True)
        self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False,
                         get_renderable=self._render)
        self.live.start()

    def trial_started(self, number: int, values: dict[str, Any]) -> None:
        with self._lock:
            self.running[number] = {"phase": "starting", "fraction": 0.0, "t0": time.time(), "values": values}

    def trial_event(self, number: int, event: dict[str, Any]) -> None:
        with self._lock:
            state = self.running.get(number)
            if state is None:
                return
            if event.get("event") == "phase":
                state["phase"] = event["phase"]
            elif event.get("event") == "progress":
                state["fraction"] = event.get("fraction", 0.0)
                state["loss"] = event.get("loss")
            elif event.get("event") == "eval":
                state["eval_loss"] = event.get("eval_loss")

    def trial_finished(self, number: int, result: TrialResult) -> None:
        with self._lock:
            state = self.running.pop(number, {"t0": time.time()})
            self.finished.append((number, result, time.time() - state["t0"]))
        reason = f" — {result.reason}" if result.reason and result.status != "complete" else ""
        self.console.print(f"trial {number}: [bold]{result.status}[/bold]{reason}  " + "  ".join(
            f"{k}={fmt_metric(k, result.metrics.get(k))}" for k in self.search.recipe.objectives))

    def _render(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        search = self.search
        total = search.n_trials if search else None
        elapsed = time.time() - self.t0
        with self._lock:
            done = len(self.finished)
            durations = [d for _, _, d in self.finished]
            running = dict(self.running)
        eta = ""
        if total and durations:
            left = max(0, total - done - len(running)) + len(running) * 0.5
            eta = f", about {_fmt_duration(sum(durations) / len(durations) * left / max(1, search.workers))} left"
        head = f"[bold]llmtune search[/bold]  trials {done}/{total or '∞'} done, {len(running)} running  ·  {_fmt_duration(elapsed)} elapsed{eta}"
        parts: list[Any] = [head]
        for number, st in sorted(running.items()):
            bar = "█" * int(20 * st.get("fraction", 0)) + "░" * (20 - int(20 * st.get("fraction", 0)))
            loss = f"  eval_loss {st['eval_loss']:.4f}" if st.get("eval_loss") is not None else ""
            parts.append(f"  trial {number}: {st['phase']:<8} {bar} {100 * st.get('fraction', 0):5.1f}%{loss}")
        front = self._front_table(Table)
        if front is not None:
            parts.append(front)
        return Group(*parts)

    def _front_table(self, table_cls: Any) -> Any:
        if not self.search or not getattr(self.search, "study", None):
            return None
        from llmtune.deliver.results import SearchResult

        try:
            rows = SearchResult(self.search.study, self.search.recipe).summary_rows()
        except Exception:  # the storage may be busy mid-write; the next refresh shows it
            return None
        if not rows:
            return None
        table = table_cls(title="Pareto front so far", title_justify="left")
        for col in rows[0]:
            table.add_column(col, justify="right")
        for row in rows[:10]:
            table.add_row(*(fmt_metric(k, v) for k, v in row.items()))
        return table

    def stop(self) -> None:
        if getattr(self, "live", None):
            self.live.stop()


def make_progress(quiet: bool) -> PlainProgress:
    return PlainProgress() if quiet or not sys.stderr.isatty() else LiveProgress()
