# Self-training (BiSMAP Sec. 3.5, Eqs. 10-13), one run per variant of
# selftrain.variants (the rows of BiSMAP Table 4). Variants share every
# upstream stage: pseudo-labels (MAPs, or the baseline's confidence labels of
# the warmup), the transferability maps and the warmup itself.
#
#   warmup.pt + pseudo_labels/{maps|baseline}/ (+ stm/weights/) --selftrain--> checkpoints/selftrain_<variant>.pt


rule selftrain:
    input:
        unpack(selftrain_inputs),
        unpack(gpa_inputs),
        warmup=run_path("checkpoints", "warmup.pt"),
        source_manifest=run_path("manifests", "source.json"),
        target_manifest=run_path("manifests", "target_train.json"),
    output:
        checkpoint=run_path("checkpoints", "selftrain_{variant}.pt"),
        loss_log=run_path("training", "selftrain_{variant}_loss.tsv"),
    params:
        settings=selftrain_run_settings,
        model=config["model"],
        state=run_path(".state", "selftrain_{variant}.pt"),
        code_version=CODE_VERSION,
    wildcard_constraints:
        variant="[a-z][a-z0-9_]*",
    threads: config["threads"]["train"]
    resources:
        gpu=1,
    conda:
        CONDA_ENV
    log:
        log_path("selftrain", "{variant}"),
    benchmark:
        benchmark_path("selftrain", "{variant}")
    script:
        "../workflow_scripts/selftrain.py"
