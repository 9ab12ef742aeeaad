"""Rule fit_class_gmm: the MAPs (a GMM, Eqs. 4-5) of one class, on the CPU."""

from bismap.gmm import GMMSettings, fit_class_gmm, save_class_gmm
from bismap.runtime import rule_context
from bismap.settings import from_dict

with rule_context(snakemake.log[0], snakemake.threads):
    mixture = fit_class_gmm(
        features_path=snakemake.input.features,
        class_id=snakemake.params.class_id,
        settings=from_dict(GMMSettings, snakemake.params.settings, "maps.gmm"),
        device="cpu",
    )
    save_class_gmm(snakemake.output.gmm, mixture, snakemake.params.class_id, snakemake.params.class_name)
