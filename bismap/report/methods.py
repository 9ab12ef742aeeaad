"""The family side by side: one row per method's model, per-class IoU, and the paper's own number.

``methods`` maps a report row (model name) to the method it stands for
(:data:`PAPER_RESULTS` keys, plus ``source`` for the warmup and ``oracle``).
The paper column is each paper's GTA5 -> Cityscapes val mIoU for the stage
the row runs (ResNet-101 DeepLab on 19 classes): a reference for the ranking,
not comparable in absolute terms with the embedded benchmark.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bismap.report.spread import format_interval, format_stat


@dataclass(frozen=True)
class PaperResult:
    title: str  # the method as the table names it
    miou: float | None  # GTA5 -> Cityscapes val mIoU of the same stage; None: no such number
    source: str  # where the number is printed


PAPER_RESULTS = {
    "source": PaperResult("source only (warmup)", None, ""),
    "bismap": PaperResult("BiSMAP self-training (paper 000)", 57.7, "BiSMAP Table 1"),
    "bismap_distill": PaperResult("BiSMAP + distillation (paper 000)", 61.2, "BiSMAP Table 1, BiSMAP*"),
    "proda": PaperResult("ProDA stage 1 (paper 001)", 53.7, "ProDA Table 3, stage 1"),
    "cpsl": PaperResult("CPSL (paper 002)", 55.7, "CPSL Table 1, before distillation"),
    "contrastive": PaperResult("bi-directional contrastive (paper 003)", 57.1,
                               "its Table 1, with its self-distillation"),
    "cag": PaperResult("CAG-UDA stage 1 (paper 004)", 47.2, "CAG-UDA Table 4, stage 1"),
    "cag_stage_2": PaperResult("CAG-UDA stage 2 (paper 004)", 49.5, "CAG-UDA Table 4, stage 2"),
    "cag_stage_3": PaperResult("CAG-UDA stage 3 (paper 004)", 50.2, "CAG-UDA Table 4, stage 3"),
    "oracle": PaperResult("target oracle", None, ""),
}
FAMILY_METHODS = ("proda", "cpsl", "contrastive", "cag")  # the other papers: rows outside BiSMAP's own tables


def paper_result(method: str) -> PaperResult:
    """The row title and paper number of ``method``; CAG-UDA stages past the paper's three have no number."""
    if method in PAPER_RESULTS:
        return PAPER_RESULTS[method]
    stage = method.removeprefix("cag_stage_")
    if stage.isdigit():
        return PaperResult(f"CAG-UDA stage {stage} (paper 004)", None, "")
    raise KeyError(f"no paper result for method '{method}'; known: {sorted(PAPER_RESULTS)}")


def is_family_method(method: str | None) -> bool:
    """A row of another paper of the family (ProDA, CPSL, contrastive, any CAG-UDA stage)."""
    return method in FAMILY_METHODS or (method or "").startswith("cag_stage_")


def method_table(rows: Mapping[str, Mapping[str, Any]], methods: Mapping[str, str]) -> str:
    """Markdown: method, row, per-class IoU, mIoU, % of the gap closed (mean ± std cells), the paper's mIoU."""
    papers = {model: paper_result(method) for model, method in methods.items()}
    shown = [model for model in methods if model in rows]
    if not shown:
        return "No method rows.\n"
    classes = list(rows[shown[0]]["per_class_iou"])
    lines = ["| method | row | " + " | ".join(classes) + " | mIoU | gain 95% CI | gap closed % "
             "| paper mIoU (GTA5 → Cityscapes) |", "|" + "---|" * (len(classes) + 6)]
    for model in shown:
        paper = papers[model]
        reference = f"{paper.miou:.1f} ({paper.source})" if paper.miou is not None else ""
        cells = [format_stat(rows[model]["per_class_iou"][name]) for name in classes]
        lines.append(f"| {paper.title} | {model} | " + " | ".join(cells)
                     + f" | {format_stat(rows[model]['miou'])} | "
                     f"{format_interval(rows[model]['gain_over_warmup']['ci95'])} | "
                     f"{format_stat(rows[model]['gap_closed_percent'], signed=True)} | {reference} |")
    return "\n".join(lines) + "\n"
