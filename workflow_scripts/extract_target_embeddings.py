"""Rule extract_target_embeddings: sampled per-pixel \\hat{E} embeddings of target-train (BiSMAP Sec. 3.4)."""

from bismap.devices import acquire_devices
from bismap.runtime import rule_context
from bismap.settings import from_dict, job_settings
from bismap.stm.embeddings import EmbeddingNetworkSettings, build_embedding_network
from bismap.stm.target import TargetEmbeddingSettings, extract_target_embeddings

with rule_context(snakemake.log[0], snakemake.threads):
    with acquire_devices(snakemake.resources.get("gpu", 0)) as device:
        network = build_embedding_network(
            embedding_checkpoint=snakemake.input.get("embedding_checkpoint"),
            warmup_checkpoint=snakemake.input.get("warmup"),  # stand-in when no checkpoint is configured
            settings=from_dict(EmbeddingNetworkSettings, snakemake.params.network, "stm (embedding network)"),
            device=device,
        )
        extract_target_embeddings(
            network=network,
            manifest_path=snakemake.input.manifest,
            output_path=snakemake.output.embeddings,
            settings=from_dict(TargetEmbeddingSettings, job_settings(snakemake.params), "stm (target embeddings)"),
            device=device,
        )
