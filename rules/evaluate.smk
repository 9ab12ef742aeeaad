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


rule report:
    input:
        expand(results("evaluation", "{model}", "metrics.json"), model=evaluated_models()),
    output:
        markdown=results("report", "summary.md"),
        json=results("report", "summary.json"),
    params:
        models=evaluated_models(),
        class_names=config["classes"],
    conda:
        CONDA_ENV
    log:
        log_path("report"),
    script:
        "../workflow_scripts/report.py"
