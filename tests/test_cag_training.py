"""CAG-UDA stage 1 in the adaptation loop (bismap.training.cag): Eq. 12 from its terms, the anchors' role,
the probability labels of the frozen start model."""

from __future__ import annotations

import pytest
import torch

from bismap.losses import masked_mean, weighted_cross_entropy_pixels
from bismap.methods.cag import CagSettings
from bismap.models.deeplab import SegmentationOutput
from bismap.training.cag import CagStep, frozen_copy
from bismap.training.checkpoint import load_model
from bismap.training.optim import make_optimizer
from tests.test_proda_training import data  # noqa: F401 (the module fixture: tiny scenes and a warmup)
from tests.test_selftrain import TRAINING

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batches(generator: torch.Generator) -> tuple[dict, dict]:
    """Source labels everywhere in classes 0 and 3; target anchor labels: class 3 on the left half, ignore elsewhere."""
    source_labels = torch.zeros(2, 32, 32, dtype=torch.long)
    source_labels[:, :, 16:] = 3
    target_labels = torch.full((2, 32, 32), 255, dtype=torch.long)
    target_labels[:, :, :16] = 3
    source = {"image": torch.randn(2, 3, 32, 32, generator=generator), "label": source_labels}
    target = {"image": torch.randn(2, 3, 32, 32, generator=generator), "label": target_labels}
    return source, target


class ConfidentLabeller(torch.nn.Module):
    """A stand-in start model: logits that put all mass on ``label`` at every pixel of the (b, 3, H, W) input."""

    def __init__(self, label: int, classes: int) -> None:
        super().__init__()
        self.label, self.classes = label, classes

    def forward(self, images: torch.Tensor) -> SegmentationOutput:
        batch, _, height, width = images.shape
        logits = torch.zeros(batch, self.classes, height // 4, width // 4)
        logits[:, self.label] = 20.0
        return SegmentationOutput(logits, torch.zeros(batch, 1, height // 4, width // 4))


def own_prediction_batches(model: torch.nn.Module, generator: torch.Generator) -> tuple[dict, dict]:
    """Source labels and target anchor labels = the eval-mode model's own predictions (32 x 32, 4 x 4 blocks), so
    every pixel is labelled and predicted alike and the classes with >= 10 feature pixels count in Eq. 8 / 10."""
    source, target = batches(generator)
    with torch.no_grad():
        predicted = model(torch.cat([source["image"], target["image"]])).logits.argmax(dim=1)  # (4, 8, 8)
    labels = predicted.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)  # (4, 32, 32)
    return {**source, "label": labels[:2]}, {**target, "label": labels[2:]}


def feature_size(model: torch.nn.Module) -> int:
    """D, the decoder feature size of ``model``."""
    with torch.no_grad():
        return model(torch.zeros(2, 3, 32, 32)).features.shape[1]


def test_the_loss_is_eq_12_and_a_class_without_anchor_adds_no_distance(data):  # noqa: F811
    model = load_model(data["folder"] / "warmup.pt")[0].eval()  # eval: the labels above stay its predictions
    anchors = torch.randn(11, feature_size(model), generator=torch.Generator().manual_seed(0))
    settings = CagSettings(distance_weight=0.3, cross_entropy_weight=0.7, probability_threshold=0.0)
    source, target = own_prediction_batches(model, torch.Generator().manual_seed(1))
    step = CagStep(model, frozen_copy(model), anchors, make_optimizer(model, TRAINING.optimizer), settings)
    terms = {name: float(value.detach()) for name, value in step(source, target, 0).items()}
    expected = terms["source_ce"] + 0.3 * (terms["source_distance"] + terms["target_distance"]) \
        + 0.7 * (terms["target_ce"] + terms["probability_ce"])
    assert terms["loss"] == pytest.approx(expected, rel=1e-5)
    assert min(terms["source_distance"], terms["target_distance"], terms["probability_ce"]) > 0  # P_0 = 0: all
    anchors[:] = torch.nan  # no class has an anchor: no (image, class) pair counts
    step = CagStep(model, frozen_copy(model), anchors, make_optimizer(model, TRAINING.optimizer), settings)
    terms = step(source, target, 1)
    assert float(terms["source_distance"].detach()) == 0.0 and float(terms["target_distance"].detach()) == 0.0


def test_probability_labels_come_from_the_frozen_start_model(data):  # noqa: F811
    """Eq. 11 on the labeller's predictions (here: class 5 everywhere), not on the network being trained."""
    model = load_model(data["folder"] / "warmup.pt")[0].train()
    captured = []
    model.register_forward_hook(lambda module, inputs, output: captured.append(output.logits.detach()))
    settings = CagSettings(probability_threshold=0.95)
    source, target = batches(torch.Generator().manual_seed(2))
    anchors = torch.zeros(11, feature_size(model))
    step = CagStep(model, ConfidentLabeller(5, 11), anchors, make_optimizer(model, TRAINING.optimizer), settings)
    probability_ce = float(step(source, target, 0)["probability_ce"].detach())
    target_logits = captured[-1][2:]  # (2, K, h, w): the target half of the step's one forward pass
    labels = torch.full((2, *target_logits.shape[-2:]), 5, dtype=torch.long)
    assert probability_ce == pytest.approx(masked_mean(*weighted_cross_entropy_pixels(target_logits, labels)).item(),
                                           rel=1e-5)


def test_the_frozen_copy_keeps_the_start_weights(data):  # noqa: F811
    model = load_model(data["folder"] / "warmup.pt")[0].train()
    labeller = frozen_copy(model)
    start = {name: value.clone() for name, value in labeller.state_dict().items()}
    anchors = torch.zeros(11, feature_size(model))
    step = CagStep(model, labeller, anchors, make_optimizer(model, TRAINING.optimizer), CagSettings())
    step(*batches(torch.Generator().manual_seed(3)), 0)
    assert not labeller.training and not any(parameter.requires_grad for parameter in labeller.parameters())
    assert all(torch.equal(value, labeller.state_dict()[name]) for name, value in start.items())
    assert not all(torch.equal(value, model.state_dict()[name]) for name, value in start.items())
