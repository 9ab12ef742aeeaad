"""Model checkpoints (a plain dict) and resumable training state, both written atomically.

The checkpoint is a declared output of a rule. The resume state lives outside
the declared outputs (Snakemake deletes outputs before a job starts), under
``<results>/.state/``, and is only used when its fingerprint — a hash of every
setting that shapes training — matches the current run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from bismap import CODE_VERSION
from bismap.data.samples import file_stat
from bismap.io import atomic_path
from bismap.models import ModelSettings, build_model
from bismap.models.deeplab import DeepLabV3Plus
from bismap.settings import from_dict, to_dict

logger = logging.getLogger(__name__)


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-serialisable settings."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def input_signature(*inputs: Any) -> list[list[Any]]:
    """[path, size, modification time in ns] of every file the inputs name, folders file by file (sorted).

    ``inputs``: paths, lists of paths, or dataclasses of them (a stage's inputs); other values are skipped.
    Part of every resume fingerprint, so a resume state is bound to the files it was trained on: an input
    rebuilt since (a new warmup, new pseudo-labels) has a new size or time, and the state is not used.
    """
    files: list[Path] = []
    pending = list(inputs)
    while pending:
        item = pending.pop(0)
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            pending.extend(getattr(item, field.name) for field in dataclasses.fields(item))
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif isinstance(item, (str, Path)) and Path(item).is_dir():
            files.extend(sorted(path for path in Path(item).rglob("*") if path.is_file()))
        elif isinstance(item, (str, Path)) and Path(item).is_file():
            files.append(Path(item))
    return [[str(path), *file_stat(path)] for path in files]


def save_checkpoint(path: str | Path, model: torch.nn.Module, model_settings: ModelSettings,
                    class_names: list[str], step: int, settings: dict[str, Any],
                    provenance: dict[str, Any] | None = None) -> None:
    """The model, its settings and what the run actually ran (``provenance``: bismap.provenance.run_provenance)."""
    checkpoint = {
        "model": _unwrap(model).state_dict(),
        "model_settings": to_dict(model_settings),
        "class_names": list(class_names),
        "step": step,
        "settings": settings,
        "code_version": CODE_VERSION,
        "provenance": provenance,
    }
    with atomic_path(path) as temporary:
        torch.save(checkpoint, temporary)
    logger.info("wrote checkpoint %s (step %d)", path, step)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[DeepLabV3Plus, dict[str, Any]]:
    """Rebuild the network a checkpoint describes and load its weights."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("model", "model_settings", "class_names"):
        if key not in checkpoint:
            raise ValueError(f"{path} is not a bismap checkpoint: key '{key}' missing")
    settings = from_dict(ModelSettings, checkpoint["model_settings"], f"{path}:model_settings")
    model = build_model(settings, len(checkpoint["class_names"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device), checkpoint


def save_resume_state(path: str | Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def load_resume_state(path: str | Path, expected_fingerprint: str) -> dict[str, Any] | None:
    """The saved state when it belongs to this exact run, else None (and say why)."""
    path = Path(path)
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("fingerprint") != expected_fingerprint:
        logger.info("ignoring resume state %s: it was saved with other settings", path)
        return None
    logger.info("resuming from %s at iteration %d", path, state["iteration"])
    return state


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model
