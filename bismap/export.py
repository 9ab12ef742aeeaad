"""A trained model as one self-describing file, loadable without the workflow (README: predict and export).

The file (torch.save of a plain dict, format ``bismap-model`` version 1) holds the
weights, the model settings, the class names, the input normalisation and the
provenance of the training run, so :func:`load_exported` (or ten lines of plain
torch, README) rebuilds the network with nothing else.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bismap import CODE_VERSION
from bismap.data.loading import IMAGENET_MEAN, IMAGENET_STD
from bismap.io import atomic_path
from bismap.models import ModelSettings
from bismap.models.deeplab import DeepLabV3Plus, build_model
from bismap.settings import from_dict
from bismap.training.checkpoint import load_model

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "bismap-model"
EXPORT_VERSION = 1


@dataclass(frozen=True)
class ModelInfo:
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]  # of RGB in [0, 1]: x = (rgb / 255 - mean) / std
    std: tuple[float, float, float]
    provenance: dict[str, Any] | None


def export_model(checkpoint_path: str | Path, output_path: str | Path) -> dict[str, Any]:
    """Write the self-describing file of a workflow checkpoint; returns what it holds besides the weights."""
    model, checkpoint = load_model(checkpoint_path)
    exported = {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "model_settings": checkpoint["model_settings"],
                "class_names": list(checkpoint["class_names"]),
                "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},  # every stage's input
                "provenance": checkpoint.get("provenance"), "source_checkpoint": str(checkpoint_path),
                "code_version": CODE_VERSION}
    with atomic_path(output_path) as temporary:
        torch.save({**exported, "weights": model.state_dict()}, temporary)
    logger.info("exported %s (%d classes) to %s", checkpoint_path, len(exported["class_names"]), output_path)
    return exported


def load_exported(path: str | Path, device: torch.device | str = "cpu") -> tuple[DeepLabV3Plus, ModelInfo]:
    """The network (eval mode) and its class names, normalisation and provenance from an exported file or,
    as well, from a workflow checkpoint."""
    data = torch.load(path, map_location="cpu", weights_only=False)
    if data.get("format") != EXPORT_FORMAT:
        if "model" not in data:
            raise ValueError(f"{path} is neither an exported bismap model nor a bismap checkpoint")
        data = {"weights": data["model"], "model_settings": data["model_settings"], "class_names": data["class_names"],
                "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
                "provenance": data.get("provenance")}
    elif data.get("format_version", 0) > EXPORT_VERSION:
        raise ValueError(f"{path} has format version {data['format_version']}; this bismap reads <= {EXPORT_VERSION}")
    model = build_model(from_dict(ModelSettings, data["model_settings"], f"{path}:model_settings"),
                        len(data["class_names"]))
    model.load_state_dict(data["weights"])
    info = ModelInfo(tuple(data["class_names"]), tuple(data["normalization"]["mean"]),
                     tuple(data["normalization"]["std"]), data.get("provenance"))
    return model.to(device).eval(), info


def main(argv: Sequence[str] | None = None) -> None:
    """bismap-export CHECKPOINT OUTPUT: a workflow checkpoint as a self-describing model file."""
    parser = argparse.ArgumentParser(prog="bismap-export", description=main.__doc__)
    parser.add_argument("checkpoint"), parser.add_argument("output")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    export_model(arguments.checkpoint, arguments.output)


if __name__ == "__main__":
    main()
