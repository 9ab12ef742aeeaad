"""Rules pseudo_labels and teacher_pseudo_labels (one shard's PNGs) and merge_pseudo_labels (summed statistics)."""

from bismap.devices import acquire_devices
from bismap.io import atomic_directory, read_json, write_json
from bismap.labels.coverage import match_coverage
from bismap.labels.strategies import PseudoLabelSettings, label_images, merge_label_statistics
from bismap.runtime import rule_context
from bismap.settings import from_dict, job_settings

with rule_context(snakemake.log[0], snakemake.threads):
    if snakemake.rule == "merge_pseudo_labels":
        summary = merge_label_statistics(list(snakemake.input.statistics))
        write_json(snakemake.output.summary, {**summary, "label_dirs": list(snakemake.input.labels)})
    else:
        settings = from_dict(PseudoLabelSettings, job_settings(snakemake.params), f"{snakemake.rule} settings")
        shard = {"shard_index": snakemake.params.shard_index, "shard_count": snakemake.params.shard_count}
        with acquire_devices(snakemake.resources.get("gpu", 0)) as device, \
                atomic_directory(snakemake.output.labels) as folder:  # complete folder or none
            if settings.match_coverage:  # a control: the MAPs labels' PL ratio (bismap.labels.coverage)
                coverage = read_json(snakemake.input.coverage_reference)["pl_ratio"]
                settings = match_coverage(snakemake.input.checkpoint, snakemake.input.manifest,
                                          snakemake.input.get("prototypes"), settings, coverage, device=device,
                                          **shard)
            label_images(
                checkpoint_path=snakemake.input.checkpoint,
                manifest_path=snakemake.input.manifest,
                prototypes_path=snakemake.input.get("prototypes"),
                output_dir=folder,
                settings=settings,
                device=device,
                **shard,
                statistics_path=snakemake.output.statistics,
            )
