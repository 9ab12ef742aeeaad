"""Export a trained model and predict a folder of images with it (bismap.export, bismap.predict, rules/predict.smk)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from bismap.evaluation.metrics import confusion_matrix
from bismap.predict import cityscapes_label_ids
from tests.conftest import remove_new_files, run_snakemake, seed_results, tree_files, write_config


def test_train_ids_map_to_the_official_cityscapes_label_ids():
    train_ids = np.array([[0, 1, 18], [255, 10, 13]], dtype=np.uint8)  # road, sidewalk, bicycle / ignore, sky, car
    assert cityscapes_label_ids(train_ids).tolist() == [[7, 8, 33], [0, 23, 26]]


@pytest.fixture(scope="module")
def predicted(finished_tiny_run, tmp_path_factory):
    """The tiny run's warmup exported and predicted on its target-val images by the workflow's rules."""
    workdir, configfile = finished_tiny_run
    results = seed_results(workdir / "results")
    config = yaml.safe_load(configfile.read_text())
    config["predict"] = {"input": str(results / "data" / "digit_scenes" / "target_val" / "images"),
                         "models": ["warmup"], "flip_average": False, "resize": None}
    edited = write_config(tmp_path_factory.mktemp("predict") / "predict.yaml", config)
    before = tree_files(workdir / "results")
    run_snakemake(workdir, edited, str(results / "predict" / "warmup"))
    yield results
    remove_new_files(workdir / "results", before)  # the shared run as it was


def test_the_workflows_predictions_are_what_the_evaluation_scores(predicted):
    metrics = json.loads((predicted / "evaluation" / "warmup" / "metrics.json").read_text())
    labels_dir = predicted / "data" / "digit_scenes" / "target_val" / "labels"
    confusion = torch.zeros(11, 11, dtype=torch.int64)
    names = sorted(path.name for path in (predicted / "predict" / "warmup" / "train_ids").iterdir())
    assert len(names) == metrics["images"] == 12
    for name in names:
        prediction = torch.from_numpy(np.array(Image.open(predicted / "predict" / "warmup" / "train_ids" / name)))
        truth = torch.from_numpy(np.array(Image.open(labels_dir / name))).long()
        confusion += confusion_matrix(prediction.long(), truth, 11)
    assert confusion.tolist() == metrics["confusion"]
    assert not (predicted / "predict" / "warmup" / "label_ids").exists()  # digits: no Cityscapes ids
    overlay = np.array(Image.open(predicted / "predict" / "warmup" / "overlays" / names[0]))
    assert overlay.shape == (32, 32, 3)


def test_the_exported_file_loads_with_plain_torch_as_the_readme_shows(predicted):
    from bismap.models import ModelSettings, build_model  # the README snippet, line for line

    exported = torch.load(predicted / "export" / "warmup.pt", map_location="cpu", weights_only=False)
    model = build_model(ModelSettings(**exported["model_settings"]), len(exported["class_names"])).eval()
    model.load_state_dict(exported["weights"])
    image = np.array(Image.open(sorted((predicted / "data" / "digit_scenes" / "target_val" / "images").iterdir())[0]))
    mean, std = (torch.tensor(exported["normalization"][key]).view(3, 1, 1) for key in ("mean", "std"))
    pixels = ((torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std)[None]
    logits = torch.nn.functional.interpolate(model(pixels).logits, size=image.shape[:2], mode="bilinear")
    train_ids = logits.argmax(1)[0].numpy()
    name = sorted((predicted / "data" / "digit_scenes" / "target_val" / "images").iterdir())[0].name
    assert np.array_equal(train_ids, np.array(Image.open(predicted / "predict" / "warmup" / "train_ids" / name)))
    assert exported["class_names"][-1] == "background" and exported["provenance"]["iterations"] == 4


def test_the_command_predicts_at_another_size_with_flip_averaging(predicted, tmp_path):
    images = predicted / "data" / "digit_scenes" / "target_val" / "images"
    command = [sys.executable, "-m", "bismap.predict", str(predicted / "checkpoints" / "warmup.pt"), str(images),
               str(tmp_path / "out"), "--resize", "48", "40", "--flip-average"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    outputs = sorted((tmp_path / "out" / "train_ids").iterdir())
    assert len(outputs) == 12 and np.array(Image.open(outputs[0])).shape == (32, 32)  # back at the image's size
    same = [np.array_equal(np.array(Image.open(path)), np.array(Image.open(predicted / "predict" / "warmup" /
                                                                           "train_ids" / path.name)))
            for path in outputs]
    assert not all(same)  # another size and the mirror change some pixels
