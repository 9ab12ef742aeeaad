"""CPSL in the adaptation loop (bismap.training.cpsl) on tiny generated data: Eq. 14, Eq. 7/10, the bank, resume."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn import functional as F

from bismap.data.loading import Manifest, SegmentationDataset
from bismap.methods.cpsl import CpslSettings, cluster_probabilities, image_class_distribution
from bismap.methods.proda import rectify_pseudo_labels
from bismap.training.checkpoint import load_model
from bismap.training.cpsl import (CpslInputs, CpslStep, CpslTrainSettings, SelfLabelingHead, SelfLabelingState,
                                  cpsl_train, initial_head_and_distribution)
from bismap.training.ema import make_teacher
from bismap.training.optim import make_optimizer
from bismap.training.supervised import RunPaths
from tests.test_proda_training import data  # noqa: F401 (the module fixture: tiny scenes and a warmup)
from tests.conftest import dies_on_call
from tests.test_selftrain import TRAINING

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cpsl_inputs(data: dict) -> CpslInputs:  # noqa: F811
    folder = data["folder"]
    return CpslInputs(folder / "warmup.pt", folder / "source.json", folder / "target_train.json")


def train(data: dict, folder, settings: CpslTrainSettings) -> tuple[dict, list[dict[str, float]]]:  # noqa: F811
    paths = RunPaths(folder / "model.pt", folder / "loss.tsv", folder / "state.pt")
    cpsl_train(cpsl_inputs(data), paths, settings, torch.device("cpu"), run_settings={})
    header, *rows = [line.split("\t") for line in paths.loss_log.read_text().splitlines()]
    return load_model(paths.checkpoint)[0].state_dict(), [dict(zip(header, map(float, row))) for row in rows]


def test_head_and_class_distribution_start_from_the_warmups_own_labels(data):  # noqa: F811
    """Eq. 10: each class's share of the argmax pixels; Eq. 7: the mean unit feature of each class, by hand,
    scaled to unit length as the public code initialises its prototypes (train.py:48-51)."""
    model = load_model(data["folder"] / "warmup.pt")[0].eval()
    weights, distribution = initial_head_and_distribution(model, data["folder"] / "target_train.json", 11,
                                                          torch.device("cpu"))
    dataset = SegmentationDataset(Manifest.load(data["folder"] / "target_train.json"), labelled=False)
    with torch.no_grad():
        outputs = [model(dataset[index]["image"][None]) for index in range(len(dataset))]
    labels = torch.cat([output.logits.argmax(dim=1).flatten() for output in outputs])  # (n,)
    features = torch.cat([F.normalize(output.features, dim=1)[0].flatten(1).T for output in outputs])  # (n, D)
    counts = torch.bincount(labels, minlength=11).double()
    assert torch.allclose(distribution, counts / counts.sum(), atol=1e-12)
    assert float(distribution.sum()) == pytest.approx(1.0, abs=1e-12)
    for class_id in range(11):
        expected = features[labels == class_id].mean(dim=0) if counts[class_id] else torch.zeros(features.shape[1])
        assert torch.allclose(weights[class_id], F.normalize(expected, dim=0), atol=1e-5)
        assert float(weights[class_id].norm()) == pytest.approx(1.0 if counts[class_id] else 0.0, abs=1e-5)


def test_the_memory_bank_keeps_the_newest_rows_in_order():
    state = SelfLabelingState(torch.ones(3), memory_length=4, feature_dim=2)
    assert state.features() is None
    state.push(torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
    assert state.features()[:, 0].tolist() == [1.0, 2.0, 3.0]
    state.push(torch.tensor([[4.0, 4.0], [5.0, 5.0]]))
    assert state.features()[:, 0].tolist() == [2.0, 3.0, 4.0, 5.0] and int(state.filled) == 4
    state.push(torch.arange(12.0).view(6, 2))  # more rows than the bank holds: the newest 4
    assert state.features()[:, 0].tolist() == [4.0, 6.0, 8.0, 10.0]


def test_the_loss_is_eq_14_and_every_term_is_logged(data, tmp_path):  # noqa: F811
    settings = CpslTrainSettings(training=dataclasses.replace(TRAINING, iterations=2),
                                 cpsl=CpslSettings(self_labeling_weight=0.3, consistency_weight=2.0))
    _, rows = train(data, tmp_path, settings)
    assert len(rows) == 2
    for row in rows:
        expected = row["source_ce"] + row["target_ce"] + 0.3 * row["self_labeling"] + 2.0 * row["consistency"]
        assert row["loss"] == pytest.approx(expected, rel=1e-4)
        assert row["self_labeling"] > 0 and row["consistency"] >= 0
    assert not (tmp_path / "state.pt").exists()


def test_one_step_moves_the_class_distribution_by_eq_11_and_fills_the_bank(data):  # noqa: F811
    """With alpha = 0.5 and two images, delta = 0.25 delta_0 + 0.25 delta_1 + 0.5 delta_2 (Eq. 11 image by image)."""
    model = load_model(data["folder"] / "warmup.pt")[0]
    warmup, momentum = make_teacher(model), make_teacher(model)
    weights, distribution = initial_head_and_distribution(warmup, data["folder"] / "target_train.json", 11,
                                                          torch.device("cpu"))
    head = SelfLabelingHead(weights)
    settings = CpslTrainSettings(training=TRAINING, cpsl=CpslSettings(distribution_momentum=0.5, memory_length=1000))
    state = SelfLabelingState(distribution, 1000, weights.shape[1])
    step = CpslStep(model.train(), head, momentum, make_teacher(head), warmup, state,
                    make_optimizer(model, TRAINING.optimizer), settings)
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        labels, _ = rectify_pseudo_labels(warmup(images).logits.softmax(dim=1),
                                          cluster_probabilities(momentum(images).features, head.weights, 0.08))
        logits = F.normalize(momentum(images).logits, dim=1)  # (2, K, 8, 8), before the momentum update
    image_distributions = image_class_distribution(labels, 11)  # (2, K)
    source = {"image": torch.randn(2, 3, 32, 32, generator=generator), "label": torch.zeros(2, 32, 32).long()}
    terms = step(source, {"image": images}, 0)
    expected = 0.25 * distribution + 0.25 * image_distributions[0] + 0.5 * image_distributions[1]
    assert torch.allclose(state.class_distribution, expected, atol=1e-12)
    assert int(state.filled) == labels.numel()  # 2 x 8 x 8 pixels, fewer than M = 512 per image: all sampled
    # the second bank holds the momentum network's unit-length logits of the same pixels (public queue_out)
    assert torch.allclose(state.outputs(), torch.cat([image.flatten(1).T for image in logits]), atol=1e-6)
    assert _leaves(terms["self_labeling"]) == {id(head.weights)}  # L_SL trains the head only


def _leaves(tensor: torch.Tensor) -> set[int]:
    """ids of the parameters a loss term's graph reaches (the graph's AccumulateGrad nodes)."""
    found, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if hasattr(node, "variable"):
            found.add(id(node.variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def test_resume_after_interruption_matches_uninterrupted_run(data, tmp_path, monkeypatch):  # noqa: F811
    """The head, momentum copies, bank and delta_pseudo come back with the state: bit-identical weights."""
    settings = CpslTrainSettings(training=TRAINING, cpsl=CpslSettings(memory_length=200))
    reference, _ = train(data, tmp_path / "reference", settings)
    original = CpslStep.__call__
    monkeypatch.setattr(CpslStep, "__call__", dies_on_call(original, 4))  # killed after the state of iteration 2
    with pytest.raises(KeyboardInterrupt):
        train(data, tmp_path / "resumed", settings)
    monkeypatch.setattr(CpslStep, "__call__", original)
    resumed, rows = train(data, tmp_path / "resumed", settings)
    assert all(torch.equal(reference[key], resumed[key]) for key in reference)
    assert [row["iteration"] for row in rows] == [1, 2, 3, 4]


def test_more_than_one_process_is_refused(data, tmp_path):  # noqa: F811
    paths = RunPaths(tmp_path / "model.pt", tmp_path / "loss.tsv", tmp_path / "state.pt")
    with pytest.raises(ValueError, match="one process"):
        cpsl_train(cpsl_inputs(data), paths, CpslTrainSettings(training=TRAINING), torch.device("cpu"), {}, 2)
    assert not paths.checkpoint.exists()
