"""The summary table across models: per-class IoU, mIoU, and the source-to-oracle gap."""

from __future__ import annotations

import logging
from pathlib import Path

from bismap.io import read_json, write_json, write_text
from bismap.metrics import markdown_table

logger = logging.getLogger(__name__)


def write_summary(metrics_paths: dict[str, str | Path], class_names: list[str],
                  markdown_path: str | Path, json_path: str | Path) -> dict:
    rows = {model: read_json(path) for model, path in metrics_paths.items()}
    evaluated = next(iter(rows.values()))["evaluated_classes"]
    shown = [class_names[index] for index in evaluated]
    summary = {model: {"miou": metrics["miou"], "per_class_iou": metrics["per_class_iou"]}
               for model, metrics in rows.items()}
    text = "# Target-val results\n\n" + markdown_table(rows, shown)
    if "warmup" in rows and "oracle" in rows:
        gap = rows["oracle"]["miou"] - rows["warmup"]["miou"]
        summary["gap_warmup_to_oracle"] = gap
        text += f"\nGap between source-only warmup and target oracle: {gap:.1f} mIoU points.\n"
    for model, metrics in rows.items():
        logger.info("%s: mIoU %.2f", model, metrics["miou"])
    write_text(markdown_path, text)
    write_json(json_path, summary)
    return summary
