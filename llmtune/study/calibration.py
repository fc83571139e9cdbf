"""Correcting the memory prediction with what a study measured: a linear fit of measured peaks on
predicted ones (`llmtune.study.memory` predicts, `llmtune.study.gate` applies the correction)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any


@dataclass
class MemoryCalibration:
    """Fitted correction from measured peaks of a study: predicted' = a * predicted + b (least squares on
    (estimate.total, measured) pairs, falling back to a pure ratio with <3 points, identity with none)."""

    scale: float = 1.0
    offset: float = 0.0  # bytes
    n: int = 0
    median_rel_error: float | None = None  # of the *uncalibrated* estimate on the fitting points
    worst_rel_error: float | None = None

    @classmethod
    def fit(cls, pairs: Sequence[tuple[int, int]]) -> MemoryCalibration:
        """Fit on (predicted_total_bytes, measured_peak_bytes) pairs."""
        pts = [(float(p), float(m)) for p, m in pairs if p > 0 and m > 0]
        if not pts:
            return cls()
        errs = [abs(p - m) / m for p, m in pts]  # relative error of the raw prediction vs the measurement
        median, worst = statistics.median(errs), max(errs)
        xs, ys = [p for p, _ in pts], [m for _, m in pts]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        var = sum((x - mx) ** 2 for x in xs)
        if len(pts) >= 3 and var > 0:
            scale = sum((x - mx) * (y - my) for x, y in pts) / var
            offset = my - scale * mx
            if scale <= 0:  # a noisy fit must never flip the ordering of configs; use the ratio instead
                scale, offset = sum(ys) / sum(xs), 0.0
        else:
            scale, offset = sum(ys) / sum(xs), 0.0
        return cls(scale, offset, len(pts), median, worst)

    def apply(self, predicted_bytes: int) -> int:
        """Calibrated prediction in bytes."""
        return max(0, int(round(self.scale * predicted_bytes + self.offset)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (for optuna study user attrs)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryCalibration:
        """Inverse of ``to_dict``; unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
