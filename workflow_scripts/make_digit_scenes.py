"""Rule make_digit_scenes: write one split of the embedded digit-scenes benchmark."""

from bismap.data.digit_scenes import generate_split, parse_settings, parse_split_settings
from bismap.runtime import rule_context

with rule_context(snakemake.log[0], snakemake.threads):
    split = parse_split_settings(snakemake.params.split, f"digit_scenes.splits.{snakemake.wildcards.domain}")
    generate_split(
        output_dir=snakemake.output[0],
        split=snakemake.wildcards.domain,
        count=split.count,
        seed=split.seed,
        settings=parse_settings(snakemake.params.settings),
    )
