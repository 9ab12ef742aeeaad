"""Mean ± sample standard deviation over run seeds, as the seed report (bismap.report.seeds) shows them.

The standard deviation is the sample one (ddof = 1). With a single defined value
(one seed, or one seed where a figure exists) it is undefined: ``None`` in JSON,
"—" in Markdown. Values that are None or NaN (e.g. a gap share without an
oracle) are left out of both.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "values"}``: mean and sample std (ddof = 1) of the defined values; None where undefined."""
    defined = [float(value) for value in values if value is not None and not math.isnan(value)]
    return {"mean": statistics.fmean(defined) if defined else None,
            "std": statistics.stdev(defined) if len(defined) > 1 else None,
            "values": [None if value is None or math.isnan(value) else float(value) for value in values]}


def format_stat(stat: dict[str, Any], signed: bool = False, digits: int = 1) -> str:
    """'31.2 ± 0.4' ('+1.3 ± 0.2' when ``signed``); '31.2 ± —' without a std, '-' without a mean."""
    if stat["mean"] is None:
        return "-"
    mean = f"{stat['mean']:+.{digits}f}" if signed else f"{stat['mean']:.{digits}f}"
    return f"{mean} ± {'—' if stat['std'] is None else format(stat['std'], f'.{digits}f')}"
