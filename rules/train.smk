# Supervised training: the source-only warmup and the target oracle.


rule warmup:
    input:
        unpack(pretrained_inputs),
        manifest=results("manifests", "source.json"),
    output:
        checkpoint=results("checkpoints", "warmup.pt"),
        loss_log=results("training", "warmup_loss.tsv"),
    params:
        training=config["warmup"],
        model=config["model"],
        class_names=config["classes"],
        state=results(".state", "warmup.pt"),
        code_version=CODE_VERSION,
    threads: config["threads"]["train"]
    resources:
        gpu=1,
    conda:
        CONDA_ENV
    log:
        log_path("warmup"),
    script:
        "../workflow_scripts/train_supervised.py"


use rule warmup as oracle with:
    input:
        unpack(pretrained_inputs),
        manifest=results("manifests", "target_train.json"),
    output:
        checkpoint=results("checkpoints", "oracle.pt"),
        loss_log=results("training", "oracle_loss.tsv"),
    params:
        training=config.get("oracle", {}).get("training", config["warmup"]),
        model=config["model"],
        class_names=config["classes"],
        state=results(".state", "oracle.pt"),
        code_version=CODE_VERSION,
    conda:
        CONDA_ENV
    log:
        log_path("oracle"),
