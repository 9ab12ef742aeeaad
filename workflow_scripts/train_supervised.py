"""Rules warmup and oracle: supervised training on one labelled domain."""

from pathlib import Path

from bismap.devices import acquire_devices
from bismap.models import ModelSettings
from bismap.runtime import rule_context
from bismap.settings import from_dict, job_settings
from bismap.training.supervised import RunPaths, TrainSettings, train_supervised

with rule_context(snakemake.log[0], snakemake.threads):
    paths = RunPaths(
        checkpoint=Path(snakemake.output.checkpoint),
        loss_log=Path(snakemake.output.loss_log),
        state=Path(snakemake.params.state),
    )
    # resources gpu=N (e.g. --set-resources warmup:gpu=4): N processes, one per GPU, same global batch
    gpus = int(snakemake.resources.get("gpu", 0))
    with acquire_devices(gpus) as device:
        train_supervised(
            manifest_path=snakemake.input.manifest,
            paths=paths,
            settings=from_dict(TrainSettings, job_settings(snakemake.params, "training"), snakemake.rule),
            model_settings=from_dict(ModelSettings, snakemake.params.model, "model"),
            class_names=snakemake.params.class_names,
            device=device,
            world_size=max(1, gpus),
            imagenet_weights=snakemake.input.get("imagenet"),
            run_settings={"training": snakemake.params.training, "model": snakemake.params.model},
            photometric_statistics_path=snakemake.input.get("photometric_statistics"),  # warmup with GPA only
        )
