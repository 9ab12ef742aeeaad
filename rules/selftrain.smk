# Self-training (BiSMAP Sec. 3.5, Eqs. 10-13), one run per variant of
# selftrain.variants (the rows of BiSMAP Table 4). Variants share every
# upstream stage: pseudo-labels (MAPs, or the baseline's confidence labels of
# the warmup), the transferability maps and the warmup itself.
#
# With selftrain.rounds R > 1 each variant self-trains R times: round r > 1
# starts from round r-1's model and learns from that model's confident labels
# of target-train (selftrain.round_labels); the last round is the variant's
# checkpoint.
#
#   warmup.pt + pseudo_labels/{maps|baseline}/ (+ stm/weights/) --selftrain[_round]--> round 1
#   rounds/selftrain_<variant>_round_<r>.pt --round_pseudo_labels--> pseudo_labels/rounds/<variant>_round_<r>/
#     --selftrain[_round]--> round r + 1, ..., checkpoints/selftrain_<variant>.pt (round R)


rule selftrain:
    input:
        unpack(selftrain_inputs),
        unpack(gpa_inputs),
        source_manifest=run_path("manifests", "source.json"),
        target_manifest=run_path("manifests", "target_train.json"),
    output:
        checkpoint=run_path("checkpoints", "selftrain_{variant}.pt"),
        loss_log=run_path("training", "selftrain_{variant}_loss.tsv"),
    params:
        method=lambda wildcards: selftrain_variant(wildcards.variant)["method"],
        settings=result_part(selftrain_run_settings),
        execution=execution_part(selftrain_run_settings),
        model=config["model"],
        state=run_path(".state", "selftrain_{variant}.pt"),
        code_version=CODE_VERSION,
    wildcard_constraints:
        variant=VARIANT_NAMES,
    threads: config["threads"]["train"]
    resources:
        gpu=GPU_PER_JOB,
    conda:
        CONDA_ENV
    log:
        log_path("selftrain", "{variant}"),
    benchmark:
        benchmark_path("selftrain", "{variant}")
    script:
        "../workflow_scripts/selftrain.py"


# The rounds before the last (selftrain.rounds > 1).
use rule selftrain as selftrain_round with:
    output:
        checkpoint=run_path("checkpoints", "rounds", "selftrain_{variant}_round_{round}.pt"),
        loss_log=run_path("training", "selftrain_{variant}_round_{round}_loss.tsv"),
    params:
        method=lambda wildcards: selftrain_variant(wildcards.variant)["method"],
        settings=result_part(selftrain_run_settings),
        execution=execution_part(selftrain_run_settings),
        model=config["model"],
        state=run_path(".state", "selftrain_{variant}_round_{round}.pt"),
        code_version=CODE_VERSION,
    wildcard_constraints:
        variant=VARIANT_NAMES,
        round=r"\d+",
    log:
        log_path("selftrain_round", "{variant}_round_{round}"),
    benchmark:
        benchmark_path("selftrain_round", "{variant}_round_{round}")


# The labels the next round learns from: round r's confident predictions.
use rule pseudo_labels as round_pseudo_labels with:
    input:
        checkpoint=run_path("checkpoints", "rounds", "selftrain_{variant}_round_{round}.pt"),
        manifest=run_path("manifests", "target_train.json"),
    output:
        labels=directory(run_path("pseudo_labels", "rounds", "{variant}_round_{round}", "shard_{shard}")),
        statistics=run_path("pseudo_labels", "rounds", "{variant}_round_{round}", "shard_{shard}.json"),
    params:
        settings=round_label_settings(),
        execution=None,  # the parent rule's execution param is a function of its {labels}
        shard_index=lambda wildcards: int(wildcards.shard),
        shard_count=len(maps_shards()),
        code_version=CODE_VERSION,
    wildcard_constraints:
        variant=VARIANT_NAMES,
        round=r"\d+",
        shard=r"\d+",
    log:
        log_path("round_pseudo_labels", "{variant}_round_{round}_shard_{shard}"),
    benchmark:
        benchmark_path("round_pseudo_labels", "{variant}_round_{round}_shard_{shard}")


# CAG-UDA's stages (method cag with rounds R > 1, Algorithm 1): stage s + 1
# starts from stage s's model, with the category anchors (Eq. 4) and the anchor
# labels (Eq. 5-7) recomputed by that model at the start of the stage. The
# anchors come out of the MAPs chain run on stage s's checkpoint (its class
# centroids), the labels out of the 'cas' strategy with them.
#
#   rounds/selftrain_<v>_round_<s>.pt --stage_source_features, stage_fit_class_gmm,
#     stage_merge_class_gmms--> maps/rounds/<v>_round_<s>/prototypes.h5
#     --stage_anchor_labels--> pseudo_labels/cag_rounds/<v>_round_<s>/shard_*
use rule extract_source_features as stage_source_features with:
    input:
        unpack(gpa_inputs),
        checkpoint=run_path("checkpoints", "rounds", "selftrain_{variant}_round_{round}.pt"),
        manifest=run_path("manifests", "source.json"),
    output:
        features=run_path("maps", "rounds", "{variant}_round_{round}", "source_features.h5"),
    wildcard_constraints:
        variant=VARIANT_NAMES,
        round=r"\d+",
    log:
        log_path("stage_source_features", "{variant}_round_{round}"),
    benchmark:
        benchmark_path("stage_source_features", "{variant}_round_{round}")


use rule fit_class_gmm as stage_fit_class_gmm with:
    input:
        features=run_path("maps", "rounds", "{variant}_round_{round}", "source_features.h5"),
    output:
        gmms=directory(run_path("maps", "rounds", "{variant}_round_{round}", "gmm", "job_{gmm_job}")),
    wildcard_constraints:
        variant=VARIANT_NAMES,
        round=r"\d+",
        gmm_job=r"\d+",
    log:
        log_path("stage_fit_class_gmm", "{variant}_round_{round}_job_{gmm_job}"),
    benchmark:
        benchmark_path("stage_fit_class_gmm", "{variant}_round_{round}_job_{gmm_job}")


use rule merge_class_gmms as stage_merge_class_gmms with:
    input:
        gmms=expand(run_path("maps", "rounds", "{variant}_round_{round}", "gmm", "job_{gmm_job}"),
                    gmm_job=range(len(gmm_job_classes())), allow_missing=True),
        features=run_path("maps", "rounds", "{variant}_round_{round}", "source_features.h5"),
    output:
        prototypes=run_path("maps", "rounds", "{variant}_round_{round}", "prototypes.h5"),
    wildcard_constraints:
        variant=VARIANT_NAMES,
        round=r"\d+",
    log:
        log_path("stage_merge_class_gmms", "{variant}_round_{round}"),
    benchmark:
        benchmark_path("stage_merge_class_gmms", "{variant}_round_{round}")


use rule pseudo_labels as stage_anchor_labels with:
    input:
        checkpoint=run_path("checkpoints", "rounds", "selftrain_{variant}_round_{round}.pt"),
        prototypes=run_path("maps", "rounds", "{variant}_round_{round}", "prototypes.h5"),
        manifest=run_path("manifests", "target_train.json"),
    output:
        labels=directory(run_path("pseudo_labels", "cag_rounds", "{variant}_round_{round}", "shard_{shard}")),
        statistics=run_path("pseudo_labels", "cag_rounds", "{variant}_round_{round}", "shard_{shard}.json"),
    params:
        settings=lambda wildcards: {"strategy": "cas", "margin": cag_margin(wildcards.variant)},
        execution=None,  # the parent rule's execution param is a function of its {labels}
        shard_index=lambda wildcards: int(wildcards.shard),
        shard_count=len(maps_shards()),
        code_version=CODE_VERSION,
    wildcard_constraints:
        variant=VARIANT_NAMES,
        round=r"\d+",
        shard=r"\d+",
    log:
        log_path("stage_anchor_labels", "{variant}_round_{round}_shard_{shard}"),
    benchmark:
        benchmark_path("stage_anchor_labels", "{variant}_round_{round}_shard_{shard}")


# The first stage's anchor labels of a cag variant with a margin of its own (a tuning trial's overrides).
use rule pseudo_labels as variant_anchor_labels with:
    input:
        checkpoint=run_path("checkpoints", "warmup.pt"),
        prototypes=run_path("maps", "prototypes.h5"),
        manifest=run_path("manifests", "target_train.json"),
    output:
        labels=directory(run_path("pseudo_labels", "cas_variants", "{variant}", "shard_{shard}")),
        statistics=run_path("pseudo_labels", "cas_variants", "{variant}", "shard_{shard}.json"),
    params:
        settings=lambda wildcards: {"strategy": "cas", "margin": cag_margin(wildcards.variant)},
        execution=None,  # the parent rule's execution param is a function of its {labels}
        shard_index=lambda wildcards: int(wildcards.shard),
        shard_count=len(maps_shards()),
        code_version=CODE_VERSION,
    wildcard_constraints:
        variant=VARIANT_NAMES,
        shard=r"\d+",
    log:
        log_path("variant_anchor_labels", "{variant}_shard_{shard}"),
    benchmark:
        benchmark_path("variant_anchor_labels", "{variant}_shard_{shard}")
