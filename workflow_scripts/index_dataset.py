"""Rule index_dataset: list and check one domain's files, write its manifest."""

from bismap.data.index import index_dataset
from bismap.runtime import rule_context

with rule_context(snakemake.log[0], snakemake.threads):
    index_dataset(
        format_name=snakemake.params.format,
        root=snakemake.params.root,
        split=snakemake.params.split,
        num_classes=snakemake.params.num_classes,
        require_labels=snakemake.params.require_labels,
        label_size_mismatch=snakemake.params.label_size_mismatch,
        output_path=snakemake.output[0],
    )
