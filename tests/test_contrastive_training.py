"""Bi-directional contrastive adaptation in the loop (bismap.training.contrastive): Eq. 11-12, labels, prototypes."""

from __future__ import annotations

import pytest
import torch

from bismap.methods.contrastive import ContrastiveSettings
from bismap.methods.prototypes import class_centroids, labels_at_feature_size
from bismap.training.checkpoint import load_model
from bismap.training.contrastive import (ContrastiveInputs, ContrastiveStep, ContrastiveTrainSettings,
                                         DomainPrototypes, contrastive_train)
from bismap.training.optim import make_optimizer
from bismap.training.supervised import RunPaths
from tests.conftest import dies_on_call
from tests.test_cag_training import batches
from tests.test_proda_training import data  # noqa: F401 (the module fixture: tiny scenes and a warmup)
from tests.test_selftrain import TRAINING

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_step(data: dict, **overrides) -> tuple[ContrastiveStep, torch.nn.Module]:  # noqa: F811
    model = load_model(data["folder"] / "warmup.pt")[0].train()
    momentum = DomainPrototypes(11, model.settings.feature_dim)
    return ContrastiveStep(model, momentum, make_optimizer(model, TRAINING.optimizer),
                           ContrastiveSettings(**overrides)), model


def test_the_loss_is_eq_12_from_its_six_terms(data):  # noqa: F811
    weights = dict(source_segmentation_weight=0.9, target_segmentation_weight=0.8, source_entropy_weight=0.3,
                   target_entropy_weight=0.2, forward_weight=0.7, backward_weight=0.6)
    step, _ = make_step(data, **weights)
    terms = {name: float(value.detach()) for name, value in step(*batches(torch.Generator().manual_seed(1)), 0).items()}
    expected = 0.9 * terms["source_ce"] + 0.8 * terms["target_ce"] + 0.3 * terms["source_entropy"] \
        + 0.2 * terms["target_entropy"] + 0.7 * terms["forward_contrast"] + 0.6 * terms["backward_contrast"]
    assert terms["loss"] == pytest.approx(expected, rel=1e-5)
    assert terms["forward_contrast"] > 0 and terms["backward_contrast"] > 0


def test_dynamic_labels_fill_the_static_gaps_only_above_the_threshold(data):  # noqa: F811
    """T = -1: every target pixel takes a source class (share 1); T = 1: cosines never exceed 1 (share 0)."""
    source, target = batches(torch.Generator().manual_seed(2))
    low, _ = make_step(data, similarity_threshold=-1.0)
    high, _ = make_step(data, similarity_threshold=1.0)
    assert float(low(source, target, 0)["dynamic_share"]) == 1.0
    assert float(high(source, target, 0)["dynamic_share"]) == 0.0


def test_the_momentum_prototypes_start_at_the_first_batch_centroids_then_blend(data):  # noqa: F811
    """Eq. 4: mu_S is the batch's source centroids after step 1, then 0.5 old + 0.5 new with lambda = 0.5."""
    step, model = make_step(data, prototype_momentum=0.5)
    model.eval()
    generator = torch.Generator().manual_seed(3)
    centroids = []
    for iteration in range(2):
        source, target = batches(generator)
        with torch.no_grad():  # the forward the step makes (eval mode: no dropout), before its SGD update
            features = model(torch.cat([source["image"], target["image"]])).features[:2]  # (2, D, h, w)
        labels = labels_at_feature_size(source["label"], tuple(features.shape[-2:]))
        centroids.append(class_centroids(features, labels, 11))
        step(source, target, iteration)
        if iteration == 0:
            present = ~torch.isnan(centroids[0]).any(dim=1)
            assert present.tolist() == [index in (0, 3) for index in range(11)]
            assert torch.allclose(step.momentum.source[present], centroids[0][present], atol=1e-5)
    expected = 0.5 * centroids[0] + 0.5 * centroids[1]
    assert torch.allclose(step.momentum.source[present], expected[present], atol=1e-5)
    assert torch.isnan(step.momentum.source[~present]).all()


def test_resume_after_interruption_matches_uninterrupted_run(data, tmp_path, monkeypatch):  # noqa: F811
    folder = data["folder"]
    inputs = ContrastiveInputs(folder / "warmup.pt", folder / "source.json", folder / "target_train.json",
                               data["labels"])
    settings = ContrastiveTrainSettings(training=TRAINING)

    def train(name: str) -> dict:
        paths = RunPaths(tmp_path / name / "model.pt", tmp_path / name / "loss.tsv", tmp_path / name / "state.pt")
        contrastive_train(inputs, paths, settings, torch.device("cpu"), run_settings={})
        return load_model(paths.checkpoint)[0].state_dict()

    reference = train("reference")
    original = ContrastiveStep.__call__
    monkeypatch.setattr(ContrastiveStep, "__call__", dies_on_call(original, 4))  # after the state of iteration 2
    with pytest.raises(KeyboardInterrupt):
        train("resumed")
    monkeypatch.setattr(ContrastiveStep, "__call__", original)
    resumed = train("resumed")
    assert all(torch.equal(reference[key], resumed[key]) for key in reference)
    header = (tmp_path / "resumed" / "loss.tsv").read_text().splitlines()[0].split("\t")
    assert header[:8] == ["iteration", "loss", "source_ce", "target_ce", "source_entropy", "target_entropy",
                          "forward_contrast", "backward_contrast"]
