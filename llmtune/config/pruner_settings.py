"""The pruner's settings (``study.pruner_settings``): which each pruner takes and what each may be.

One set of rules, read by the recipe's check and by the pruners themselves (`llmtune.study.pruners`:
`make_pruner` and the ASHA / Hyperband constructors raise what `check_pruner_settings` and
`check_rung_settings` return).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmtune.config.choices import PRUNER_SETTINGS
from llmtune.config.values import as_number, to_bool, to_int

# Measured objectives are noisy (throughput varied ~12% between identical runs of the tabular benchmark),
# so a pruner setting `metric_tolerance` makes values within that relative difference tie: a trial that
# barely trains then cannot survive on a 1% throughput fluke. Default 0: in the replay benchmark a 5-10%
# tolerance cost more training seconds to reach 90% of the front (1.2x -> 1.7-2.1x with llmtune's sampler)
# and did not help on the raw-timing table, so it is for users who see noisy fronts, not the default.
DEFAULT_METRIC_TOLERANCE = 0.0
# Fractions travel through JSON and arithmetic on several machines; compare with a tolerance.
FRACTION_TOL = 1e-6


def _eta(eta: Any) -> str | None:
    if isinstance(eta, bool) or not isinstance(eta, int) or eta < 2:
        return f"setting 'eta'={eta!r} is invalid: use an integer >= 2 (e.g. eta=3)"
    return None


def _min_fraction(min_fraction: Any) -> str | None:
    ok = isinstance(min_fraction, (int, float)) and not isinstance(min_fraction, bool)
    if not ok or not (0.0 < float(min_fraction) < 1.0 - FRACTION_TOL):
        return (f"setting 'min_fraction'={min_fraction!r} is invalid: use a number in (0, 1), "
                "e.g. min_fraction=1/9 (1 would never prune: use pruner 'none' for that)")
    return None


def _min_trials(min_trials: Any, eta: int) -> str | None:
    if min_trials is not None and (isinstance(min_trials, bool) or not isinstance(min_trials, int) or min_trials < 1):
        return (f"setting 'min_trials_per_rung'={min_trials!r} is invalid: use an integer >= 1 "
                f"or leave it unset (defaults to eta={eta})")
    return None


def _tolerance(tolerance: Any) -> str | None:
    ok = isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool)
    if not ok or not 0.0 <= float(tolerance) < 1.0:
        return (f"setting 'metric_tolerance'={tolerance!r} is invalid: use a relative difference in [0, 1), "
                "e.g. metric_tolerance=0.1 to treat throughput within 10% as equal")
    return None


def _pause(pause: Any) -> str | None:
    if not isinstance(pause, bool):
        return (f"setting 'pause'={pause!r} is invalid: use true (a stopped trial keeps its state and may "
                "be promoted later) or false (stopped trials are killed, nothing kept)")
    return None


def check_rung_settings(eta: Any = 3, min_fraction: Any = 1 / 9, min_trials_per_rung: Any = None,
                        metric_tolerance: Any = DEFAULT_METRIC_TOLERANCE,
                        pause: Any = True) -> tuple[dict[str, Any], list[str]]:
    """ASHA's and Hyperband's settings, read (a number written as text is a number, `as_number`; ``true`` /
    ``false`` as text a bool) and checked: the values to run with (a bad one replaced by its default,
    ``min_trials_per_rung`` unset is eta: with fewer than eta trials at a rung the top-1/eta share rounds
    down to none, so there is no evidence yet to rank anyone out) and every problem, each one line."""
    problems: list[str] = []

    def checked(value: Any, why: str | None, default: Any) -> Any:
        if why:  # every bad setting is reported, not only the first
            problems.append(why)
            return default
        return value

    eta = to_int(as_number(eta))[0]  # YAML/CLI may hand over 3.0 or "3"; what is not a whole number stays as read
    eta = checked(eta, _eta(eta), 3)
    min_fraction = as_number(min_fraction)
    min_fraction = float(checked(min_fraction, _min_fraction(min_fraction), 1 / 9))
    min_trials_per_rung = as_number(min_trials_per_rung)
    min_trials_per_rung = checked(min_trials_per_rung, _min_trials(min_trials_per_rung, eta), None) or eta
    metric_tolerance = as_number(metric_tolerance)
    metric_tolerance = float(checked(metric_tolerance, _tolerance(metric_tolerance), DEFAULT_METRIC_TOLERANCE))
    pause, why = to_bool(pause)
    pause = checked(pause, why and _pause(pause), True)
    values = {"eta": eta, "min_fraction": min_fraction, "min_trials_per_rung": min_trials_per_rung,
              "metric_tolerance": metric_tolerance, "pause": pause}
    return values, problems


def check_pruner_settings(name: str, settings: Mapping[Any, Any]) -> list[str]:
    """Every problem with pruner ``name``'s (one of `PRUNER_SETTINGS`) ``settings``, each one line as users
    read it: a setting the pruner does not take, a value it cannot use."""
    allowed = PRUNER_SETTINGS[name]
    problems = []
    for setting, value in settings.items():
        if setting not in allowed:
            fix = f"allowed settings: {', '.join(allowed)}" if allowed else "it takes no settings"
            problems.append(f"pruner {name!r} has no setting {setting!r} (given {value!r}); {fix}")
    if allowed:
        given = {k: v for k, v in settings.items() if k in allowed}
        problems += [f"pruner {name!r}: {why}" for why in check_rung_settings(**given)[1]]
    return problems
