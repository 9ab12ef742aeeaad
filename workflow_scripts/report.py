"""Rule report: one table of every evaluated model on target-val."""

from bismap.report import write_summary
from bismap.runtime import rule_context

with rule_context(snakemake.log[0], snakemake.threads):
    write_summary(
        metrics_paths=dict(zip(snakemake.params.models, snakemake.input)),
        class_names=snakemake.params.class_names,
        markdown_path=snakemake.output.markdown,
        json_path=snakemake.output.json,
    )
