"""ProDA stage 1 in the adaptation loop (bismap.training.proda) on tiny generated data: Eq. 11 and the prototypes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bismap.data.loading import Manifest, SegmentationDataset
from bismap.methods.proda import ProdaSettings
from bismap.training.checkpoint import load_model
from bismap.training.proda import ProdaInputs, ProdaTrainSettings, initial_prototypes, proda_train
from bismap.training.supervised import RunPaths
from tests.test_selftrain import TRAINING, make_adaptation_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory, one_torch_thread) -> dict:
    ones = lambda label: np.ones(label.shape, dtype=np.uint16)  # noqa: E731 (weights are not used by ProDA)
    return make_adaptation_data(tmp_path_factory.mktemp("proda"), lambda label: label, ones)


def proda_inputs(data: dict) -> ProdaInputs:
    folder = data["folder"]
    return ProdaInputs(folder / "warmup.pt", folder / "source.json", folder / "target_train.json")


def test_initial_prototypes_are_the_warmups_class_centroids_on_target(data):
    """The centroid of each predicted class's features over all target pixels, computed image by image by hand."""
    model = load_model(data["folder"] / "warmup.pt")[0].eval()
    prototypes = initial_prototypes(model, data["folder"] / "target_train.json", 11, torch.device("cpu"))
    dataset = SegmentationDataset(Manifest.load(data["folder"] / "target_train.json"), labelled=False)
    sums, counts = torch.zeros(11, prototypes.shape[1], dtype=torch.float64), torch.zeros(11, dtype=torch.float64)
    with torch.no_grad():
        for index in range(len(dataset)):
            output = model(dataset[index]["image"][None])
            labels = output.logits.argmax(dim=1).flatten()  # (h*w,)
            features = output.features[0].flatten(1).T.double()  # (h*w, D)
            for class_id in labels.unique().tolist():
                sums[class_id] += features[labels == class_id].sum(dim=0)
                counts[class_id] += int((labels == class_id).sum())
    present = counts > 0
    assert torch.isnan(prototypes[~present]).all() and not torch.isnan(prototypes[present]).any()
    assert torch.allclose(prototypes[present].double(), sums[present] / counts[present, None], atol=1e-5)


def test_the_loss_is_eq_11_and_every_term_is_logged(data, tmp_path):
    settings = ProdaTrainSettings(training=dataclasses.replace(TRAINING, iterations=2),
                                  proda=ProdaSettings(kl_weight=2.0, regularization_weight=0.5))
    paths = RunPaths(tmp_path / "model.pt", tmp_path / "loss.tsv", tmp_path / "state.pt")
    proda_train(proda_inputs(data), paths, settings, torch.device("cpu"), run_settings={})
    header, *rows = [line.split("\t") for line in paths.loss_log.read_text().splitlines()]
    assert header[:6] == ["iteration", "loss", "source_ce", "target_sce", "structure_kl", "regularization"]
    for row in rows:
        values = dict(zip(header, map(float, row)))
        expected = values["source_ce"] + values["target_sce"] + 2.0 * values["structure_kl"] \
            + 0.5 * values["regularization"]
        assert values["loss"] == pytest.approx(expected, rel=1e-4)
        assert values["regularization"] >= np.log(11) - 1e-3  # -(1/K) sum_k log p_k is smallest (log K) at uniform p
    assert load_model(paths.checkpoint)[1]["step"] == 2 and not paths.state.exists()


def test_more_than_one_process_is_refused(data, tmp_path):
    paths = RunPaths(tmp_path / "model.pt", tmp_path / "loss.tsv", tmp_path / "state.pt")
    with pytest.raises(ValueError, match="one process"):
        proda_train(proda_inputs(data), paths, ProdaTrainSettings(training=TRAINING), torch.device("cpu"), {}, 2)
    assert not paths.checkpoint.exists()
