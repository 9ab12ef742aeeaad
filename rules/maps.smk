# Multiple Anisotropic Prototypes (MAPs, BiSMAP Sec. 3.3, Eqs. 3-6) and the
# pseudo-labels they assign to target-train; the pseudo-label quality report
# (BiSMAP Table 5). Settings: the maps and pseudo_label_report sections.
#
#   warmup.pt + source --extract_source_features--> maps/source_features.h5
#     --fit_class_gmm (maps.gmm_jobs jobs; null = one per class)--> maps/gmm/job_<j>/class_<c>.h5
#     --merge_class_gmms--> maps/prototypes.h5
#     --pseudo_labels (one job per shard)--> pseudo_labels/maps/shard_<i>/*.png
#     --merge_pseudo_labels--> pseudo_labels/maps/summary.json
#   prototypes + warmup.pt + target-train labels --pseudo_label_report--> pseudo_label_report/


# Eq. 3: decoder features of the source pixels the warmup classifies correctly,
# sampled per class. With GPA on, the source is stylized as the warmup saw it.
rule extract_source_features:
    input:
        unpack(gpa_inputs),
        checkpoint=run_path("checkpoints", "warmup.pt"),
        manifest=run_path("manifests", "source.json"),
    output:
        features=run_path("maps", "source_features.h5"),
    params:
        settings=result_part(lambda wildcards: with_run_seed(maps_settings()["features"], wildcards.seed)),
        execution=execution_part(lambda wildcards: with_run_seed(maps_settings()["features"], wildcards.seed)),
        code_version=CODE_VERSION,
    threads: config["threads"]["evaluate"]
    resources:
        gpu=GPU_PER_JOB,
    conda:
        CONDA_ENV
    log:
        log_path("extract_source_features"),
    benchmark:
        benchmark_path("extract_source_features")
    script:
        "../workflow_scripts/extract_source_features.py"


# Eqs. 4-5: a K-component GMM per class, fitted on the CPU (fan-out). Job j fits
# classes j, j + N, ... (N = maps.gmm_jobs; null = one job per class) one after
# the other, each into its own class_<c>.h5: the same files whatever N is
# (each class's fit is seeded by gmm.seed + class id). Fewer jobs save the
# ~3 s of Python/torch start-up per job that tiny fits do not hide.
rule fit_class_gmm:
    input:
        features=run_path("maps", "source_features.h5"),
    output:
        gmms=directory(run_path("maps", "gmm", "job_{gmm_job}")),
    params:
        settings=lambda wildcards: with_run_seed(maps_settings()["gmm"], wildcards.seed),
        class_ids=lambda wildcards: gmm_job_classes()[int(wildcards.gmm_job)],
        code_version=CODE_VERSION,
    wildcard_constraints:
        gmm_job=r"\d+",
    threads: maps_settings()["fit_threads"]
    conda:
        CONDA_ENV
    log:
        log_path("fit_class_gmm", "job_{gmm_job}"),
    benchmark:
        benchmark_path("fit_class_gmm", "job_{gmm_job}")
    script:
        "../workflow_scripts/fit_class_gmm.py"


rule merge_class_gmms:
    input:
        gmms=expand(run_path("maps", "gmm", "job_{gmm_job}"), gmm_job=range(len(gmm_job_classes())),
                    allow_missing=True),
        features=run_path("maps", "source_features.h5"),
    output:
        prototypes=run_path("maps", "prototypes.h5"),
    params:
        settings=lambda wildcards: with_run_seed(maps_settings()["gmm"], wildcards.seed),
        class_count=len(class_ids()),
        code_version=CODE_VERSION,
    threads: 1
    conda:
        CONDA_ENV
    log:
        log_path("merge_class_gmms"),
    benchmark:
        benchmark_path("merge_class_gmms")
    script:
        "../workflow_scripts/merge_class_gmms.py"


# Eq. 6 on target-train, image i in shard i % shards: the same PNGs whatever
# the shard count. One folder per shard, not one declared output per PNG.
# {labels} is 'maps' (BiSMAP's labels) or 'baseline' (the confidence labels of
# the self-training variants without MAPs, selftrain.baseline_pseudo_labels).
rule pseudo_labels:
    input:
        unpack(pseudo_label_inputs),
        checkpoint=run_path("checkpoints", "warmup.pt"),
        manifest=run_path("manifests", "target_train.json"),
    output:
        labels=directory(run_path("pseudo_labels", "{labels}", "shard_{shard}")),
        statistics=run_path("pseudo_labels", "{labels}", "shard_{shard}.json"),
    params:
        settings=result_part(lambda wildcards: pseudo_label_settings(wildcards.labels)),
        execution=execution_part(lambda wildcards: pseudo_label_settings(wildcards.labels)),
        shard_index=lambda wildcards: int(wildcards.shard),
        shard_count=len(maps_shards()),
        code_version=CODE_VERSION,
    wildcard_constraints:
        labels="maps|baseline|cas|confidence_matched|cas_matched",
        shard=r"\d+",
    threads: config["threads"]["evaluate"]
    resources:
        gpu=GPU_PER_JOB,
    conda:
        CONDA_ENV
    log:
        log_path("pseudo_labels", "{labels}_shard_{shard}"),
    benchmark:
        benchmark_path("pseudo_labels", "{labels}_shard_{shard}")
    script:
        "../workflow_scripts/pseudo_labels.py"


rule merge_pseudo_labels:
    input:
        statistics=expand(run_path("pseudo_labels", "{labels}", "shard_{shard}.json"), shard=maps_shards(),
                          allow_missing=True),
        labels=expand(run_path("pseudo_labels", "{labels}", "shard_{shard}"), shard=maps_shards(), allow_missing=True),
    output:
        summary=run_path("pseudo_labels", "{labels}", "summary.json"),
    params:
        code_version=CODE_VERSION,
    wildcard_constraints:
        labels=r"maps|baseline|teacher|teacher_stage_\d+|confidence_matched|cas_matched",
    threads: 1
    conda:
        CONDA_ENV
    log:
        log_path("merge_pseudo_labels", "{labels}"),
    benchmark:
        benchmark_path("merge_pseudo_labels", "{labels}")
    script:
        "../workflow_scripts/pseudo_labels.py"


# BiSMAP Table 5 on the labelled target-train: every strategy over its sweep.
rule pseudo_label_report:
    input:
        unpack(pseudo_label_report_inputs),
        checkpoint=run_path("checkpoints", "warmup.pt"),
        manifest=run_path("manifests", "target_train.json"),
    output:
        markdown=run_path("pseudo_label_report", "table.md"),
        json=run_path("pseudo_label_report", "table.json"),
        plot=run_path("pseudo_label_report", "accuracy_vs_coverage.png"),
    params:
        settings=result_part({key: value for key, value in pseudo_label_report_settings().items() if key != "enabled"}),
        execution=execution_part({key: value for key, value in pseudo_label_report_settings().items() if key != "enabled"}),
        code_version=CODE_VERSION,
    threads: config["threads"]["evaluate"]
    resources:
        gpu=GPU_PER_JOB,
    conda:
        CONDA_ENV
    log:
        log_path("pseudo_label_report"),
    benchmark:
        benchmark_path("pseudo_label_report")
    script:
        "../workflow_scripts/pseudo_label_report.py"
