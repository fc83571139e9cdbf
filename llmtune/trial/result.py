"""What one trial produced: its status, metrics, learning curve and provenance (``result.json``).

Shared by the trial process that writes it and the search process that reads it; no torch here.
How a trial can end (its ``status``) is one table: `llmtune.trial.endings`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Beside result.json: each answer the adapter gave to an eval row, with the reference (`harness/generate.py`).
GENERATIONS_FILE = "generations.jsonl"


@dataclass
class TrialResult:
    status: str
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    curve: list[list[float]] = field(default_factory=list)  # [fraction of budget, eval loss]
    settings: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)      # timings, token counts, versions, paths

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=_jsonable, allow_nan=True)

    def save(self, path: str | Path) -> None:
        from llmtune.files import write_atomic

        write_atomic(path, self.to_json())  # a reader never sees half a result

    @classmethod
    def load(cls, path: str | Path) -> TrialResult:
        data = json.loads(Path(path).read_text())
        return cls(**{k: data[k] for k in ("status", "reason", "metrics", "curve", "settings", "info") if k in data})

    @property
    def base_eval_loss(self) -> float | None:
        return next((loss for frac, loss in self.curve if frac == 0.0), None)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
