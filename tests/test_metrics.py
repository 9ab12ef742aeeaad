"""Metric code against a plain, loop-based confusion matrix and hand-computed IoU."""

from __future__ import annotations

import numpy as np
import torch

from bismap.evaluation.metrics import confusion_matrix, intersection_over_union, markdown_table, summarize


def plain_confusion(prediction: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for truth, predicted in zip(target.ravel(), prediction.ravel()):
        if truth != 255:
            matrix[truth, predicted] += 1
    return matrix


def test_confusion_matches_plain_computation_exactly():
    generator = np.random.default_rng(0)
    target = generator.integers(0, 5, size=(3, 17, 23))
    target[generator.random(target.shape) < 0.1] = 255
    prediction = generator.integers(0, 5, size=target.shape)
    fast = confusion_matrix(torch.from_numpy(prediction), torch.from_numpy(target), 5).numpy()
    np.testing.assert_array_equal(fast, plain_confusion(prediction, target, 5))
    assert fast.sum() == int((target != 255).sum())


def test_iou_and_miou_hand_computed():
    # truth rows, prediction columns
    confusion = np.array([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
    iou = intersection_over_union(confusion)
    assert iou[0] == 3 / (3 + 1 + 2)
    assert iou[1] == 4 / (4 + 2 + 1)
    assert np.isnan(iou[2])  # absent from truth and prediction: not counted
    summary = summarize(confusion, ["a", "b", "c"])
    assert abs(summary["miou"] - 100 * (0.5 + 4 / 7) / 2) < 1e-12
    assert abs(summary["pixel_accuracy"] - 70.0) < 1e-12
    assert summary["per_class_iou"]["c"] is None


def test_class_predicted_but_absent_from_truth_counts_as_zero():
    confusion = np.array([[5, 5], [0, 0]])
    summary = summarize(confusion, ["a", "b"])
    assert summary["per_class_iou"]["b"] == 0.0
    assert summary["miou"] == 25.0


def test_evaluated_subset_restricts_the_mean():
    confusion = np.diag([10, 0, 10]) + np.array([[0, 0, 0], [0, 0, 0], [10, 0, 0]])
    summary = summarize(confusion, ["a", "b", "c"], evaluated_classes=[0])
    assert summary["miou"] == 50.0
    assert summary["evaluated_classes"] == [0]


def test_markdown_table_has_one_row_per_model_with_rounded_values():
    metrics = {"miou": 41.26, "per_class_iou": {"a": 50.0, "b": None}}
    text = markdown_table({"warmup": metrics}, ["a", "b"])
    assert text.splitlines()[2] == "| warmup | 50.0 | - | 41.3 |"


def test_synthia_mious_16_and_13_come_from_the_same_confusion_matrix():
    from bismap.data.real_datasets import SYNTHIA_13_CLASSES, SYNTHIA_16_CLASSES

    confusion = np.diag(np.arange(1, 20) * 10).astype(np.int64)  # (19, 19): every class perfect, IoU 100 ...
    confusion[3, 4] = confusion[3, 3]  # ... except wall: half its pixels called fence: wall 50, fence 10/(10+40)=...
    names = [str(index) for index in range(19)]
    metrics = summarize(confusion, names, list(SYNTHIA_16_CLASSES), {"mIoU-13": list(SYNTHIA_13_CLASSES)})
    iou = intersection_over_union(confusion) * 100
    assert metrics["miou"] == np.mean(iou[list(SYNTHIA_16_CLASSES)]) and metrics["miou"] < 100
    assert metrics["subset_miou"] == {"mIoU-13": 100.0}  # wall and fence are not among the 13
    table = markdown_table({"model": metrics}, [names[index] for index in SYNTHIA_16_CLASSES])
    assert table.splitlines()[0].endswith("| mIoU | mIoU-13 |") and table.splitlines()[2].endswith("| 100.0 |")
