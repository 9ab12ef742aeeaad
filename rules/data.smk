# Datasets: generate the embedded benchmark, then index every domain once.


rule make_digit_scenes:
    output:
        directory(results("data", "digit_scenes", "{domain}")),
    params:
        settings=config.get("digit_scenes", {}).get("settings", {}),
        split=lambda wildcards: config["digit_scenes"]["splits"][wildcards.domain],
        code_version=CODE_VERSION,
    wildcard_constraints:
        domain="|".join(DOMAINS),
    threads: 1
    conda:
        CONDA_ENV
    log:
        log_path("make_digit_scenes", "{domain}"),
    script:
        "../workflow_scripts/make_digit_scenes.py"


rule index_dataset:
    input:
        index_inputs,
    output:
        results("manifests", "{domain}.json"),
    params:
        format=lambda wildcards: domain_settings(wildcards.domain)["format"],
        root=lambda wildcards: dataset_root(wildcards.domain),
        split=lambda wildcards: domain_settings(wildcards.domain).get("split", ""),
        num_classes=len(config["classes"]),
        # target-train labels are optional: the unlabelled target may have none
        require_labels=lambda wildcards: wildcards.domain != "target_train" or oracle_enabled(),
        code_version=CODE_VERSION,
    wildcard_constraints:
        domain="|".join(DOMAINS),
    threads: config["threads"]["data"]
    conda:
        CONDA_ENV
    log:
        log_path("index_dataset", "{domain}"),
    script:
        "../workflow_scripts/index_dataset.py"
