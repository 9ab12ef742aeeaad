"""Rule export_model: a checkpoint as a self-describing model file (bismap.export)."""

from bismap.export import export_model
from bismap.runtime import rule_context

with rule_context(snakemake.log[0], snakemake.threads):
    export_model(snakemake.input.checkpoint, snakemake.output.model)
