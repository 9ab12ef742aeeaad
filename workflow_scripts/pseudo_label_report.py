"""Rule pseudo_label_report: pseudo-label coverage, accuracy and mIoU per strategy and threshold (Table 5)."""

from pathlib import Path

from bismap.devices import acquire_devices
from bismap.labels.quality import ReportPaths, ReportSettings, pseudo_label_report
from bismap.runtime import rule_context
from bismap.settings import from_dict, job_settings

with rule_context(snakemake.log[0], snakemake.threads):
    paths = ReportPaths(markdown=Path(snakemake.output.markdown), json=Path(snakemake.output.json),
                        plot=Path(snakemake.output.plot))
    with acquire_devices(snakemake.resources.get("gpu", 0)) as device:
        pseudo_label_report(
            checkpoint_path=snakemake.input.checkpoint,
            manifest_path=snakemake.input.manifest,
            prototypes_path=snakemake.input.get("prototypes"),  # when maps or cas is compared
            paths=paths,
            settings=from_dict(ReportSettings, job_settings(snakemake.params), "pseudo_label_report"),
            device=device,
        )
