"""Rule report: one table of every evaluated model on target-val (BiSMAP Tables 1 and 4)."""

from pathlib import Path

from bismap.report.tables import write_summary
from bismap.runtime import rule_context

with rule_context(snakemake.log[0], snakemake.threads):
    write_summary(
        metrics_paths=dict(zip(snakemake.params.models, snakemake.input.metrics)),
        class_names=snakemake.params.class_names,
        markdown_path=snakemake.output.markdown,
        json_path=snakemake.output.json,
        components=snakemake.params.components,
        figure_name=Path(snakemake.input.figure).name,
    )
