"""Rule target_prototypes: J FAISS K-Means centres of the target embeddings (BiSMAP Sec. 3.4)."""

from bismap.devices import acquire_devices
from bismap.runtime import rule_context
from bismap.settings import from_dict
from bismap.stm.target import PrototypeSettings, fit_target_prototypes, set_faiss_threads

with rule_context(snakemake.log[0], snakemake.threads):
    set_faiss_threads(snakemake.threads)
    # gpu=1 only with stm.kmeans_gpu: the slot narrows CUDA_VISIBLE_DEVICES before FAISS initialises CUDA
    with acquire_devices(snakemake.resources.get("gpu", 0)) as device:
        fit_target_prototypes(
            embeddings_path=snakemake.input.embeddings,
            output_path=snakemake.output.prototypes,
            settings=from_dict(PrototypeSettings, snakemake.params.settings, "stm (target prototypes)"),
            device=device,
        )
