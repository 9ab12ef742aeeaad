"""BiSMAP: domain-adaptive semantic segmentation by prototype-based self-training.

The library behind the Snakemake workflow in this repository. Each stage of the
workflow is a thin script in ``workflow_scripts/`` that calls one function here.
"""

__version__ = "0.1.0"

# Bumped whenever a change to the library alters what a stage writes. Rules pass
# it as a param, so editing it reruns the stages (Snakemake does not track the
# modules a script imports).
CODE_VERSION = "0.3.0"
