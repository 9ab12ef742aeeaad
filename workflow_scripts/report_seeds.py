"""Rule report_seeds: every model row as mean ± std over the run seeds, and the time per stage."""

from bismap.report.seeds import write_seed_summary
from bismap.runtime import rule_context

with rule_context(snakemake.log[0], snakemake.threads):
    write_seed_summary(
        summary_paths=dict(zip(snakemake.params.seeds, snakemake.input.summaries)),
        benchmarks=snakemake.params.benchmarks,  # the files of input.benchmarks, by seed and rule
        models=snakemake.params.models,
        components=snakemake.params.components,
        markdown_path=snakemake.output.markdown,
        json_path=snakemake.output.json,
        methods=snakemake.params.methods,
        controls=snakemake.params.controls,
    )
