"""Rule distill: the self-trained teacher distilled into a fresh student (ProDA Eq. 12)."""

from pathlib import Path

from bismap.devices import acquire_devices
from bismap.runtime import optional_input, rule_context
from bismap.settings import from_dict, job_settings
from bismap.training.distill import DistillInputs, DistillSettings, distill
from bismap.training.supervised import RunPaths


with rule_context(snakemake.log[0], snakemake.threads):
    inputs = DistillInputs(
        teacher_checkpoint=Path(snakemake.input.teacher),
        warmup_checkpoint=Path(snakemake.input.warmup),
        source_manifest=Path(snakemake.input.source_manifest),
        target_manifest=Path(snakemake.input.target_manifest),
        teacher_label_dirs=[Path(folder) for folder in snakemake.input.teacher_labels],
        student_checkpoint=optional_input(snakemake.input, "student_checkpoint"),
        imagenet_weights=optional_input(snakemake.input, "imagenet"),
        photometric_statistics=optional_input(snakemake.input, "photometric_statistics"),
    )
    paths = RunPaths(Path(snakemake.output.checkpoint), Path(snakemake.output.loss_log), Path(snakemake.params.state))
    # resources gpu=N (e.g. --set-resources distill:gpu=4): N processes, one per GPU, same global batch
    gpus = int(snakemake.resources.get("gpu", 0))
    with acquire_devices(gpus) as device:
        distill(
            inputs=inputs,
            paths=paths,
            settings=from_dict(DistillSettings, job_settings(snakemake.params), "distill"),
            device=device,
            world_size=max(1, gpus),
            run_settings={"distill": snakemake.params.settings, "model": snakemake.params.model},
        )
