# Supervised training: the source-only warmup and the target oracle.


# With gpa.enabled the source images are stylized to the target (GPA, BiSMAP
# Sec. 3.5) in the loader, on the fly, from the statistics of rule
# gpa_statistics: materializing stylized GTA5 (~25k full-HD PNGs) would add
# ~60 GB of disk, while aligning one full-HD image costs ~0.25 s of CPU
# (~0.1 s for SYNTHIA's 1280x760), which the DataLoader workers
# (warmup.workers) hide behind the GPU step. Editing the statistics reruns
# the warmup (they are an input).
rule warmup:
    input:
        unpack(pretrained_inputs),
        unpack(gpa_inputs),
        manifest=run_path("manifests", "source.json"),
    output:
        checkpoint=run_path("checkpoints", "warmup.pt"),
        loss_log=run_path("training", "warmup_loss.tsv"),
    params:
        training=result_part(warmup_training),
        execution=execution_part(warmup_training),
        model=config["model"],
        class_names=config["classes"],
        state=run_path(".state", "warmup.pt"),
        code_version=CODE_VERSION,
    threads: config["threads"]["train"]
    resources:
        gpu=GPU_PER_JOB,
    conda:
        CONDA_ENV
    log:
        log_path("warmup"),
    benchmark:
        benchmark_path("warmup")
    script:
        "../workflow_scripts/train_supervised.py"


# The oracle trains on labelled target images: never stylized, so its input
# list (which replaces the warmup's) has no photometric statistics.
use rule warmup as oracle with:
    input:
        unpack(pretrained_inputs),
        manifest=run_path("manifests", "target_train.json"),
    output:
        checkpoint=run_path("checkpoints", "oracle.pt"),
        loss_log=run_path("training", "oracle_loss.tsv"),
    params:
        training=result_part(oracle_training),
        execution=execution_part(oracle_training),
        model=config["model"],
        class_names=config["classes"],
        state=run_path(".state", "oracle.pt"),
        code_version=CODE_VERSION,
    conda:
        CONDA_ENV
    log:
        log_path("oracle"),
    benchmark:
        benchmark_path("oracle")
