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
        settings=selftrain_run_settings,
        model=config["model"],
        state=run_path(".state", "selftrain_{variant}.pt"),
        code_version=CODE_VERSION,
    wildcard_constraints:
        variant="[a-z][a-z0-9_]*",
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
        settings=selftrain_run_settings,
        model=config["model"],
        state=run_path(".state", "selftrain_{variant}_round_{round}.pt"),
        code_version=CODE_VERSION,
    wildcard_constraints:
        variant="[a-z][a-z0-9_]*",
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
        shard_index=lambda wildcards: int(wildcards.shard),
        shard_count=len(maps_shards()),
        code_version=CODE_VERSION,
    wildcard_constraints:
        variant="[a-z][a-z0-9_]*",
        round=r"\d+",
        shard=r"\d+",
    log:
        log_path("round_pseudo_labels", "{variant}_round_{round}_shard_{shard}"),
    benchmark:
        benchmark_path("round_pseudo_labels", "{variant}_round_{round}_shard_{shard}")
