"""Rules selftrain and selftrain_round: one round of one self-training variant.

Method bismap: BiSMAP Eqs. 10-13 on pseudo-label files; methods proda and cpsl:
ProDA stage 1 and CPSL, whose labels are made while they train; method
contrastive: bi-directional contrastive learning with the baseline labels as
static labels; method cag: CAG-UDA stage 1 on the anchor ('cas') labels.
"""

from collections.abc import Callable
from pathlib import Path

from bismap.devices import acquire_devices
from bismap.runtime import optional_input, rule_context
from bismap.settings import from_dict
from bismap.training.adaptation import WarmupInputs
from bismap.training.cag import CagInputs, CagTrainSettings, cag_train
from bismap.training.contrastive import ContrastiveInputs, ContrastiveTrainSettings, contrastive_train
from bismap.training.cpsl import CpslTrainSettings, cpsl_train
from bismap.training.proda import ProdaTrainSettings, proda_train
from bismap.training.selftrain import SelfTrainInputs, SelfTrainSettings, self_train
from bismap.training.supervised import RunPaths


def bismap_variant(settings: dict, name: str) -> tuple:
    inputs = SelfTrainInputs(
        initial_checkpoint=Path(snakemake.input.initial),  # the warmup, or the previous round's model
        source_manifest=Path(snakemake.input.source_manifest),
        target_manifest=Path(snakemake.input.target_manifest),
        pseudo_label_dirs=[Path(folder) for folder in snakemake.input.pseudo_labels],
        weight_dirs=[Path(folder) for folder in snakemake.input.get("transferability", [])],
        photometric_statistics=optional_input(snakemake.input, "photometric_statistics"),
        imagenet_weights=optional_input(snakemake.input, "imagenet"),
    )
    return self_train, inputs, from_dict(SelfTrainSettings, settings, f"selftrain ({name})")


def warmup_variant(train: Callable, settings_class: type) -> Callable:
    """Methods that make their labels while they train (proda, cpsl): the warmup and the two manifests."""
    def make(settings: dict, name: str) -> tuple:
        inputs = WarmupInputs(Path(snakemake.input.initial), Path(snakemake.input.source_manifest),
                              Path(snakemake.input.target_manifest))
        return train, inputs, from_dict(settings_class, settings, f"selftrain ({name}, {snakemake.params.method})")
    return make


def contrastive_variant(settings: dict, name: str) -> tuple:
    inputs = ContrastiveInputs(Path(snakemake.input.initial), Path(snakemake.input.source_manifest),
                               Path(snakemake.input.target_manifest),
                               [Path(folder) for folder in snakemake.input.pseudo_labels])
    return contrastive_train, inputs, from_dict(ContrastiveTrainSettings, settings, f"selftrain ({name}, contrastive)")


def cag_variant(settings: dict, name: str) -> tuple:
    inputs = CagInputs(Path(snakemake.input.initial), Path(snakemake.input.prototypes),
                       Path(snakemake.input.source_manifest), Path(snakemake.input.target_manifest),
                       [Path(folder) for folder in snakemake.input.pseudo_labels])
    return cag_train, inputs, from_dict(CagTrainSettings, settings, f"selftrain ({name}, cag)")


with rule_context(snakemake.log[0], snakemake.threads):
    make = {"bismap": bismap_variant, "proda": warmup_variant(proda_train, ProdaTrainSettings),
            "cpsl": warmup_variant(cpsl_train, CpslTrainSettings),
            "contrastive": contrastive_variant, "cag": cag_variant}[snakemake.params.method]
    train, inputs, settings = make(snakemake.params.settings, snakemake.wildcards.variant)
    paths = RunPaths(Path(snakemake.output.checkpoint), Path(snakemake.output.loss_log), Path(snakemake.params.state))
    # resources gpu=N (e.g. --set-resources selftrain:gpu=4): N processes, one per GPU, same global batch
    gpus = int(snakemake.resources.get("gpu", 0))
    with acquire_devices(gpus) as device:
        train(inputs, paths, settings, device,
              run_settings={"selftrain": snakemake.params.settings, "model": snakemake.params.model},
              world_size=max(1, gpus))
