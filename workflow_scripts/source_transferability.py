"""Rules source_distance_statistics (d_mean pass), source_transferability (Eq. 9 maps, one shard),
stm_control_weights (a control of them) and merge_source_transferability (summary and preview); BiSMAP
Sec. 3.4, Eqs. 7 and 9."""

from bismap.devices import acquire_devices
from bismap.io import atomic_directory
from bismap.runtime import rule_context
from bismap.settings import from_dict, job_settings
from bismap.stm.embeddings import EmbeddingNetworkSettings, build_embedding_network
from bismap.stm.source import (TransferabilitySettings, class_mean_weights, merge_transferability,
                               source_distance_statistics, write_weight_maps)
from bismap.stm.target import set_faiss_threads

with rule_context(snakemake.log[0], snakemake.threads):
    photometric = snakemake.input.get("photometric_statistics")  # GPA-stylized source, as trained
    if snakemake.rule == "merge_source_transferability":
        merge_transferability(
            statistics_paths=list(snakemake.input.statistics),
            weight_dirs=list(snakemake.input.weights),
            manifest_path=snakemake.input.manifest,
            summary_path=snakemake.output.summary,
            preview_path=snakemake.output.preview,
            preview_images=snakemake.params.preview_images,
            photometric_statistics_path=photometric,
        )
    else:
        set_faiss_threads(snakemake.threads)
        settings = from_dict(TransferabilitySettings, job_settings(snakemake.params), "stm (transferability)")
        with acquire_devices(snakemake.resources.get("gpu", 0)) as device:
            network = build_embedding_network(
                embedding_checkpoint=snakemake.input.get("embedding_checkpoint"),
                warmup_checkpoint=snakemake.input.get("warmup"),
                settings=from_dict(EmbeddingNetworkSettings, snakemake.params.network, "stm (embedding network)"),
                device=device,
            )
            shard = {"shard_index": snakemake.params.shard_index, "shard_count": snakemake.params.shard_count}
            if snakemake.rule == "source_distance_statistics":
                source_distance_statistics(network, snakemake.input.manifest, snakemake.input.prototypes,
                                           snakemake.output.statistics, settings=settings, device=device,
                                           photometric_statistics_path=photometric, **shard)
            else:
                summary = snakemake.input.get("summary")  # the controls: class means of the Eq. 9 map
                class_means = class_mean_weights(summary, snakemake.params.class_names) if summary else None
                with atomic_directory(snakemake.output.weights) as folder:  # complete folder or none
                    write_weight_maps(network, snakemake.input.manifest, snakemake.input.prototypes,
                                      snakemake.input.class_entropy, list(snakemake.input.distances), folder,
                                      settings=settings, device=device, class_names=snakemake.params.class_names,
                                      photometric_statistics_path=photometric,
                                      statistics_path=snakemake.output.statistics, class_means=class_means,
                                      **shard)
