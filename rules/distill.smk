# Distillation (ProDA Sec. 3.4, Eq. 12; the "*" rows of BiSMAP Tables 1-2):
# the self-trained variant distill.teacher labels target-train (flip-averaged,
# confidence >= distill.teacher_confidence), then a fresh student learns from
# those labels, the teacher's soft predictions and the source labels.
#
#   checkpoints/selftrain_<teacher>.pt --teacher_pseudo_labels (sharded)--> pseudo_labels/teacher/shard_<i>/
#     --distill--> checkpoints/distill.pt


use rule pseudo_labels as teacher_pseudo_labels with:
    input:
        checkpoint=teacher_checkpoint() if distill_enabled() else [],
        manifest=run_path("manifests", "target_train.json"),
    output:
        labels=directory(run_path("pseudo_labels", "teacher", "shard_{shard}")),
        statistics=run_path("pseudo_labels", "teacher", "shard_{shard}.json"),
    params:
        settings=teacher_label_settings(),
        execution=None,  # the parent rule's execution param is a function of its {labels}
        shard_index=lambda wildcards: int(wildcards.shard),
        shard_count=len(maps_shards()),
        code_version=CODE_VERSION,
    wildcard_constraints:
        shard=r"\d+",
    log:
        log_path("teacher_pseudo_labels", "shard_{shard}"),
    benchmark:
        benchmark_path("teacher_pseudo_labels", "shard_{shard}")


rule distill:
    input:
        unpack(distill_inputs),
        unpack(gpa_inputs),
        teacher=teacher_checkpoint() if distill_enabled() else [],
        teacher_labels=expand(run_path("pseudo_labels", "teacher", "shard_{shard}"), shard=maps_shards(),
                              allow_missing=True),
        warmup=run_path("checkpoints", "warmup.pt"),
        source_manifest=run_path("manifests", "source.json"),
        target_manifest=run_path("manifests", "target_train.json"),
    output:
        checkpoint=run_path("checkpoints", "distill.pt"),
        loss_log=run_path("training", "distill_loss.tsv"),
    params:
        settings=result_part(distill_run_settings),
        execution=execution_part(distill_run_settings),
        model=config["model"],
        state=run_path(".state", "distill.pt"),
        code_version=CODE_VERSION,
    threads: config["threads"]["train"]
    resources:
        gpu=GPU_PER_JOB,
    conda:
        CONDA_ENV
    log:
        log_path("distill"),
    benchmark:
        benchmark_path("distill")
    script:
        "../workflow_scripts/distill.py"
