"""Segments of one training run: train only steps [start, stop) of a trial's plan, resume from a saved
state and save one, with the learning rate, warmup and LoRA dropout set per segment (a *schedule*).

Population-based training (`llmtune.study.pbt`) runs each segment of a member as its own trial process;
`llmtune train --schedule FILE` replays a member's whole schedule as one trial. Both go through here, so
they make the same updates: the plan of optimizer steps is fixed by the seed before training
(`harness.data.plan_batches`), the learning rate of step i is ``peak_lr(segment of i) x factor(i)``, where
``factor`` is the recipe's scheduler (warmup + cosine, ...) over the *whole* plan with the segment's warmup,
and a saved state holds everything a step reads: the LoRA tensors, the optimizer state, the RNG that
dropout draws from and the step index. On CPU a run cut into segments equals one run bit for bit
(tests/test_pbt.py).

A schedule is a list of entries ``{"until": fraction of the budget, "values": {setting: value}}``, ascending,
the last ending at 1; an entry's values apply to the steps before its ``until``. Only the settings in
`PERTURBABLE` may change between entries: the others fix the adapter's shape or the data plan.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmtune.config.settings import TrialSettings
from llmtune.config.space import PERTURBABLE
from llmtune.harness.data import Plan

STATE_FILE = "state.pt"
META_FILE = "meta.json"
# The schedule of a plain trial: its own settings over the whole budget (a continued trial runs it too).
WHOLE_RUN: list[dict[str, Any]] = [{"until": 1.0, "values": {}}]


class SegmentError(ValueError):
    """A segment or schedule that cannot run as given (the message says why and what to do)."""


def check_schedule(schedule: Any, until: float = 1.0) -> list[str]:
    """What is wrong with a schedule that must cover the budget up to ``until`` (empty when nothing is)."""
    if not isinstance(schedule, list) or not schedule:
        return ["schedule must be a non-empty list of {until: fraction, values: {setting: value}}"]
    problems: list[str] = []
    last = 0.0
    for i, entry in enumerate(schedule):
        if not isinstance(entry, dict) or not isinstance(entry.get("values"), dict):
            problems.append(f"schedule[{i}] must be a mapping with 'until' and 'values'")
            continue
        end = entry.get("until")
        if not isinstance(end, (int, float)) or isinstance(end, bool) or not last < end <= 1.0:
            problems.append(f"schedule[{i}].until={end!r} must be a fraction of the budget in ({last:g}, 1], "
                            "ascending")
        else:
            last = float(end)
        bad = [k for k in entry["values"] if k not in PERTURBABLE]
        if bad:
            problems.append(f"schedule[{i}].values: {', '.join(bad)} cannot change per segment (only "
                            f"{', '.join(PERTURBABLE)}); fix them in the recipe instead")
    if not problems and schedule[-1]["until"] < until:
        problems.append(f"the schedule ends at {schedule[-1]['until']}, before {until:g}: its last entry must have "
                        f"until: {until:g}")
    return problems


@dataclass
class SegmentSpec:
    """What a trial process is asked to run: which part of the plan, from which state, saved where."""

    schedule: list[dict[str, Any]]
    start: float = 0.0            # fraction of the budget already trained (0: from the untrained adapter)
    stop: float = 1.0             # fraction of the budget to train to
    resume: str | None = None     # state folder to start from (required when start > 0)
    save: str | None = None       # state folder to write at the end
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmentSpec:
        spec = cls(schedule=data["schedule"], start=float(data.get("start", 0.0)), stop=float(data.get("stop", 1.0)),
                   resume=data.get("resume"), save=data.get("save"))
        problems = check_schedule(spec.schedule, spec.stop)
        if not 0.0 <= spec.start < spec.stop <= 1.0:
            problems.append(f"segment start={spec.start} and stop={spec.stop}: need 0 <= start < stop <= 1")
        if spec.start > 0 and not spec.resume:
            problems.append(f"a segment that starts at {spec.start} needs a state to resume from")
        if problems:
            raise SegmentError("; ".join(problems))
        return spec


def boundary(plan: Plan, fraction: float) -> int:
    """The number of optimizer steps done when ``fraction`` of the budget is reached (where evals happen)."""
    if fraction <= 0.0:
        return 0
    if fraction >= 1.0 - 1e-9:
        return len(plan.steps)
    return plan.step_at(fraction) + 1


def shape_settings(settings: TrialSettings) -> dict[str, Any]:
    """The settings that must be the same across a member's segments (all but `PERTURBABLE`)."""
    return {k: v for k, v in settings.as_dict().items() if k not in PERTURBABLE}


def set_lora_dropout(model: Any, p: float) -> None:
    """Give every LoRA layer dropout ``p`` (peft builds an Identity where p is 0, so modules are replaced)."""
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for name in list(drops.keys()):
                drops[name] = torch.nn.Dropout(p) if p > 0 else torch.nn.Identity()


class SegmentRun:
    """Drives one segment inside the harness's training loop: which steps run, each step's learning rate
    and dropout, loading the state it starts from and saving the one it ends with."""

    def __init__(self, spec: SegmentSpec, plan: Plan, settings: TrialSettings, scheduler_kind: str,
                 model: Any, optimizer: torch.optim.Optimizer, device: str):
        self.spec, self.plan, self.settings, self.kind = spec, plan, settings, scheduler_kind
        self.model, self.optimizer, self.device = model, optimizer, device
        self.n_steps = len(plan.steps)
        self.ends = [boundary(plan, float(e["until"])) for e in spec.schedule]
        self.start_step, self.stop_step = boundary(plan, spec.start), boundary(plan, spec.stop)
        if self.stop_step <= self.start_step:
            raise SegmentError(
                f"the segment from {spec.start:g} to {spec.stop:g} of the budget has no optimizer step (the plan has "
                f"{self.n_steps}); raise train.budget or study.pbt_settings.interval")
        self._factors: dict[int, Any] = {}
        self._entry: int | None = None
        self.step_losses: list[float] = []
        if spec.resume:
            self._load(Path(spec.resume))

    # -- per step ------------------------------------------------------------------------------------
    def entry(self, step: int) -> dict[str, Any]:
        """The schedule entry in force at optimizer step ``step`` (0-based)."""
        return self.spec.schedule[self._entry_index(step)]

    def _entry_index(self, step: int) -> int:
        return next((i for i, end in enumerate(self.ends) if step < end), len(self.ends) - 1)

    def value(self, step: int, name: str) -> Any:
        values = self.entry(step)["values"]
        return values[name] if name in values else getattr(self.settings, name)

    def warmup(self, step: int) -> int:
        values = self.entry(step)["values"]
        if "warmup_steps" in values or ("warmup_ratio" not in values and self.settings.warmup_steps is not None):
            return int(self.value(step, "warmup_steps"))
        return int(math.ceil(float(self.value(step, "warmup_ratio")) * self.n_steps))

    def lr(self, step: int) -> float:
        """peak learning rate of the step's segment x the scheduler's factor at the step, as
        torch's LambdaLR computes it (base_lr * lambda(step)), so a constant schedule equals a plain trial."""
        warmup = self.warmup(step)
        if warmup not in self._factors:
            from transformers import get_scheduler

            dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            sched = get_scheduler(self.kind, dummy, num_warmup_steps=warmup, num_training_steps=self.n_steps)
            self._factors[warmup] = sched.lr_lambdas[0]
        return float(self.value(step, "learning_rate")) * float(self._factors[warmup](step))

    def before_step(self, step: int) -> None:
        index = self._entry_index(step)
        if index != self._entry:
            set_lora_dropout(self.model, float(self.value(step, "lora_dropout")))
            self._entry = index
        lr = self.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # -- state ---------------------------------------------------------------------------------------
    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _load(self, path: Path) -> None:
        file = path / STATE_FILE
        if not file.is_file():
            raise SegmentError(f"no saved state at {path} to resume from (was its segment's trial lost?)")
        meta = json.loads((path / META_FILE).read_text())
        if meta["steps_done"] != self.start_step or meta["n_steps"] != self.n_steps:
            raise SegmentError(
                f"the state at {path} was saved after step {meta['steps_done']} of {meta['n_steps']}; this segment "
                f"starts at step {self.start_step} of {self.n_steps}: the plan or the segment bounds differ")
        mine, theirs = shape_settings(self.settings), meta.get("shape_settings", {})
        changed = sorted(k for k in set(mine) | set(theirs) if json.dumps(mine.get(k)) != json.dumps(theirs.get(k)))
        if changed:
            raise SegmentError(f"the state at {path} was trained with other {', '.join(changed)}; only "
                               f"{', '.join(PERTURBABLE)} may change between segments")
        state = torch.load(file, map_location=self.device, weights_only=True)
        params = self._trainable()
        if set(params) != set(state["lora"]):
            raise SegmentError(f"the state at {path} holds other LoRA tensors than this model has")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state["lora"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["cpu"].cpu())
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])

    def save(self, steps_done: int) -> None:
        """Write the state after ``steps_done`` steps to spec.save (`save_state`)."""
        if self.spec.save:
            save_state(Path(self.spec.save), self.model, self.optimizer, self.device, steps_done, self.n_steps,
                       self.settings, self.spec.schedule)


def save_state(path: Path, model: Any, optimizer: torch.optim.Optimizer, device: str, steps_done: int, n_steps: int,
               settings: TrialSettings, schedule: list[dict[str, Any]] | None = None) -> None:
    """Write everything the next step reads (LoRA tensors, optimizer state, the RNG dropout draws from, the
    step index) to ``path``, atomically (a folder renamed into place): a reader sees a whole state or none,
    and a retried job replaces the one it left. A `SegmentRun` resumes from it: PBT's next segment, or a
    trial the pruner paused (study/promotion.py), continued bit for bit where it stopped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    cuda = torch.cuda.get_rng_state_all() if device == "cuda" else []
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state = {"lora": trainable, "optimizer": optimizer.state_dict(), "rng": {"cpu": torch.get_rng_state(), "cuda": cuda}}
    torch.save(state, tmp / STATE_FILE)
    meta = {"steps_done": steps_done, "n_steps": n_steps, "shape_settings": shape_settings(settings),
            "schedule": schedule or WHOLE_RUN}
    (tmp / META_FILE).write_text(json.dumps(meta, default=str))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
