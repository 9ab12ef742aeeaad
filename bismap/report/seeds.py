"""The report over run seeds (rule report_seeds): every model row as mean ± std, and the time per stage.

Each run seed has its own report (:func:`bismap.report.tables.write_summary`,
``seed_<seed>/report/summary.json``) with, per model, mIoU, the gain over that
seed's warmup, the share of that seed's warmup-to-oracle gap closed, and
per-class IoU. Here each of these becomes the mean and the sample standard
deviation (ddof = 1) over the seeds (:mod:`bismap.report.spread`: with one seed the std
is undefined, null in JSON and "—" in Markdown). Gains and gap shares are
averaged per seed, not recomputed from the mean mIoUs. The component columns
(MAPs, STM, consistency, rounds, distillation) are those of the per-seed reports, and
each row's effect is its mIoU minus the row before it, paired by seed.

The time per stage (:mod:`bismap.report.stage_times`) comes from Snakemake's benchmark
file of every job of every seed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bismap.io import read_json, write_json, write_text
from bismap.report.methods import is_family_method, method_table
from bismap.report.spread import format_interval, format_stat, mean_std, verdict
from bismap.report.stage_times import stage_table, stage_times
from bismap.report.tables import COMPONENT_HEADER, COMPONENT_TITLES, COMPONENTS, component_cells

logger = logging.getLogger(__name__)

FIGURES = ("miou", "gain_over_warmup", "gap_closed_percent")


def aggregate_models(summaries: Mapping[Any, Mapping[str, Any]], models: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per model: mean_std over the seeds' summaries of each of FIGURES and of each class's IoU."""
    rows = {}
    for model in models:
        missing = [seed for seed, summary in summaries.items() if model not in summary]
        if missing:
            raise KeyError(f"model '{model}' is missing from the report of seed(s) {missing}")
        per_seed = [summary[model] for summary in summaries.values()]
        classes = list(per_seed[0]["per_class_iou"])
        rows[model] = {figure: mean_std([row[figure] for row in per_seed]) for figure in FIGURES}
        rows[model]["per_class_iou"] = {name: mean_std([row["per_class_iou"].get(name) for row in per_seed])
                                        for name in classes}
        rows[model]["subset_miou"] = {name: mean_std([row.get("subset_miou", {}).get(name) for row in per_seed])
                                      for name in per_seed[0].get("subset_miou", {})}
    return rows


def component_table(rows: Mapping[str, Mapping[str, Any]], components: Mapping[str, Mapping[str, bool | int]]) -> str:
    """BiSMAP Table 4 with mean ± std cells: components, mIoU, gain over warmup, % of the gap closed."""
    lines = [COMPONENT_HEADER + " mIoU | gain | gain 95% CI | gap closed % |", "|---" * (len(COMPONENTS) + 5) + "|"]
    for model, row in rows.items():
        marks = component_cells(components.get(model, {}))
        lines.append(f"| {model} | {marks} | {format_stat(row['miou'])} | "
                     f"{format_stat(row['gain_over_warmup'], signed=True)} | "
                     f"{format_interval(row['gain_over_warmup']['ci95'])} | "
                     f"{format_stat(row['gap_closed_percent'], signed=True)} |")
    return "\n".join(lines) + "\n"


def effect_table(summaries: Mapping[Any, Mapping[str, Any]], models: Sequence[str],
                 components: Mapping[str, Mapping[str, bool | int]]) -> str:
    """Each row against the row before it (the oracle aside): what it adds and its mIoU difference, paired by seed."""
    lines = ["| model | adds | effect (mIoU) | paired 95% CI | verdict |", "|---|---|---|---|---|"]
    compared = [model for model in models if model != "oracle"]
    for previous, model in zip(compared, compared[1:]):
        before, after = components.get(previous, {}), components.get(model, {})
        added = [_change(name, before.get(name), after.get(name)) for name in COMPONENTS
                 if (before.get(name) or 0) != (after.get(name) or 0)]  # absent = off, 0 rounds
        effect = mean_std([summary[model]["miou"] - summary[previous]["miou"] for summary in summaries.values()])
        lines.append(f"| {model} | {', '.join(added) or '-'} over {previous} | {format_stat(effect, signed=True)} | "
                     f"{format_interval(effect['ci95'])} | {verdict(effect['ci95'])} |")
    return "\n".join(lines) + "\n"


def control_table(summaries: Mapping[Any, Mapping[str, Any]], controls: Mapping[str, Mapping[str, str]]) -> str:
    """Each control against the model it names (``reference``), paired by seed: the effect of what it changes."""
    lines = ["| control | changes | compared with | effect (mIoU) | paired 95% CI | verdict |",
             "|---|---|---|---|---|---|"]
    for model, control in controls.items():
        effect = mean_std([summary[model]["miou"] - summary[control["reference"]]["miou"]
                           for summary in summaries.values()])
        lines.append(f"| {model} | {control['changes']} | {control['reference']} | {format_stat(effect, signed=True)} "
                     f"| {format_interval(effect['ci95'])} | {verdict(effect['ci95'])} |")
    return "\n".join(lines) + "\n"


def _change(name: str, before: bool | int | None, after: bool | int | None) -> str:
    if name == "rounds":
        return f"rounds {before or 0} → {after or 0}" if before else "self-training"
    if name == "distillation" and before and after:
        return f"distillation stages {int(before)} → {int(after)}"
    return COMPONENT_TITLES[name] if after else f"no {COMPONENT_TITLES[name]}"


def class_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Per-class IoU and mIoU, mean ± std over the seeds (BiSMAP Table 1 layout)."""
    classes = list(next(iter(rows.values()))["per_class_iou"])
    subsets = list(next(iter(rows.values())).get("subset_miou", {}))  # SYNTHIA: mIoU-13 beside mIoU-16
    lines = ["| model | " + " | ".join(classes) + " | mIoU |" + "".join(f" {name} |" for name in subsets),
             "|" + "---|" * (len(classes) + 2 + len(subsets))]
    for model, row in rows.items():
        cells = [format_stat(row["per_class_iou"][name]) for name in classes]
        extra = "".join(f" {format_stat(row['subset_miou'][name])} |" for name in subsets)
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {format_stat(row['miou'])} |" + extra)
    return "\n".join(lines) + "\n"


def write_seed_summary(summary_paths: Mapping[int, str | Path], benchmarks: Mapping[int, Mapping[str, Sequence[str]]],
                       models: Sequence[str], components: Mapping[str, Mapping[str, bool | int]],
                       markdown_path: str | Path, json_path: str | Path,
                       methods: Mapping[str, str] | None = None,
                       controls: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, Any]:
    """Write the Markdown and JSON report over the seeds of ``summary_paths`` (seed -> per-seed summary.json).

    ``benchmarks``: per seed, per rule, the benchmark files of its jobs
    (:func:`bismap.report.stage_times.stage_times`). ``methods``: the rows of
    the family table (:func:`bismap.report.methods.method_table`); rows of the
    other methods of the family stay out of BiSMAP's component and effect tables. ``controls``: model ->
    {reference, changes}: rows compared with a named model in their own table, not in the chain of effects.
    """
    methods, controls = dict(methods or {}), dict(controls or {})
    summaries = {seed: read_json(path) for seed, path in summary_paths.items()}
    rows = aggregate_models(summaries, models)
    gap = mean_std([summary.get("gap_warmup_to_oracle") for summary in summaries.values()])
    times = stage_times(benchmarks)
    seeds = list(summary_paths)
    result = {"seeds": seeds, "seed_count": len(seeds), "models": rows, "gap_warmup_to_oracle": gap, "methods": methods,
              "components": {model: dict(components.get(model, {})) for model in models}, "stage_times": times,
              "controls": controls}
    text = f"# Target-val results over {len(seeds)} run seed(s)\n\n"
    text += (f"Seeds {', '.join(map(str, seeds))}: mean ± sample standard deviation (ddof = 1) over the seeds; "
             "'—': undefined with one seed. Reports of each seed: "
             + ", ".join(f"[seed {seed}]({_relative(Path(path).with_suffix('.md'), markdown_path)})"
                         for seed, path in summary_paths.items()) + ".\n")
    ablation = [model for model in models if not is_family_method(methods.get(model)) and model not in controls]
    text += "\n## Components (BiSMAP Table 4)\n\n" + component_table({model: rows[model] for model in ablation},
                                                                      components)
    text += ("\n## Effect of each component\n\nEach row minus the row before it, per seed, then mean ± std "
             "over the seeds and the paired Student-t 95% interval; 'no effect' only where the whole interval lies "
             "within ±1 mIoU, 'not resolved' where it spans zero and more.\n\n"
             + effect_table(summaries, ablation, components))
    if controls:
        text += ("\n## Controls\n\nEach control minus the model it is compared with, paired by seed: one "
                 "component's content changed, everything else the same.\n\n" + control_table(summaries, controls))
    if methods:
        text += ("\n## Methods side by side\n\nTarget-val IoU on this benchmark, mean ± std over the seeds, and "
                 "each paper's own GTA5 → Cityscapes val mIoU for the same stage (ResNet-101 DeepLab): a "
                 "reference for the ranking, not comparable in absolute terms.\n\n" + method_table(rows, methods))
    text += "\n## Per-class IoU (BiSMAP Table 1)\n\n" + class_table(rows)
    if gap["mean"] is not None:
        text += f"\nGap between source-only warmup and target oracle: {format_stat(gap)} mIoU points.\n"
    text += "\n## Time per stage\n\nWall seconds per seed of each rule's jobs (Snakemake benchmarks, column s), "
    text += "mean ± std over the seeds.\n\n" + stage_table(times)
    for model, row in rows.items():
        logger.info("%s: mIoU %s over %d seed(s)", model, format_stat(row["miou"]), len(seeds))
    logger.info("wall time per seed, all stages: %s s", format_stat(times["total"]))
    write_text(markdown_path, text)
    write_json(json_path, result)
    return result


def _relative(path: Path, markdown_path: str | Path) -> str:
    return Path(os.path.relpath(path, Path(markdown_path).parent)).as_posix()
