"""Tests of the STM numerical core (BiSMAP Sec. 3.4, Eq. 8-9)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bismap.stm.weights import (IGNORE_WEIGHT, ClassEntropyAccumulator, MeanDistanceAccumulator, decode_weight_png,
                                encode_weight_png, min_max_normalize, pixel_entropy, transferability_weights)


def _softmax(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(shape, generator=generator, dtype=torch.float64), dim=1)


def test_eq9_hand_computed_2x3() -> None:
    distances = np.array([[0.0, 2.0, 4.0], [2.0, 0.0, 1.0]])  # (2, 3)
    labels = np.array([[0, 1, 0], [2, 255, 0]], dtype=np.uint8)  # (2, 3)
    entropy = np.array([0.0, 0.25, 1.0])  # e' (C,)
    # d_mean = 2: exp(-D^2/4 * ln 2) = 2^(-D^2/4): D=0 -> 1, D=2 -> 1/2, D=4 -> 1/16, D=1 -> 2^-0.25
    expected = np.array([[min(1 + 0.0, 1), 0.5 + 0.25, 1 / 16 + 0.0],
                         [min(0.5 + 1.0, 1), IGNORE_WEIGHT, 2 ** -0.25 + 0.0]])
    weights = transferability_weights(distances, labels, 2.0, entropy)
    assert weights.dtype == np.float32 and weights.shape == (2, 3)
    np.testing.assert_allclose(weights, [[1.0, 0.75, 0.0625], [1.0, 0.0, 0.8408964153]], rtol=1e-6)
    np.testing.assert_allclose(weights, expected, rtol=1e-6)


def test_eq9_ignore_pixels_keep_defined_weight_whatever_distance() -> None:
    distances = np.array([[0.0, 100.0, 3.0]])
    labels = np.full((1, 3), 255, dtype=np.uint8)
    weights = transferability_weights(distances, labels, 1.5, np.array([1.0, 1.0]))
    assert (weights == IGNORE_WEIGHT).all() and IGNORE_WEIGHT == 0.0


def test_eq9_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        transferability_weights(np.zeros((1, 2)), np.array([[0, 3]]), 1.0, np.zeros(3))
    with pytest.raises(ValueError):
        transferability_weights(np.zeros((1, 2)), np.array([[0, 1]]), 0.0, np.zeros(3))


def test_d_mean_and_weights_independent_of_pixel_and_file_order() -> None:
    rng = np.random.default_rng(0)
    files = [rng.gamma(2.0, 3.0, size=(7, 11)).astype(np.float32) for _ in range(5)]
    forward = MeanDistanceAccumulator()
    for distances in files:
        forward.add(distances)
    shuffled = MeanDistanceAccumulator()
    for index in rng.permutation(len(files)):
        shuffled.add(rng.permutation(files[index].ravel()))
    sharded_a, sharded_b = MeanDistanceAccumulator(), MeanDistanceAccumulator()
    for index, distances in enumerate(files):
        (sharded_a if index % 2 else sharded_b).add(torch.from_numpy(distances))
    sharded_b.merge(sharded_a)
    assert forward.count == shuffled.count == sharded_b.count == 5 * 77
    assert forward.mean() == shuffled.mean() == sharded_b.mean()
    assert math.isclose(forward.mean(), float(np.concatenate([f.ravel() for f in files]).astype(np.float64).mean()),
                        rel_tol=1e-14)
    labels = rng.integers(0, 3, size=(7, 11))
    entropy = np.array([0.0, 0.3, 1.0])
    permutation = rng.permutation(77)
    weights = transferability_weights(files[0], labels, forward.mean(), entropy).ravel()
    permuted = transferability_weights(files[0].ravel()[permutation].reshape(7, 11),
                                       labels.ravel()[permutation].reshape(7, 11), shuffled.mean(), entropy).ravel()
    np.testing.assert_array_equal(weights[permutation], permuted)


def test_d_mean_exact_small_numbers_and_errors() -> None:
    accumulator = MeanDistanceAccumulator()
    accumulator.add(np.array([1.0, 2.0, 0.0]))
    accumulator.add(np.array([[0.5]]))
    assert accumulator.mean() == 3.5 / 4
    with pytest.raises(ValueError):
        MeanDistanceAccumulator().mean()
    with pytest.raises(ValueError):
        accumulator.add(np.array([-1.0]))


def test_pixel_entropy_values() -> None:
    probabilities = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 2)  # (1, 3, 1, 2)
    np.testing.assert_allclose(pixel_entropy(probabilities).numpy(), [[[math.log(2), 0.0]]])


def test_min_max_normalization_numbers() -> None:
    np.testing.assert_allclose(min_max_normalize(np.array([2.0, 1.0, np.nan, 3.0])), [0.5, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(min_max_normalize(np.array([0.4, 0.4, np.nan])), [0.0, 0.0, 1.0])
    np.testing.assert_allclose(min_max_normalize(np.array([np.nan, np.nan])), [1.0, 1.0])


def test_entropy_accumulator_equals_direct_computation() -> None:
    probabilities = _softmax((3, 4, 5, 6), seed=1)  # (B, C, H, W)
    accumulator = ClassEntropyAccumulator(4)
    accumulator.add(probabilities[:1])
    accumulator.add(probabilities[1:].numpy())
    array = probabilities.numpy().transpose(0, 2, 3, 1).reshape(-1, 4)  # (P, C)
    entropy = -(array * np.log(array)).sum(axis=1)  # (P,)
    predicted = array.argmax(axis=1)
    direct = np.array([entropy[predicted == c].mean() if (predicted == c).any() else np.nan for c in range(4)])
    np.testing.assert_allclose(accumulator.mean_entropy(), direct, rtol=1e-12)
    np.testing.assert_allclose(accumulator.normalized(), min_max_normalize(direct), rtol=1e-12)
    assert accumulator.normalized().min() == 0.0 and accumulator.normalized().max() == 1.0


def test_entropy_accumulator_unseen_class_and_pseudo_labels() -> None:
    probabilities = torch.zeros(1, 3, 1, 3, dtype=torch.float64)
    probabilities[0, :, 0, 0] = torch.tensor([0.5, 0.5, 0.0])  # entropy ln 2, argmax 0
    probabilities[0, :, 0, 1] = torch.tensor([0.0, 1.0, 0.0])  # entropy 0, argmax 1
    probabilities[0, :, 0, 2] = torch.tensor([0.9, 0.1, 0.0])
    accumulator = ClassEntropyAccumulator(3)
    accumulator.add(probabilities)
    h_09 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    np.testing.assert_allclose(accumulator.mean_entropy()[:2], [(math.log(2) + h_09) / 2, 0.0])
    np.testing.assert_array_equal(accumulator.normalized(), [1.0, 0.0, 1.0])  # class 2 never predicted -> 1.0
    labelled = ClassEntropyAccumulator(3)
    labelled.add(probabilities, pseudo_labels=torch.tensor([[[255, 2, 0]]]))
    np.testing.assert_array_equal(labelled.pixel_count, [1, 0, 1])
    np.testing.assert_allclose(labelled.mean_entropy(), [h_09, np.nan, 0.0])
    np.testing.assert_array_equal(labelled.normalized(), [1.0, 1.0, 0.0])


def test_weight_png_round_trip(tmp_path: Path) -> None:
    weights = np.concatenate([[0.0, 1.0, 0.5, 1 / 16], np.random.default_rng(2).random(60)]).astype(np.float32)
    weights = weights.reshape(8, 8)
    encoded = encode_weight_png(weights)
    assert encoded.dtype == np.uint16 and encoded.ravel()[:3].tolist() == [0, 65535, 32768]
    path = tmp_path / "weights.png"
    Image.fromarray(encoded).save(path, format="PNG")
    loaded = np.asarray(Image.open(path))
    np.testing.assert_array_equal(loaded.astype(np.uint16), encoded)
    decoded = decode_weight_png(loaded.astype(np.uint16))
    assert decoded.dtype == np.float32 and decoded.ravel()[0] == 0.0 and decoded.ravel()[1] == 1.0
    assert np.abs(decoded - weights).max() <= 0.5 / 65535 + 1e-7
    np.testing.assert_array_equal(encode_weight_png(decoded), encoded)
    with pytest.raises(ValueError):
        encode_weight_png(np.array([1.5]))
