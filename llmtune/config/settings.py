"""One trial's settings, typed: what the harness trains with.

The search space (`llmtune.config.space`) hands Optuna and the study plain dicts (a trial's params are
stored as JSON and travel to the trial process); the harness turns them into a `TrialSettings` once, at
its door (`TrialSettings.of`), so that every use below it is checked by mypy (``settings.learning_rate``,
not ``float(settings["learning_rate"])``). Its fields are `PARAMS`, in order and with their types:
`tests/test_settings.py` fails if the two drift apart.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmtune.config.space import PARAMS


@dataclass(frozen=True)
class TrialSettings:
    """A trial's value of each searchable setting (`PARAMS`; help text there), derived ones resolved:
    ``lora_alpha`` is ``lora_alpha_ratio * lora_r`` unless set."""

    learning_rate: float
    lora_r: int
    lora_alpha: float
    lora_alpha_ratio: float
    lora_dropout: float
    lora_target_modules: str
    use_rslora: bool
    warmup_ratio: float
    warmup_steps: int | None
    sequence_len: int
    batch_size: int | None
    sample_packing: bool
    quantization: str
    bnb_4bit_quant_type: str
    bnb_4bit_use_double_quant: bool
    gradient_checkpointing: bool
    liger_kernels: bool
    micro_batch_size: int

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> TrialSettings:
        """Typed settings from a space's assignment (`SearchSpace.complete` / `suggest`, already checked
        against the recipe's rules); a setting it leaves out takes its default. A name that is not a setting
        is a programming error (the recipe refuses unknown settings before any trial)."""
        unknown = sorted(set(values) - set(PARAMS))
        if unknown:
            raise TypeError(f"not trial settings: {', '.join(unknown)} (known: {', '.join(PARAMS)})")
        typed: dict[str, Any] = {}
        for name, param in PARAMS.items():
            value = values.get(name, param.default)
            typed[name] = None if value is None else param.type(value)
        if typed["lora_alpha"] is None:
            typed["lora_alpha"] = float(typed["lora_alpha_ratio"] or 2.0) * typed["lora_r"]
        return cls(**typed)

    def as_dict(self) -> dict[str, Any]:
        """The settings as the study, result.json and trackers store them."""
        return dataclasses.asdict(self)

    def global_batch(self, gradient_accumulation_steps: int = 1) -> int:
        """Examples per optimizer step: ``batch_size``, or micro batches x accumulation when it is unset."""
        if self.batch_size is not None:
            return self.batch_size
        return self.micro_batch_size * gradient_accumulation_steps

    def warmup(self, n_steps: int) -> int:
        """Warmup in optimizer steps: ``warmup_steps``, else ``warmup_ratio`` of ``n_steps`` rounded up."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(math.ceil(self.warmup_ratio * n_steps))
