"""Time per workflow stage, from the benchmark files Snakemake writes for every job.

Every rule has a ``benchmark:`` file (``seed_<seed>/benchmarks/<rule>[_<wildcards>].tsv``):
a TSV whose column ``s`` is the job's wall-clock seconds, one row per run of the
job (one row unless the rule repeats its benchmark). A stage's time in one seed
is the sum of ``s`` over every row of every job of that rule; the report gives its
mean and sample standard deviation over the seeds, and the same for the total of
all stages of a seed.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bismap.report.spread import format_stat, mean_std


def benchmark_seconds(path: str | Path) -> float:
    """Wall seconds of one job: column ``s`` of its Snakemake benchmark TSV, summed over the rows."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows or "s" not in rows[0]:
        raise ValueError(f"{path} is not a Snakemake benchmark file (no rows with a column 's')")
    return sum(float(row["s"]) for row in rows)


def stage_times(benchmarks: Mapping[Any, Mapping[str, Sequence[str | Path]]]) -> dict[str, Any]:
    """``{seed: {rule: [benchmark files of its jobs]}}`` -> seconds per rule and seed, and their mean ± std.

    Returns ``{"per_seed": {seed: {rule: s}}, "stages": {rule: {"jobs", "seconds"}}, "total": stat}``
    where ``seconds`` and ``total`` are :func:`bismap.report.spread.mean_std` over the seeds.
    """
    per_seed = {seed: {rule: sum(benchmark_seconds(path) for path in paths) for rule, paths in rules.items()}
                for seed, rules in benchmarks.items()}
    rules = list(dict.fromkeys(rule for seed_rules in benchmarks.values() for rule in seed_rules))
    stages = {rule: {"jobs": max(len(seed_rules.get(rule, ())) for seed_rules in benchmarks.values()),
                     "seconds": mean_std([seconds.get(rule) for seconds in per_seed.values()])}
              for rule in rules}
    total = mean_std([sum(seconds.values()) for seconds in per_seed.values()])
    return {"per_seed": per_seed, "stages": stages, "total": total}


def stage_table(times: Mapping[str, Any]) -> str:
    """Markdown: per rule, jobs per seed, wall seconds (mean ± std over seeds) and share of the total."""
    total = times["total"]["mean"] or 0.0
    lines = ["| stage | jobs per seed | wall s per seed | % of total |", "|---|---|---|---|"]
    for rule, stage in times["stages"].items():
        mean = stage["seconds"]["mean"]
        share = "-" if not total or mean is None else f"{100 * mean / total:.1f}"
        lines.append(f"| {rule} | {stage['jobs']} | {format_stat(stage['seconds'])} | {share} |")
    jobs = sum(stage["jobs"] for stage in times["stages"].values())
    lines.append(f"| **total** | {jobs} | {format_stat(times['total'])} | 100.0 |")
    return "\n".join(lines) + "\n"
