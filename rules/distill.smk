# Distillation (ProDA Sec. 3.4, Eq. 12; the "*" rows of BiSMAP Tables 1-2):
# the self-trained variant distill.teacher labels target-train (averaged over teacher_scales and mirrors,
# confidence >= distill.teacher_confidence), then a student learns from those
# labels, the teacher's soft predictions and the source labels. With
# distill.stages S > 1 (the public BiSMAP code runs two), stage s's student is
# stage s + 1's teacher; the last stage is the report's "distill" row.
#
#   checkpoints/selftrain_<teacher>.pt --teacher_pseudo_labels (sharded)--> pseudo_labels/teacher/shard_<i>/
#     --distill_stage--> checkpoints/rounds/distill_stage_1.pt
#     --stage_teacher_pseudo_labels--> pseudo_labels/teacher_stage_2/ --distill_stage--> ... --distill-->
#     checkpoints/distill.pt (stage S)


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
        unpack(distill_teacher_inputs),
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


# The stages before the last: checkpoints/rounds/distill_stage_<s>.pt, evaluated as report rows of their own.
use rule distill as distill_stage with:
    output:
        checkpoint=run_path("checkpoints", "rounds", "distill_stage_{stage}.pt"),
        loss_log=run_path("training", "distill_stage_{stage}_loss.tsv"),
    params:
        state=run_path(".state", "distill_stage_{stage}.pt"),
    wildcard_constraints:
        stage=r"\d+",
    log:
        log_path("distill_stage", "{stage}"),
    benchmark:
        benchmark_path("distill_stage", "{stage}")


# The labels stage s > 1 learns from: stage s - 1's student's confident predictions, as stage 1's from its teacher.
use rule teacher_pseudo_labels as stage_teacher_pseudo_labels with:
    input:
        checkpoint=lambda wildcards: teacher_checkpoint(int(wildcards.stage), wildcards.seed),
        manifest=run_path("manifests", "target_train.json"),
    output:
        labels=directory(run_path("pseudo_labels", "teacher_stage_{stage}", "shard_{shard}")),
        statistics=run_path("pseudo_labels", "teacher_stage_{stage}", "shard_{shard}.json"),
    wildcard_constraints:
        stage=r"\d+",
        shard=r"\d+",
    log:
        log_path("stage_teacher_pseudo_labels", "{stage}_shard_{shard}"),
    benchmark:
        benchmark_path("stage_teacher_pseudo_labels", "{stage}_shard_{shard}")
