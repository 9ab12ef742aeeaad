# BiSMAP: bidirectional prototype-based self-training for domain-adaptive
# semantic segmentation, as a Snakemake workflow. See README.md.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/gpa.smk"
include: "rules/train.smk"
include: "rules/maps.smk"
include: "rules/stm.smk"
include: "rules/selftrain.smk"
include: "rules/distill.smk"
include: "rules/evaluate.smk"
include: "rules/predict.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
