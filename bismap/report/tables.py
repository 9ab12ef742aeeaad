"""The results report: one table of every evaluated model, laid out like BiSMAP Tables 1 and 4.

Rows are the models in pipeline order (warmup, each self-training variant,
distillation, the target oracle). Columns: the components a row uses (MAPs
pseudo-labels, STM, consistency, distillation; BiSMAP Table 4), per-class IoU,
mIoU, the gain over the warmup, and the share of the warmup-to-oracle gap the
row closes::

    gap closed = (mIoU_row - mIoU_warmup) / (mIoU_oracle - mIoU_warmup)

A row that does worse than the warmup shows a negative gain and share. Where the
oracle does not beat the warmup there is no gap to close: the share is undefined
("-" in Markdown, null in JSON), not a percentage of a negative or zero gap.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bismap.evaluation.metrics import markdown_table
from bismap.io import read_json, write_json, write_text
from bismap.provenance import provenance_table

logger = logging.getLogger(__name__)

# Component columns in pipeline order, with their titles; "rounds" counts self-training rounds and "distillation"
# distillation stages (COUNTED), the others are on/off.
COMPONENTS = ("maps", "stm", "consistency", "alignment", "rounds", "distillation")
COMPONENT_TITLES = {"maps": "MAPs", "stm": "STM", "consistency": "consistency", "alignment": "alignment",
                    "rounds": "rounds", "distillation": "distillation"}
COUNTED = ("rounds", "distillation")
COMPONENT_HEADER = "| model | " + " | ".join(COMPONENT_TITLES[name] for name in COMPONENTS) + " |"


def component_cells(used: Mapping[str, bool | int]) -> str:
    """One row's component cells: ✓ for each component it uses, its self-training rounds and distillation stages."""
    cells = []
    for name in COMPONENTS:
        value = used.get(name)
        cells.append((str(int(value)) if name in COUNTED else "✓") if value else "")
    return " | ".join(cells)


def gains(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per model: mIoU gain over 'warmup' and share (%) of the warmup-to-'oracle' gap closed (None if absent)."""
    warmup = rows["warmup"]["miou"] if "warmup" in rows else None
    oracle = rows["oracle"]["miou"] if "oracle" in rows else None
    result = {}
    for model, metrics in rows.items():
        gain = None if warmup is None else metrics["miou"] - warmup
        closed = None
        if gain is not None and oracle is not None and oracle > warmup:  # no gap to close otherwise: undefined
            closed = 100.0 * gain / (oracle - warmup)
        result[model] = {"gain_over_warmup": gain, "gap_closed_percent": closed}
    return result


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}"


def component_table(rows: Mapping[str, Mapping[str, Any]], components: Mapping[str, Mapping[str, bool | int]],
                    model_gains: Mapping[str, Mapping[str, float | None]]) -> str:
    """BiSMAP Table 4: which components each row uses, its mIoU, gain and gap share."""
    lines = [COMPONENT_HEADER + " mIoU | gain | gap closed % |", "|---" * (len(COMPONENTS) + 4) + "|"]
    for model, metrics in rows.items():
        marks = component_cells(components.get(model, {}))
        row_gains = model_gains[model]
        lines.append(f"| {model} | {marks} | {metrics['miou']:.1f} | {_signed(row_gains['gain_over_warmup'])} | "
                     f"{_signed(row_gains['gap_closed_percent'])} |")
    return "\n".join(lines) + "\n"


def write_summary(metrics_paths: Mapping[str, str | Path], class_names: list[str],
                  markdown_path: str | Path, json_path: str | Path,
                  components: Mapping[str, Mapping[str, bool | int]] | None = None,
                  figure_name: str | None = None) -> dict:
    """Write the Markdown and JSON report; ``components``: per model, which of COMPONENTS it uses."""
    rows = {model: read_json(path) for model, path in metrics_paths.items()}
    evaluated = next(iter(rows.values()))["evaluated_classes"]
    shown = [class_names[index] for index in evaluated]
    model_gains = gains(rows)
    summary: dict[str, Any] = {model: {"miou": metrics["miou"], "subset_miou": metrics.get("subset_miou", {}),
                                       "per_class_iou": metrics["per_class_iou"],
                                       **model_gains[model], "components": dict((components or {}).get(model, {}))}
                               for model, metrics in rows.items()}
    text = "# Target-val results\n\n## Components (BiSMAP Table 4)\n\n"
    text += component_table(rows, components or {}, model_gains)
    text += "\n## Per-class IoU (BiSMAP Table 1)\n\n" + markdown_table(rows, shown)
    if "warmup" in rows and "oracle" in rows:
        gap = rows["oracle"]["miou"] - rows["warmup"]["miou"]
        summary["gap_warmup_to_oracle"] = gap
        text += f"\nGap between source-only warmup and target oracle: {gap:.1f} mIoU points.\n"
    text += ("\n## What each model ran\n\nFrom its checkpoint (bismap.provenance): processes, the global batch "
             "(always the config's: split over the processes), learning rate, iterations, AMP, device, versions and "
             "the project's commit.\n\n" + provenance_table({model: metrics.get("provenance") for model, metrics
                                                               in rows.items()}))
    if figure_name:
        text += f"\n## Qualitative results\n\n![image, truth and each model's prediction]({figure_name})\n"
    for model, metrics in rows.items():
        logger.info("%s: mIoU %.2f (gain %s)", model, metrics["miou"], _signed(model_gains[model]["gain_over_warmup"]))
    write_text(markdown_path, text)
    write_json(json_path, summary)
    return summary
