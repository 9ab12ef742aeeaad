# Global Photometric Alignment (GPA, BiSMAP Sec. 3.5 and 4.2, its ref. [24]):
# pooled CIELAB statistics of the target-train images, computed once. Only part
# of the DAG when gpa.enabled is true: the warmup then asks for the statistics
# (gpa_inputs in rules/common.smk) and stylizes each source image on the fly.


rule gpa_statistics:
    input:
        target=run_path("manifests", "target_train.json"),
        source=run_path("manifests", "source.json"),  # preview only
    output:
        statistics=run_path("gpa", "target_statistics.json"),
        preview=run_path("gpa", "preview.png"),
    params:
        max_images=gpa_settings()["max_images"],  # schema defaults are filled in
        seed=lambda wildcards: with_run_seed(gpa_settings(), wildcards.seed)["seed"],
        preview_rows=gpa_settings()["preview_rows"],
        code_version=CODE_VERSION,
    threads: 1
    conda:
        CONDA_ENV
    log:
        log_path("gpa_statistics"),
    benchmark:
        benchmark_path("gpa_statistics")
    script:
        "../workflow_scripts/gpa_statistics.py"
