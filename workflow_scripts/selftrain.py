"""Rules selftrain and selftrain_round: one round of one self-training variant (BiSMAP Eqs. 10-13)."""

from pathlib import Path

from bismap.devices import acquire_devices
from bismap.runtime import optional_input, rule_context
from bismap.settings import from_dict
from bismap.training.selftrain import SelfTrainInputs, SelfTrainSettings, self_train
from bismap.training.supervised import RunPaths


with rule_context(snakemake.log[0], snakemake.threads):
    inputs = SelfTrainInputs(
        initial_checkpoint=Path(snakemake.input.initial),  # the warmup, or the previous round's model
        source_manifest=Path(snakemake.input.source_manifest),
        target_manifest=Path(snakemake.input.target_manifest),
        pseudo_label_dirs=[Path(folder) for folder in snakemake.input.pseudo_labels],
        weight_dirs=[Path(folder) for folder in snakemake.input.get("transferability", [])],
        photometric_statistics=optional_input(snakemake.input, "photometric_statistics"),
        imagenet_weights=optional_input(snakemake.input, "imagenet"),
    )
    paths = RunPaths(Path(snakemake.output.checkpoint), Path(snakemake.output.loss_log), Path(snakemake.params.state))
    # resources gpu=N (e.g. --set-resources selftrain:gpu=4): N processes, one per GPU, same global batch
    gpus = int(snakemake.resources.get("gpu", 0))
    with acquire_devices(gpus) as device:
        self_train(
            inputs=inputs,
            paths=paths,
            settings=from_dict(SelfTrainSettings, snakemake.params.settings, f"selftrain ({snakemake.wildcards.variant})"),
            device=device,
            world_size=max(1, gpus),
            run_settings={"selftrain": snakemake.params.settings, "model": snakemake.params.model},
        )
