# Use a trained model outside the benchmark (README: predict and export).
#
#   checkpoints/<model>.pt --export_model--> export/<model>.pt (self-describing: bismap.export)
#   export/<model>.pt + predict.input (a folder of images) --predict--> predict/<model>/{train_ids,label_ids,overlays}/
#
# <model> is any report row (warmup, selftrain_<variant>, distill, oracle, ...). export/<model>.pt is built on
# request (snakemake results/<...>/seed_0/export/distill.pt); predict runs for predict.models when predict.input
# names a folder.


rule export_model:
    input:
        checkpoint=lambda wildcards: model_checkpoint(wildcards.model, wildcards.seed),
    output:
        model=run_path("export", "{model}.pt"),
    params:
        code_version=CODE_VERSION,
    wildcard_constraints:
        model="[a-z][a-z0-9_]*",
    conda:
        CONDA_ENV
    log:
        log_path("export_model", "{model}"),
    benchmark:
        benchmark_path("export_model", "{model}")
    script:
        "../workflow_scripts/export_model.py"


rule predict:
    input:
        model=run_path("export", "{model}.pt"),
        images=config.get("predict", {}).get("input") or [],
    output:
        predictions=directory(run_path("predict", "{model}")),
    params:
        settings={key: value for key, value in config.get("predict", {}).items() if key in ("flip_average", "resize")},
        code_version=CODE_VERSION,
    wildcard_constraints:
        model="[a-z][a-z0-9_]*",
    threads: config["threads"]["evaluate"]
    resources:
        gpu=GPU_PER_JOB,
    conda:
        CONDA_ENV
    log:
        log_path("predict", "{model}"),
    benchmark:
        benchmark_path("predict", "{model}")
    script:
        "../workflow_scripts/predict.py"
