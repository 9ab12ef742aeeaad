"""Mean ± sample standard deviation over run seeds, as the seed report (bismap.report.seeds) shows them.

The standard deviation is the sample one (ddof = 1). With a single defined value
(one seed, or one seed where a figure exists) it is undefined: ``None`` in JSON,
"—" in Markdown. Values that are None or NaN (e.g. a gap share without an
oracle) are left out of both.

``ci95`` is the Student-t 95% interval of the mean: for per-seed differences
(a gain over the same seed's warmup, a component's effect over the row before
it) that is the paired interval. With two seeds t(0.975, 1) = 12.71, so the
half-width is 9x the std; :func:`verdict` calls an effect "no effect" only
where the whole interval lies within ±``NO_EFFECT_MARGIN`` mIoU.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from scipy import stats

NO_EFFECT_MARGIN = 1.0  # mIoU points: an interval inside (-1, +1) is narrow enough to say "no effect"


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "values"}``: mean and sample std (ddof = 1) of the defined values; None where undefined."""
    defined = [float(value) for value in values if value is not None and not math.isnan(value)]
    return {"mean": statistics.fmean(defined) if defined else None,
            "std": statistics.stdev(defined) if len(defined) > 1 else None,
            "ci95": confidence_interval(defined),
            "values": [None if value is None or math.isnan(value) else float(value) for value in values]}


def confidence_interval(defined: Sequence[float], level: float = 0.95) -> list[float] | None:
    """[low, high]: the Student-t interval of the mean of ``defined`` (n - 1 degrees of freedom); None if n < 2."""
    if len(defined) < 2:
        return None
    mean = statistics.fmean(defined)
    half = float(stats.t.ppf(0.5 + level / 2, len(defined) - 1)) * statistics.stdev(defined) / math.sqrt(len(defined))
    return [mean - half, mean + half]


def verdict(interval: Sequence[float] | None, margin: float = NO_EFFECT_MARGIN) -> str:
    """What a paired interval allows one to say: gain, loss, no effect (inside ±margin), or not resolved."""
    if interval is None:
        return "one seed"
    low, high = interval
    if low > 0:
        return "gain"
    if high < 0:
        return "loss"
    return "no effect" if -margin < low and high < margin else "not resolved"


def format_interval(interval: Sequence[float] | None, digits: int = 1) -> str:
    """'[-1.2, +3.4]', or '—' without an interval."""
    return "—" if interval is None else "[" + ", ".join(f"{value:+.{digits}f}" for value in interval) + "]"


def format_stat(stat: dict[str, Any], signed: bool = False, digits: int = 1) -> str:
    """'31.2 ± 0.4' ('+1.3 ± 0.2' when ``signed``); '31.2 ± —' without a std, '-' without a mean."""
    if stat["mean"] is None:
        return "-"
    mean = f"{stat['mean']:+.{digits}f}" if signed else f"{stat['mean']:.{digits}f}"
    return f"{mean} ± {'—' if stat['std'] is None else format(stat['std'], f'.{digits}f')}"
