"""Bi-directional contrastive adaptation in the loop (bismap.training.contrastive): Eq. 11-12, labels, prototypes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

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
    # y_F renewed after steps 2 and 4 of 6; the run dies in step 6, after both renewals: its resume from the state
    # of step 4 takes the labels renewed at 2 from the state folder and renews again at 4
    settings = ContrastiveTrainSettings(training=dataclasses.replace(TRAINING, iterations=6),
                                        contrastive=ContrastiveSettings(static_label_interval=2))

    def train(name: str) -> dict:
        paths = RunPaths(tmp_path / name / "model.pt", tmp_path / name / "loss.tsv", tmp_path / name / "state.pt")
        contrastive_train(inputs, paths, settings, torch.device("cpu"), run_settings={})
        return load_model(paths.checkpoint)[0].state_dict()

    reference = train("reference")
    original = ContrastiveStep.__call__
    monkeypatch.setattr(ContrastiveStep, "__call__", dies_on_call(original, 6))  # after the state of iteration 4
    with pytest.raises(KeyboardInterrupt):
        train("resumed")
    monkeypatch.setattr(ContrastiveStep, "__call__", original)
    resumed = train("resumed")
    assert all(torch.equal(reference[key], resumed[key]) for key in reference)
    header = (tmp_path / "resumed" / "loss.tsv").read_text().splitlines()[0].split("\t")
    assert header[:8] == ["iteration", "loss", "source_ce", "target_ce", "source_entropy", "target_entropy",
                          "forward_contrast", "backward_contrast"]


def first_step_terms(data: dict, source: dict, target: dict, **overrides) -> dict[str, float]:  # noqa: F811
    """The terms of one step from the warmup, in eval mode (no dropout: equal forwards for equal images)."""
    step, model = make_step(data, **overrides)
    model.eval()
    return {name: float(value.detach()) for name, value in step(source, target, 0).items()}


def test_pair_scope_averages_the_pairs_of_image_i_with_image_i(data):  # noqa: F811
    """prototype_scope "pair" (public damnet_trainer.py:143-147): each term is the mean over the pairs, each pair
    with its own prototypes; it equals the mean of two one-image batches and differs from "batch"."""
    source, target = batches(torch.Generator().manual_seed(4))
    pairs = first_step_terms(data, source, target)
    singles = [first_step_terms(data, {key: value[index:index + 1] for key, value in source.items()},
                                {key: value[index:index + 1] for key, value in target.items()}) for index in (0, 1)]
    pooled = first_step_terms(data, source, target, prototype_scope="batch")
    for name in ("forward_contrast", "backward_contrast"):
        assert pairs[name] == pytest.approx((singles[0][name] + singles[1][name]) / 2, rel=1e-4)
        assert pairs[name] != pytest.approx(pooled[name], rel=1e-3)


def test_static_only_labels_make_the_contrastive_terms_ignore_the_dynamic_labels(data):  # noqa: F811
    """label_priority "static_only" (what the public losses use): T no longer changes FCL or BCL; "dynamic" does."""
    source, target = batches(torch.Generator().manual_seed(5))
    terms = {(priority, threshold): first_step_terms(data, source, target, label_priority=priority,
                                                     similarity_threshold=threshold)
             for priority in ("static_only", "dynamic") for threshold in (-1.0, 1.0)}
    for name in ("forward_contrast", "backward_contrast"):
        assert terms["static_only", -1.0][name] == pytest.approx(terms["static_only", 1.0][name], rel=1e-6)
        assert terms["dynamic", -1.0][name] != pytest.approx(terms["dynamic", 1.0][name], rel=1e-3)
    assert terms["dynamic", 1.0]["forward_contrast"] == pytest.approx(terms["static_only", 1.0]["forward_contrast"],
                                                                       rel=1e-6)  # T = 1: no dynamic label


def test_prototype_gradient_changes_the_update_not_the_loss(data):  # noqa: F811
    """prototype_gradient (public code: prototypes are not detached) sends the contrastive gradient through
    rho_S and rho_T too: the same loss value, another (finite) SGD step."""
    source, target = batches(torch.Generator().manual_seed(6))
    results = []
    for gradient in (True, False):
        step, model = make_step(data, prototype_gradient=gradient)
        model.eval()
        loss = float(step(source, target, 0)["loss"].detach())
        results.append((loss, torch.cat([parameter.detach().flatten() for parameter in model.parameters()])))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert torch.isfinite(results[0][1]).all()
    assert not torch.allclose(results[0][1], results[1][1], rtol=0, atol=1e-9)


def renewal_run(data: dict, folder, interval: int, monkeypatch) -> tuple[dict, list]:  # noqa: F811
    """A 4-iteration run renewing y_F every ``interval`` iterations; its weights and what each renewal labelled."""
    from bismap.training import static_labels

    renewals = []
    original = static_labels.renew_static_labels

    def recording(run, settings, coverage, renewed, device):
        result = original(run, settings, coverage, renewed, device)
        pngs = {name: np.array(Image.open(path)) for name, path in result.label_paths.items()}
        renewals.append((renewed.name, run.model.training, pngs))
        return result

    monkeypatch.setattr(static_labels, "renew_static_labels", recording)
    inputs = ContrastiveInputs(data["folder"] / "warmup.pt", data["folder"] / "source.json",
                               data["folder"] / "target_train.json", data["labels"])
    settings = ContrastiveTrainSettings(training=TRAINING, contrastive=ContrastiveSettings(static_label_interval=interval))
    paths = RunPaths(folder / "model.pt", folder / "loss.tsv", folder / ".state" / "run.pt")
    contrastive_train(inputs, paths, settings, torch.device("cpu"), run_settings={})
    assert not (folder / ".state" / "run_static_labels").exists()  # resume state only: removed with the state
    return load_model(paths.checkpoint)[0].state_dict(), renewals


def test_static_labels_are_renewed_every_interval_by_the_model_in_training(data, tmp_path, monkeypatch):  # noqa: F811
    """Interval 2 over 4 iterations: one renewal after 2 steps (eval-mode labels, then back to training), and
    the run differs from one whose interval is longer than the run (no renewal: its own batches unchanged)."""
    renewed, renewals = renewal_run(data, tmp_path / "renewed", 2, monkeypatch)
    plain, none = renewal_run(data, tmp_path / "plain", 4, monkeypatch)
    assert none == [] and [(name, training) for name, training, _ in renewals] == [("iteration_2", True)]
    labels = np.stack(list(renewals[0][2].values()))  # (images, H, W)
    initial = np.stack([np.array(Image.open(path)) for folder in data["labels"] for path in sorted(folder.glob("*.png"))])
    assert labels.shape == initial.shape and set(np.unique(labels)) <= set(range(11)) | {255}
    assert not np.array_equal(labels, initial)
    # the same share of labelled pixels as the initial labels (a quantile of 4,096 sampled scores per image)
    assert (labels != 255).mean() == pytest.approx((initial != 255).mean(), abs=0.03)
    assert any(not torch.equal(renewed[key], plain[key]) for key in plain)


def test_target_cross_entropy_and_entropies_are_taken_at_the_image_resolution_as_the_public_code(data):  # noqa: F811
    """loss_resolution "image" (damnet_trainer.py:136-140 on DeeplabV2.py:191's upsampled prediction): the target
    CE is the CE of the bilinearly upsampled logits with the (H, W) static labels; "feature" (releases up to 0.3.1)
    is the CE of the (h, w) logits with the nearest-downsampled labels. The two differ."""
    source, target = batches(torch.Generator().manual_seed(7))
    target["label"][:, :, 14:16] = 255  # a gap that the nearest downsampling to 4 x 4-pixel cells loses
    image = first_step_terms(data, source, target)
    feature = first_step_terms(data, source, target, loss_resolution="feature")
    model = load_model(data["folder"] / "warmup.pt")[0].eval()
    with torch.no_grad():
        logits = model(torch.cat([source["image"], target["image"]])).logits[2:]  # (2, K, h, w)
    upsampled = torch.nn.functional.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    small = labels_at_feature_size(target["label"], tuple(logits.shape[-2:]))
    assert image["target_ce"] == pytest.approx(float(torch.nn.functional.cross_entropy(
        upsampled, target["label"], ignore_index=255)), rel=1e-5)
    assert feature["target_ce"] == pytest.approx(float(torch.nn.functional.cross_entropy(
        logits, small, ignore_index=255)), rel=1e-5)
    assert image["target_ce"] != pytest.approx(feature["target_ce"], rel=1e-3)
    assert image["target_entropy"] != pytest.approx(feature["target_entropy"], rel=1e-3)
    assert image["forward_contrast"] == pytest.approx(feature["forward_contrast"], rel=1e-6)  # feature cells both
