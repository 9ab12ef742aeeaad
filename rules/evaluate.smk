# Evaluation on target-val and the summary table.


rule evaluate:
    input:
        checkpoint=lambda wildcards: model_checkpoint(wildcards.model, wildcards.seed),
        manifest=run_path("manifests", "target_val.json"),
    output:
        metrics=run_path("evaluation", "{model}", "metrics.json"),
        markdown=run_path("evaluation", "{model}", "metrics.md"),
        confusion=run_path("evaluation", "{model}", "confusion.png"),
    params:
        settings=result_part(config["evaluate"], EVALUATE_EXECUTION_KEYS),
        execution=execution_part(config["evaluate"], EVALUATE_EXECUTION_KEYS),
        code_version=CODE_VERSION,
    wildcard_constraints:
        model="[a-z][a-z0-9_]*",
    threads: config["threads"]["evaluate"]
    resources:
        gpu=GPU_PER_JOB,
    conda:
        CONDA_ENV
    log:
        log_path("evaluate", "{model}"),
    benchmark:
        benchmark_path("evaluate", "{model}")
    script:
        "../workflow_scripts/evaluate.py"


# Image, truth and every model's prediction for a few target-val images.
rule qualitative_figure:
    input:
        checkpoints=lambda wildcards: [model_checkpoint(model, wildcards.seed) for model in evaluated_models()],
        manifest=run_path("manifests", "target_val.json"),
    output:
        figure=run_path("report", "qualitative.png"),
    params:
        models=evaluated_models(),
        images=config.get("report", {}).get("qualitative_images", 4),
        code_version=CODE_VERSION,
    threads: config["threads"]["evaluate"]
    resources:
        gpu=GPU_PER_JOB,
    conda:
        CONDA_ENV
    log:
        log_path("qualitative_figure"),
    benchmark:
        benchmark_path("qualitative_figure")
    script:
        "../workflow_scripts/qualitative_figure.py"


rule report:
    input:
        metrics=expand(run_path("evaluation", "{model}", "metrics.json"), model=evaluated_models(), allow_missing=True),
        figure=run_path("report", "qualitative.png"),
    output:
        markdown=run_path("report", "summary.md"),
        json=run_path("report", "summary.json"),
    params:
        models=evaluated_models(),
        components=model_components(),
        class_names=config["classes"],
        code_version=CODE_VERSION,
    conda:
        CONDA_ENV
    log:
        log_path("report"),
    benchmark:
        benchmark_path("report")
    script:
        "../workflow_scripts/report.py"


# The report over the run seeds: mean ± std of every row of the per-seed reports,
# and the wall time per stage. Snakemake 9 counts a rule's benchmark file among
# its products (Rule.products), so another rule can name it as an input: the DAG
# orders report_seeds after every job it times, and a rerun job (which rewrites
# its benchmark) reruns this report. The same paths go in as params, keyed by
# seed and rule, since the flat input list does not say which job each file is.
rule report_seeds:
    input:
        summaries=expand(run_path("report", "summary.json"), seed=seeds()),
        benchmarks=[path for seed in seeds() for paths in stage_benchmarks(seed).values() for path in paths],
    output:
        markdown=results("report", "summary.md"),
        json=results("report", "summary.json"),
    params:
        seeds=seeds(),
        benchmarks=seed_benchmarks(),
        models=evaluated_models(),
        components=model_components(),
        methods=method_rows(),
        controls=control_rows(),
        code_version=CODE_VERSION,
    conda:
        CONDA_ENV
    log:
        results("logs", "report_seeds.log"),
    benchmark:
        results("benchmarks", "report_seeds.tsv")
    script:
        "../workflow_scripts/report_seeds.py"
