# Backward direction of BiSMAP (Sec. 3.4, Eqs. 7-9): target prototypes by
# K-Means on the embeddings of a third-party network \hat{E}, and the Source
# Transferability Map (STM) that weights every source pixel in self-training.
# Settings: the stm section. \hat{E} = stm.embedding_checkpoint, or the warmup
# encoder as a stand-in when it is null (stm_embedding_inputs in common.smk).
#
#   \hat{E} + target-train --extract_target_embeddings--> stm/target_embeddings.h5
#     --target_prototypes (FAISS K-Means, J = stm.clusters)--> stm/target_prototypes.npy
#   warmup.pt + target-train --class_entropy--> stm/class_entropy.json (Eq. 8)
#   prototypes + source --source_distance_statistics (per shard)--> stm/distances/shard_<i>.json
#     (d_mean of Eq. 9 over the WHOLE source set, merged exactly before any map)
#   + class entropy --source_transferability (per shard)--> stm/weights/shard_<i>/<name>.png (Eq. 9)
#     --merge_source_transferability--> stm/summary.json, stm/preview.png


rule extract_target_embeddings:
    input:
        unpack(stm_embedding_inputs),
        manifest=run_path("manifests", "target_train.json"),
    output:
        embeddings=run_path("stm", "target_embeddings.h5"),
    params:
        network=stm_network_settings(),
        settings=result_part(stm_target_embedding_settings),
        execution=execution_part(stm_target_embedding_settings),
        code_version=CODE_VERSION,
    threads: config["threads"]["evaluate"]
    resources:
        gpu=GPU_PER_JOB,
    conda:
        CONDA_ENV
    log:
        log_path("extract_target_embeddings"),
    benchmark:
        benchmark_path("extract_target_embeddings")
    script:
        "../workflow_scripts/extract_target_embeddings.py"


# FAISS K-Means on the CPU; with stm.kmeans_gpu (a faiss-gpu build) on one GPU.
rule target_prototypes:
    input:
        embeddings=run_path("stm", "target_embeddings.h5"),
    output:
        prototypes=run_path("stm", "target_prototypes.npy"),
    params:
        settings=stm_prototype_settings,
        code_version=CODE_VERSION,
    threads: config["threads"]["evaluate"]
    resources:
        gpu=GPU_PER_JOB if stm_settings().get("kmeans_gpu", False) else 0,
    conda:
        CONDA_ENV
    log:
        log_path("target_prototypes"),
    benchmark:
        benchmark_path("target_prototypes")
    script:
        "../workflow_scripts/target_prototypes.py"


rule class_entropy:
    input:
        checkpoint=run_path("checkpoints", "warmup.pt"),
        manifest=run_path("manifests", "target_train.json"),
    output:
        entropy=run_path("stm", "class_entropy.json"),
    params:
        settings=result_part(stm_class_entropy_settings()),
        execution=execution_part(stm_class_entropy_settings()),
        code_version=CODE_VERSION,
    threads: config["threads"]["evaluate"]
    resources:
        gpu=GPU_PER_JOB,
    conda:
        CONDA_ENV
    log:
        log_path("class_entropy"),
    benchmark:
        benchmark_path("class_entropy")
    script:
        "../workflow_scripts/class_entropy.py"


# Image i in shard i % shards; exact partial sums, so d_mean is the same for any shard count.
rule source_distance_statistics:
    input:
        unpack(gpa_inputs),
        unpack(stm_embedding_inputs),
        manifest=run_path("manifests", "source.json"),
        prototypes=run_path("stm", "target_prototypes.npy"),
    output:
        statistics=run_path("stm", "distances", "shard_{shard}.json"),
    params:
        network=stm_network_settings(),
        settings=result_part(stm_transferability_settings()),
        execution=execution_part(stm_transferability_settings()),
        shard_index=lambda wildcards: int(wildcards.shard),
        shard_count=len(stm_shards()),
        code_version=CODE_VERSION,
    wildcard_constraints:
        shard=r"\d+",
    threads: config["threads"]["evaluate"]
    resources:
        gpu=GPU_PER_JOB,
    conda:
        CONDA_ENV
    log:
        log_path("source_distance_statistics", "shard_{shard}"),
    benchmark:
        benchmark_path("source_distance_statistics", "shard_{shard}")
    script:
        "../workflow_scripts/source_transferability.py"


# Eq. 9 maps, one folder per shard (not one declared output per PNG).
rule source_transferability:
    input:
        unpack(gpa_inputs),
        unpack(stm_embedding_inputs),
        manifest=run_path("manifests", "source.json"),
        prototypes=run_path("stm", "target_prototypes.npy"),
        class_entropy=run_path("stm", "class_entropy.json"),
        distances=expand(run_path("stm", "distances", "shard_{shard}.json"), shard=stm_shards(), allow_missing=True),
    output:
        weights=directory(run_path("stm", "weights", "shard_{shard}")),
        statistics=run_path("stm", "weights", "shard_{shard}.json"),
    params:
        network=stm_network_settings(),
        settings=result_part(stm_transferability_settings()),
        execution=execution_part(stm_transferability_settings()),
        shard_index=lambda wildcards: int(wildcards.shard),
        shard_count=len(stm_shards()),
        class_names=config["classes"],
        code_version=CODE_VERSION,
    wildcard_constraints:
        shard=r"\d+",
    threads: config["threads"]["evaluate"]
    resources:
        gpu=GPU_PER_JOB,
    conda:
        CONDA_ENV
    log:
        log_path("source_transferability", "shard_{shard}"),
    benchmark:
        benchmark_path("source_transferability", "shard_{shard}")
    script:
        "../workflow_scripts/source_transferability.py"


rule merge_source_transferability:
    input:
        unpack(gpa_inputs),
        manifest=run_path("manifests", "source.json"),
        statistics=expand(run_path("stm", "weights", "shard_{shard}.json"), shard=stm_shards(), allow_missing=True),
        weights=stm_weight_directories(),
    output:
        summary=run_path("stm", "summary.json"),
        preview=run_path("stm", "preview.png"),
    params:
        preview_images=stm_settings().get("preview_images", 4),
        code_version=CODE_VERSION,
    threads: 1
    conda:
        CONDA_ENV
    log:
        log_path("merge_source_transferability"),
    benchmark:
        benchmark_path("merge_source_transferability")
    script:
        "../workflow_scripts/source_transferability.py"


# Controls of the map (selftrain variants with stm_form, README: isolating the STM): Eq. 9 with e' = 0
# (distance_only), with the distance term held at 1/2 (entropy_only), or each pixel its class's mean
# Eq. 9 weight (class_mean, from the Eq. 9 summary).
use rule source_transferability as stm_control_weights with:
    input:
        unpack(gpa_inputs),
        unpack(stm_embedding_inputs),
        manifest=run_path("manifests", "source.json"),
        prototypes=run_path("stm", "target_prototypes.npy"),
        class_entropy=run_path("stm", "class_entropy.json"),
        distances=expand(run_path("stm", "distances", "shard_{shard}.json"), shard=stm_shards(), allow_missing=True),
        summary=run_path("stm", "summary.json"),
    output:
        weights=directory(run_path("stm", "controls", "{form}", "shard_{shard}")),
        statistics=run_path("stm", "controls", "{form}", "shard_{shard}.json"),
    params:
        network=stm_network_settings(),
        settings=result_part(lambda wildcards: {**stm_transferability_settings(), "form": wildcards.form}),
        execution=execution_part(lambda wildcards: {**stm_transferability_settings(), "form": wildcards.form}),
        shard_index=lambda wildcards: int(wildcards.shard),
        shard_count=len(stm_shards()),
        class_names=config["classes"],
        code_version=CODE_VERSION,
    wildcard_constraints:
        form="distance_only|entropy_only|class_mean",
        shard=r"\d+",
    log:
        log_path("stm_control_weights", "{form}_shard_{shard}"),
    benchmark:
        benchmark_path("stm_control_weights", "{form}_shard_{shard}")
