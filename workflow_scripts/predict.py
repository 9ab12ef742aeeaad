"""Rule predict: train-id, Cityscapes labelId and overlay PNGs of every image of predict.input (bismap.predict)."""

from bismap.devices import acquire_devices
from bismap.io import atomic_directory
from bismap.predict import PredictSettings, predict_folder
from bismap.runtime import rule_context
from bismap.settings import from_dict

with rule_context(snakemake.log[0], snakemake.threads):
    settings = from_dict(PredictSettings, snakemake.params.settings, "predict")
    with acquire_devices(snakemake.resources.get("gpu", 0)) as device, \
            atomic_directory(snakemake.output.predictions) as folder:  # complete folder or none
        predict_folder(snakemake.input.model, snakemake.input.images, folder, settings, device)
