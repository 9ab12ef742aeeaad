"""Which training loop a self-training variant runs (its ``method``), with the inputs its rule declares.

Rules selftrain and selftrain_round name their inputs the same way for every
method: ``initial`` (the warmup, or the previous round's or stage's model),
``source_manifest``, ``target_manifest``, and what the method needs besides:
``pseudo_labels`` (shard folders), ``transferability`` and
``photometric_statistics`` (BiSMAP), ``prototypes`` (CAG-UDA's anchors).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bismap.runtime import optional_input
from bismap.settings import from_dict
from bismap.training.adaptation import WarmupInputs
from bismap.training.cag import CagInputs, CagTrainSettings, cag_train
from bismap.training.contrastive import ContrastiveInputs, ContrastiveTrainSettings, contrastive_train
from bismap.training.cpsl import CpslTrainSettings, cpsl_train
from bismap.training.proda import ProdaTrainSettings, proda_train
from bismap.training.selftrain import SelfTrainInputs, SelfTrainSettings, self_train

Files = Mapping[str, Any]  # input name -> a path, or a list of paths


def _folders(files: Files, name: str) -> list[Path]:
    values = files.get(name, [])
    return [Path(value) for value in ([values] if isinstance(values, str) else values)]


def _bismap_inputs(files: Files) -> SelfTrainInputs:
    return SelfTrainInputs(Path(files["initial"]), Path(files["source_manifest"]), Path(files["target_manifest"]),
                           _folders(files, "pseudo_labels"), _folders(files, "transferability"),
                           photometric_statistics=optional_input(files, "photometric_statistics"),
                           imagenet_weights=optional_input(files, "imagenet"))


def _warmup_inputs(files: Files) -> WarmupInputs:  # proda, cpsl: labels made while they train
    return WarmupInputs(Path(files["initial"]), Path(files["source_manifest"]), Path(files["target_manifest"]))


def _contrastive_inputs(files: Files) -> ContrastiveInputs:  # the baseline labels are the static labels
    return ContrastiveInputs(Path(files["initial"]), Path(files["source_manifest"]), Path(files["target_manifest"]),
                             _folders(files, "pseudo_labels"))


def _cag_inputs(files: Files) -> CagInputs:
    return CagInputs(Path(files["initial"]), Path(files["prototypes"]), Path(files["source_manifest"]),
                     Path(files["target_manifest"]), _folders(files, "pseudo_labels"))


# method -> (train function, inputs from the rule's files, settings dataclass)
METHODS: dict[str, tuple[Callable[..., None], Callable[[Files], Any], type]] = {
    "bismap": (self_train, _bismap_inputs, SelfTrainSettings),
    "proda": (proda_train, _warmup_inputs, ProdaTrainSettings),
    "cpsl": (cpsl_train, _warmup_inputs, CpslTrainSettings),
    "contrastive": (contrastive_train, _contrastive_inputs, ContrastiveTrainSettings),
    "cag": (cag_train, _cag_inputs, CagTrainSettings),
}


def variant_training(method: str, files: Files, settings: dict[str, Any],
                     name: str) -> tuple[Callable[..., None], Any, Any]:
    """(train function, its inputs, its typed settings) of variant ``name``; an unknown key or method fails here."""
    if method not in METHODS:
        raise ValueError(f"selftrain variant '{name}': unknown method '{method}'; known: {sorted(METHODS)}")
    train, make_inputs, settings_class = METHODS[method]
    return train, make_inputs(files), from_dict(settings_class, settings, f"selftrain ({name}, {method})")
