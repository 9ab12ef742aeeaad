"""Rule extract_source_features: warmup features of correctly classified source pixels, per class (Eq. 3)."""

from bismap.devices import acquire_devices
from bismap.labels.features import FeatureSettings, extract_source_features
from bismap.runtime import rule_context
from bismap.settings import from_dict, job_settings

with rule_context(snakemake.log[0], snakemake.threads):
    with acquire_devices(snakemake.resources.get("gpu", 0)) as device:
        extract_source_features(
            checkpoint_path=snakemake.input.checkpoint,
            manifest_path=snakemake.input.manifest,
            output_path=snakemake.output.features,
            settings=from_dict(FeatureSettings, job_settings(snakemake.params), "maps.features"),
            device=device,
            photometric_statistics_path=snakemake.input.get("photometric_statistics"),  # with GPA only
        )
