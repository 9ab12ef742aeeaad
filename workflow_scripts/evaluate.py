"""Rule evaluate: per-class IoU and mIoU of one checkpoint on target-val."""

from pathlib import Path

from bismap.devices import acquire_devices
from bismap.evaluation.evaluate import EvaluateSettings, EvaluationPaths, evaluate_checkpoint
from bismap.runtime import rule_context
from bismap.settings import from_dict, job_settings

with rule_context(snakemake.log[0], snakemake.threads):
    paths = EvaluationPaths(
        metrics_json=Path(snakemake.output.metrics),
        metrics_markdown=Path(snakemake.output.markdown),
        confusion_png=Path(snakemake.output.confusion),
    )
    with acquire_devices(snakemake.resources.get("gpu", 0)) as device:
        evaluate_checkpoint(
            checkpoint_path=snakemake.input.checkpoint,
            manifest_path=snakemake.input.manifest,
            paths=paths,
            settings=from_dict(EvaluateSettings, job_settings(snakemake.params), "evaluate"),
            device=device,
            title=snakemake.wildcards.model,
        )
