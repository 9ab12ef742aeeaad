"""Rule fit_class_gmm: the MAPs (a GMM, Eqs. 4-5) of some classes, one class_<c>.h5 each, on the CPU."""

from bismap.labels.gmm import GMMSettings, fit_class_gmms
from bismap.runtime import rule_context
from bismap.settings import from_dict

with rule_context(snakemake.log[0], snakemake.threads):
    fit_class_gmms(
        features_path=snakemake.input.features,
        class_ids=snakemake.params.class_ids,
        settings=from_dict(GMMSettings, snakemake.params.settings, "maps.gmm"),
        output_dir=snakemake.output.gmms,
        device="cpu",
    )
