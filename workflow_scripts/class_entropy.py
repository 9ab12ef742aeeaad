"""Rule class_entropy: the warmup's mean prediction entropy per predicted class on target-train (BiSMAP Eq. 8)."""

from bismap.devices import acquire_devices
from bismap.runtime import rule_context
from bismap.settings import from_dict, job_settings
from bismap.stm.target import ClassEntropySettings, class_entropy

with rule_context(snakemake.log[0], snakemake.threads):
    with acquire_devices(snakemake.resources.get("gpu", 0)) as device:
        class_entropy(
            checkpoint_path=snakemake.input.checkpoint,
            manifest_path=snakemake.input.manifest,
            output_path=snakemake.output.entropy,
            settings=from_dict(ClassEntropySettings, job_settings(snakemake.params), "stm (class entropy)"),
            device=device,
        )
