# Evaluation on target-val and the summary table.


rule evaluate:
    input:
        checkpoint=results("checkpoints", "{model}.pt"),
        manifest=results("manifests", "target_val.json"),
    output:
        metrics=results("evaluation", "{model}", "metrics.json"),
        markdown=results("evaluation", "{model}", "metrics.md"),
        confusion=results("evaluation", "{model}", "confusion.png"),
    params:
        settings=config["evaluate"],
        code_version=CODE_VERSION,
    wildcard_constraints:
        model="[a-z_]+",
    threads: config["threads"]["evaluate"]
    resources:
        gpu=1,
    conda:
        CONDA_ENV
    log:
        log_path("evaluate", "{model}"),
    script:
        "../workflow_scripts/evaluate.py"


# Image, truth and every model's prediction for a few target-val images.
rule qualitative_figure:
    input:
        checkpoints=expand(results("checkpoints", "{model}.pt"), model=evaluated_models()),
        manifest=results("manifests", "target_val.json"),
    output:
        figure=results("report", "qualitative.png"),
    params:
        models=evaluated_models(),
        images=config.get("report", {}).get("qualitative_images", 4),
        code_version=CODE_VERSION,
    threads: config["threads"]["evaluate"]
    resources:
        gpu=1,
    conda:
        CONDA_ENV
    log:
        log_path("qualitative_figure"),
    script:
        "../workflow_scripts/qualitative_figure.py"


rule report:
    input:
        metrics=expand(results("evaluation", "{model}", "metrics.json"), model=evaluated_models()),
        figure=results("report", "qualitative.png"),
    output:
        markdown=results("report", "summary.md"),
        json=results("report", "summary.json"),
    params:
        models=evaluated_models(),
        components=model_components(),
        class_names=config["classes"],
        code_version=CODE_VERSION,
    conda:
        CONDA_ENV
    log:
        log_path("report"),
    script:
        "../workflow_scripts/report.py"
