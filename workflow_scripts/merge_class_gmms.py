"""Rule merge_class_gmms: every class's GMM, anchors and calibration in one prototypes file."""

from bismap.labels.gmm import GMMSettings, class_gmm_paths, merge_class_gmms
from bismap.runtime import rule_context
from bismap.settings import from_dict

with rule_context(snakemake.log[0], snakemake.threads):
    prototypes = merge_class_gmms(
        class_gmm_paths(snakemake.input.gmms, snakemake.params.class_count),  # the fit jobs' folders
        features_path=snakemake.input.features,
        settings=from_dict(GMMSettings, snakemake.params.settings, "maps.gmm"),
    )
    prototypes.save(snakemake.output.prototypes)
