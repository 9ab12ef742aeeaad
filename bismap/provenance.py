"""What a training job actually ran, recorded in its checkpoint and carried into metrics and reports.

Users compare runs across machines and GPU counts; a schedule that changed silently
(fewer GPUs, so a smaller global batch) is a recurring question in the public
trackers of these methods. Here the configured ``batch_size`` is always the global
batch: it is split over the processes, and a batch they do not divide fails before
training starts, so ``global_batch_size`` is the config's on any number of processes.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from bismap import CODE_VERSION

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def project_commit(root: Path = PROJECT_ROOT) -> str | None:
    """The git commit of the project's checkout, '+dirty' when tracked files differ; None outside git."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if status else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def run_provenance(batch_size: int, learning_rate: float, iterations: int, processes: int, amp: bool,
                   device: torch.device) -> dict[str, Any]:
    """The run as it happened: global and per-process batch, lr, iterations, processes, AMP, device, versions."""
    return {"global_batch_size": batch_size, "batch_per_process": batch_size // max(1, processes),
            "learning_rate": learning_rate, "iterations": iterations, "processes": processes, "amp": amp,
            "device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "python": platform.python_version(), "bismap": CODE_VERSION, "commit": project_commit()}


PROVENANCE_COLUMNS = ("processes", "global_batch_size", "learning_rate", "iterations", "amp", "device", "torch",
                      "cuda", "commit")


def provenance_table(rows: dict[str, dict[str, Any] | None]) -> str:
    """Markdown: one row per model with what its training ran (models without a record show '-')."""
    lines = ["| model | " + " | ".join(PROVENANCE_COLUMNS) + " |", "|" + "---|" * (len(PROVENANCE_COLUMNS) + 1)]
    for model, record in rows.items():
        cells = ["-" if not record or record.get(column) is None else str(record[column])
                 for column in PROVENANCE_COLUMNS]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
