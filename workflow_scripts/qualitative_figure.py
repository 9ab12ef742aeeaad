"""Rule qualitative_figure: image, truth and each model's prediction for a few target-val images."""

from bismap.devices import acquire_devices
from bismap.evaluation.qualitative import qualitative_figure
from bismap.runtime import rule_context

with rule_context(snakemake.log[0], snakemake.threads):
    with acquire_devices(snakemake.resources.get("gpu", 0)) as device:
        qualitative_figure(
            checkpoints=dict(zip(snakemake.params.models, snakemake.input.checkpoints)),
            manifest_path=snakemake.input.manifest,
            output_path=snakemake.output.figure,
            images=snakemake.params.images,
            device=device,
        )
