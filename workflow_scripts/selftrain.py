"""Rules selftrain and selftrain_round: one round of one self-training variant, by its method
(bismap.training.variants: BiSMAP, ProDA, CPSL, bi-directional contrastive, CAG-UDA)."""

from pathlib import Path

from bismap.devices import acquire_devices
from bismap.runtime import rule_context
from bismap.settings import job_settings
from bismap.training.supervised import RunPaths
from bismap.training.variants import variant_training

with rule_context(snakemake.log[0], snakemake.threads):
    train, inputs, settings = variant_training(snakemake.params.method, dict(snakemake.input.items()),
                                               job_settings(snakemake.params), snakemake.wildcards.variant)
    paths = RunPaths(Path(snakemake.output.checkpoint), Path(snakemake.output.loss_log), Path(snakemake.params.state))
    # resources gpu=N (e.g. --set-resources selftrain:gpu=4): N processes, one per GPU, same global batch
    gpus = int(snakemake.resources.get("gpu", 0))
    with acquire_devices(gpus) as device:
        train(inputs, paths, settings, device,
              run_settings={"selftrain": snakemake.params.settings, "model": snakemake.params.model},
              world_size=max(1, gpus))
