"""Training logs to tensorboard / mlflow / wandb when the recipe's ``train.report_to`` asks: one
registry, whose names are the recipe's choices."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmtune import hardware

Sink = Callable[[dict[str, float], int], None]
# An opener starts a tracker for one trial: (out_dir, run_name, config) -> (sink, closer).
Opener = Callable[[Path, str, dict[str, Any]], tuple[Sink, Callable[[], Any]]]


def _tensorboard(out_dir: Path, run_name: str, config: dict[str, Any]) -> tuple[Sink, Callable[[], Any]]:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out_dir / "tensorboard"))

    def sink(metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            writer.add_scalar(k, v, step)
        writer.flush()

    return sink, writer.close


def _mlflow(out_dir: Path, run_name: str, config: dict[str, Any]) -> tuple[Sink, Callable[[], Any]]:
    import mlflow

    mlflow.start_run(run_name=run_name)
    mlflow.log_params({k: str(v) for k, v in config.items()})
    return (lambda m, s: mlflow.log_metrics(m, step=s)), mlflow.end_run


def _wandb(out_dir: Path, run_name: str, config: dict[str, Any]) -> tuple[Sink, Callable[[], Any]]:
    import wandb

    wandb.init(project=os.environ.get("WANDB_PROJECT", "llmtune"), name=run_name, config=config)
    return (lambda m, s: wandb.log(m, step=s)), wandb.finish


# name -> (the module it needs, how to open it)
TRACKERS: dict[str, tuple[str, Opener]] = {
    "tensorboard": ("tensorboard", _tensorboard),
    "mlflow": ("mlflow", _mlflow),
    "wandb": ("wandb", _wandb),
}


class Trackers:
    """The trial's trackers, closed by the trial itself (a trial process ends with os._exit, so exit
    handlers would not run)."""

    def __init__(self, names: list[str], out_dir: Path, run_name: str, config: dict[str, Any]):
        self.sinks: list[Sink] = []
        self.closers: list[Callable[[], Any]] = []
        for name in names:
            module, opener = TRACKERS[name]
            hardware.module_ready(module, f"train.report_to names {name}")
            sink, closer = opener(out_dir, run_name, config)
            self.sinks.append(sink)
            self.closers.append(closer)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink(metrics, step)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc: Any) -> None:
        for close in self.closers:
            close()
