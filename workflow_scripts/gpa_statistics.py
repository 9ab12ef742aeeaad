"""Rule gpa_statistics: target photometric statistics for GPA (BiSMAP Sec. 3.5) and a preview."""

from bismap.data.photometric import compute_and_write
from bismap.runtime import rule_context

with rule_context(snakemake.log[0], snakemake.threads):
    compute_and_write(
        target_manifest=snakemake.input.target,
        source_manifest=snakemake.input.source,
        statistics_path=snakemake.output.statistics,
        preview_path=snakemake.output.preview,
        max_images=snakemake.params.max_images,
        seed=snakemake.params.seed,
        preview_rows=snakemake.params.preview_rows,
    )
