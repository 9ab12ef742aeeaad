"""CAG-UDA stage 1 in the adaptation loop (bismap.training.cag): Eq. 12 from its terms, the anchors' role."""

from __future__ import annotations

import pytest
import torch

from bismap.methods.cag import CagSettings
from bismap.training.cag import CagStep
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


def test_the_loss_is_eq_12_and_a_class_without_anchor_adds_no_distance(data):  # noqa: F811
    model = load_model(data["folder"] / "warmup.pt")[0].train()
    features = model(torch.zeros(2, 3, 32, 32)).features.shape[1]  # D
    anchors = torch.randn(11, features, generator=torch.Generator().manual_seed(0))
    settings = CagSettings(distance_weight=0.3, cross_entropy_weight=0.7, probability_threshold=0.0)
    source, target = batches(torch.Generator().manual_seed(1))
    step = CagStep(model, anchors, make_optimizer(model, TRAINING.optimizer), settings)
    terms = {name: float(value.detach()) for name, value in step(source, target, 0).items()}
    expected = terms["source_ce"] + 0.3 * (terms["source_distance"] + terms["target_distance"]) \
        + 0.7 * (terms["target_ce"] + terms["probability_ce"])
    assert terms["loss"] == pytest.approx(expected, rel=1e-5)
    assert terms["target_distance"] > 0 and terms["probability_ce"] > 0  # P_0 = 0 labels every pixel
    anchors[3] = torch.nan  # class 3 loses its anchor: the target's only labelled class
    step = CagStep(model, anchors, make_optimizer(model, TRAINING.optimizer), settings)
    assert float(step(source, target, 1)["target_distance"].detach()) == 0.0
