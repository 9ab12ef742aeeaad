# Datasets: generate the embedded benchmark, then index every domain once.


rule make_digit_scenes:
    output:
        directory(run_path("data", "digit_scenes", "{domain}")),
    params:
        settings=config.get("digit_scenes", {}).get("settings", {}),
        # split seed + 1000 x run seed: seed 0 is the configured data, and no two seeds share a split
        split=lambda wildcards: with_run_seed(config["digit_scenes"]["splits"][wildcards.domain], wildcards.seed, 1000),
        code_version=CODE_VERSION,
    wildcard_constraints:
        domain="|".join(DOMAINS),
    threads: 1
    conda:
        CONDA_ENV
    log:
        log_path("make_digit_scenes", "{domain}"),
    benchmark:
        benchmark_path("make_digit_scenes", "{domain}")
    script:
        "../workflow_scripts/make_digit_scenes.py"


rule index_dataset:
    input:
        index_inputs,
    output:
        run_path("manifests", "{domain}.json"),
    params:
        format=lambda wildcards: domain_settings(wildcards.domain)["format"],
        root=lambda wildcards: dataset_root(wildcards.domain, wildcards.seed),
        split=lambda wildcards: domain_settings(wildcards.domain).get("split", ""),
        num_classes=len(config["classes"]),
        # target-train labels are optional: the unlabelled target may have none
        require_labels=lambda wildcards: wildcards.domain != "target_train" or oracle_enabled(),
        label_size_mismatch=lambda wildcards: domain_settings(wildcards.domain).get("label_size_mismatch", "error"),
        code_version=CODE_VERSION,
    wildcard_constraints:
        domain="|".join(DOMAINS),
    threads: config["threads"]["data"]
    conda:
        CONDA_ENV
    log:
        log_path("index_dataset", "{domain}"),
    benchmark:
        benchmark_path("index_dataset", "{domain}")
    script:
        "../workflow_scripts/index_dataset.py"
