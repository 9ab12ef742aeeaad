"""Pseudo-label strategies (MAPs, category anchors, confidence) and sharded labelling."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from bismap.data.digit_scenes import DigitScenesSettings, generate_split
from bismap.data.index import index_dataset
from bismap.data.loading import Manifest, SegmentationDataset
from bismap.labels.features import downsample_label, write_features
from bismap.labels.gmm import ClassPrototypes, GaussianMixture, GMMSettings, fit_class_gmm, merge_class_gmms
from bismap.labels.strategies import (PseudoLabelSettings, assign_cas, assign_confidence, assign_confidence_balanced,
                                      assign_maps, label_images, label_map, merge_label_statistics, resolve_thresholds,
                                      upsample_labels)
from bismap.models import ModelSettings, build_model
from bismap.settings import from_dict
from bismap.training.checkpoint import save_checkpoint


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def isotropic(mean: list[float], variance: float) -> GaussianMixture:
    return GaussianMixture(torch.ones(1, dtype=torch.float64), torch.tensor([mean], dtype=torch.float64), "diag",
                           variances=torch.full((1, 2), variance, dtype=torch.float64))


def log_normal(point: list[float], mean: list[float], variance: float) -> float:
    squared = sum((p - m) ** 2 for p, m in zip(point, mean))
    return -0.5 * (squared / variance + 2 * math.log(2 * math.pi * variance))


def toy_prototypes() -> ClassPrototypes:
    """Class 0 at (0, 0), class 1 absent, class 2 at (10, 0); anchors at the same places."""
    centroids = torch.tensor([[0.0, 0.0], [float("nan")] * 2, [10.0, 0.0]], dtype=torch.float64)
    calibration = (torch.arange(101, dtype=torch.float64), None, -torch.arange(101, dtype=torch.float64))
    return ClassPrototypes(("a", "b", "c"), (isotropic([0, 0], 1.0), None, isotropic([10, 0], 4.0)),
                           centroids=centroids, calibration=calibration)


def test_maps_assigns_argmax_and_ignores_below_delta():
    points = [[0.0, 0.0], [10.0, 1.0], [5.0, 0.0], [0.0, 9.0]]
    labels, scores = assign_maps(torch.tensor(points, dtype=torch.float64), toy_prototypes(),
                                 torch.full((3,), -12.0, dtype=torch.float64), torch.float64)
    expected = [max(log_normal(p, [0, 0], 1.0), log_normal(p, [10, 0], 4.0)) for p in points]
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-12)
    # (5, 0): as close to both means, but class 2's wider Gaussian is denser there (-6.35 vs -14.34)
    assert labels.tolist() == [0, 2, 2, 255]  # (0, 9): max log-density -25.85 (class 2) < delta = -12


def test_classifier_agreement_keeps_only_the_maps_labels_the_classifier_shares():
    """The first three pixels get MAPs labels 0, 2, 2 (as above); the classifier says 0, 0, 2: the middle one goes."""
    features = torch.tensor([[0.0, 10.0, 5.0], [0.0, 1.0, 0.0]], dtype=torch.float64)[:, None]  # (D=2, h=1, w=3)
    logits = torch.tensor([[3.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 4.0]])[:, None]  # (K=3, 1, 3): argmax 0, 0, 2
    thresholds = torch.full((3,), -12.0, dtype=torch.float64)
    settings = [PseudoLabelSettings(classifier_agreement=agree, score_dtype="float64") for agree in (False, True)]
    plain, agreeing = (label_map(logits, features, each, toy_prototypes(), thresholds) for each in settings)
    assert plain.tolist() == [[0, 2, 2]] and agreeing.tolist() == [[0, 255, 2]]
    with pytest.raises(ValueError, match="classifier_agreement needs strategy maps"):
        PseudoLabelSettings(strategy="confidence", classifier_agreement=True)


def test_absent_class_is_never_assigned():
    points = torch.from_numpy(np.random.default_rng(0).normal(0, 20, (5000, 2)))
    labels, _ = assign_maps(points, toy_prototypes(), torch.full((3,), -torch.inf, dtype=torch.float64))
    assert set(labels.tolist()) == {0, 2}
    labels, _ = assign_cas(points, toy_prototypes().centroids, margin=0.0)
    assert set(labels.tolist()) <= {0, 2, 255} and (labels == 0).any() and (labels == 2).any()


def test_percentile_thresholds_come_from_each_class_calibration():
    settings = from_dict(PseudoLabelSettings, {"threshold_mode": "percentile", "percentile": 20}, "pseudo_labels")
    thresholds = resolve_thresholds(settings, toy_prototypes())
    assert thresholds.tolist() == [20.0, math.inf, -80.0]
    labels, _ = assign_maps(torch.tensor([[0.0, 0.0], [10.0, 0.0]]), toy_prototypes(), thresholds)
    assert labels.tolist() == [255, 2]  # class 0: -1.84 < 20; class 2: -3.22 >= -80


def test_cas_margin_marks_ambiguous_pixels():
    centroids = torch.tensor([[0.0, 0.0], [4.0, 0.0], [float("nan")] * 2])
    points = torch.tensor([[2.0, 0.0], [0.5, 0.0], [3.2, 0.0], [2.4, 0.0], [1.5, 0.0]])
    labels, gaps = assign_cas(points, centroids, margin=1.0)
    np.testing.assert_allclose(gaps.numpy(), [0.0, 3.0, 2.4, 0.8, 1.0], atol=1e-5)
    assert labels.tolist() == [255, 0, 1, 255, 255]  # active only when the gap exceeds 1.0 strictly


def test_confidence_keeps_pixels_above_the_threshold():
    logits = torch.tensor([[3.0, 0.0], [0.2, 0.0], [0.0, 5.0]])
    labels, confidence = assign_confidence(logits, threshold=0.9)
    np.testing.assert_allclose(confidence.numpy(), [1 / (1 + math.exp(-3)), 1 / (1 + math.exp(-0.2)),
                                                    1 / (1 + math.exp(-5))], rtol=1e-6)
    assert labels.tolist() == [0, 255, 1]


def test_confidence_balanced_keeps_the_fraction_of_each_class():
    rng = np.random.default_rng(0)
    predicted = np.repeat([0, 1, 2], [10, 7, 1])  # pixels predicted per class
    margins = rng.uniform(0, 3, len(predicted))
    logits = torch.zeros(len(predicted), 3)
    logits[torch.arange(len(predicted)), torch.from_numpy(predicted)] = torch.from_numpy(margins).float()
    labels, confidence = assign_confidence_balanced(logits, fraction=0.3)
    kept_counts = [int((labels == c).sum()) for c in range(3)]
    assert kept_counts == [3, 3, 1]  # ceil(0.3 * 10), ceil(0.3 * 7), ceil(0.3 * 1)
    for class_id in range(3):
        members = predicted == class_id
        threshold = np.sort(margins[members])[::-1][kept_counts[class_id] - 1]
        assert np.array_equal(labels.numpy()[members] == class_id, margins[members] >= threshold)
    assert int((labels == 255).sum()) == len(predicted) - 7


def test_upsampling_is_nearest_per_cell():
    labels = torch.tensor([[1, 255], [3, 4]])
    assert torch.equal(upsample_labels(labels, (8, 8)),
                       torch.tensor([[1, 255], [3, 4]], dtype=torch.uint8).repeat_interleave(4, 0)
                       .repeat_interleave(4, 1))


MODEL = ModelSettings(backbone_depth=18, backbone_width=8, output_stride=8, aspp_rates=(2,),
                      aspp_channels=16, low_level_channels=8, feature_dim=16)
CLASSES = [str(digit) for digit in range(10)] + ["background"]


@torch.no_grad()
def ground_truth_grouped_features(model: torch.nn.Module, manifest: Path) -> list[torch.Tensor]:
    """Features grouped by true label (a random model classifies too few pixels correctly for Eq. 3)."""
    dataset = SegmentationDataset(Manifest.load(manifest))
    groups: list[list[torch.Tensor]] = [[] for _ in CLASSES]
    for item in dataset:
        output = model(item["image"][None])
        labels = downsample_label(item["label"][None], tuple(output.features.shape[-2:])).flatten()
        rows = output.features[0].flatten(1).T  # (h*w, D)
        for class_id in range(len(CLASSES)):
            groups[class_id].append(rows[labels == class_id])
    return [torch.cat(group) for group in groups]


@pytest.fixture(scope="module")
def labelling_inputs(tmp_path_factory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("labelling")
    scenes = DigitScenesSettings(image_size=32, digit_size=(12, 16), digits_per_image=(1, 2))
    generate_split(folder / "target", "target_train", count=7, seed=4, settings=scenes)
    index_dataset("digit_scenes", folder / "target", "", len(CLASSES), True, folder / "target.json")
    torch.manual_seed(0)
    model = build_model(MODEL, len(CLASSES)).eval()
    save_checkpoint(folder / "model.pt", model, MODEL, CLASSES, 0, {})
    rows = ground_truth_grouped_features(model, folder / "target.json")
    write_features(folder / "features.h5", rows, CLASSES, [len(r) for r in rows])
    settings = GMMSettings(components=2, min_features=8, calibration_samples=1000)
    mixtures = [fit_class_gmm(folder / "features.h5", c, settings) for c in range(len(CLASSES))]
    merge_class_gmms(mixtures, folder / "features.h5", settings).save(folder / "prototypes.h5")
    return folder / "model.pt", folder / "target.json", folder / "prototypes.h5"


@pytest.mark.parametrize("strategy", [{"strategy": "maps", "threshold_mode": "percentile", "percentile": 20},
                                      {"strategy": "cas", "margin": 0.5},
                                      {"strategy": "confidence_balanced", "fraction": 0.5}])
def test_sharded_and_unsharded_labels_are_byte_identical(tmp_path, labelling_inputs, strategy):
    checkpoint, manifest, prototypes = labelling_inputs
    settings = from_dict(PseudoLabelSettings, strategy, "pseudo_labels")
    cpu = torch.device("cpu")
    whole = label_images(checkpoint, manifest, prototypes, tmp_path / "one", 0, 1, settings, cpu)
    shards = [label_images(checkpoint, manifest, prototypes, tmp_path / "three", index, 3, settings, cpu,
                           statistics_path=tmp_path / f"shard_{index}.json") for index in range(3)]
    names = sorted(path.name for path in (tmp_path / "one").glob("*.png"))
    assert len(names) == 7 and names == sorted(path.name for path in (tmp_path / "three").glob("*.png"))
    assert all((tmp_path / "one" / name).read_bytes() == (tmp_path / "three" / name).read_bytes() for name in names)
    assert [shard["images"] for shard in shards] == [3, 2, 2]
    merged = merge_label_statistics([tmp_path / f"shard_{index}.json" for index in range(3)])
    for key in ("labelled_per_class", "correct_per_class", "total_pixels", "pl_ratio", "precision"):
        assert merged[key] == pytest.approx(whole[key])
    labels = np.stack([np.asarray(Image.open(tmp_path / "one" / name)) for name in names])  # (7, 32, 32)
    assert labels.shape == (7, 32, 32) and labels.dtype == np.uint8
    assert whole["total_pixels"] == labels.size
    assert whole["labelled_per_class"] == np.bincount(labels[labels != 255], minlength=11).tolist()
    assert 0.05 < whole["pl_ratio"] < 0.99 and set(np.unique(labels)) <= set(range(11)) | {255}
    assert np.array_equal(labels, labels[:, ::4, ::4].repeat(4, 1).repeat(4, 2))  # constant per 4x4 cell


def test_image_resolution_labels_follow_the_bilinear_logits_between_cells():
    """Two feature cells (class 0 | class 1, logit margins +-8) over 8 image pixels: nearest labels give 4 | 4;
    bilinear logits fall to a margin of 2 (softmax 0.88 < 0.95) on the two pixels next to the cell border."""
    from bismap.labels.strategies import image_labels

    logits = torch.tensor([[[4.0, -4.0]], [[-4.0, 4.0]]])  # (K=2, h=1, w=2)
    features = torch.zeros(1, 1, 2)  # (D=1, h, w): unused by the confidence strategy
    settings = {"strategy": "confidence", "confidence": 0.95}
    feature = image_labels(logits, features, (1, 8), PseudoLabelSettings(**settings), None, None)
    image = image_labels(logits, features, (1, 8), PseudoLabelSettings(**settings, resolution="image"), None, None)
    assert feature[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert image[0].tolist() == [0, 0, 0, 255, 255, 1, 1, 1]
    with pytest.raises(ValueError, match="resolution"):
        PseudoLabelSettings(resolution="pixel")


class _LeftPixel(torch.nn.Module):
    """Logits (1, 2, H/2, W/2): class 0 scores channel 0's top-left pixel of each 2 x 2 cell, class 1 its negative
    (not mirror-symmetric, so a mirrored view differs)."""

    def forward(self, image: torch.Tensor) -> SimpleNamespace:
        cells = image[:, :1, ::2, ::2]  # (1, 1, H/2, W/2)
        return SimpleNamespace(logits=torch.cat([cells, -cells], dim=1), features=cells)


def _class_0_probability(cell: float) -> float:
    return 1 / (1 + math.exp(-2 * cell))  # softmax of (cell, -cell)


def test_scale_and_mirror_average_is_the_mean_softmax_of_every_view():
    """The distillation teacher's labels average the softmax over resized views (the public BiSMAP inference.py:
    0.75, 1, 1.5) and mirrors; checked against each view worked out by hand on a ramp image."""
    from bismap.labels.strategies import averaged_logits

    model = _LeftPixel()
    image = torch.tensor([0.0, 1.0, 2.0, 7.0]).view(1, 1, 1, 4).repeat(1, 3, 2, 1)  # (1, 3, 2, 4)
    logits = model(image).logits  # (1, 2, 1, 2): cells 0 | 2
    assert averaged_logits(model, image, logits, flip_average=False) is logits
    flipped = averaged_logits(model, image, logits, flip_average=True)[0, 0, 0].exp()  # mirror's cells 7 | 1, back 1 | 7
    assert flipped.tolist() == pytest.approx([(_class_0_probability(0) + _class_0_probability(1)) / 2,
                                              (_class_0_probability(2) + _class_0_probability(7)) / 2], rel=1e-6)
    # scale 2: the (4, 8) bilinear image's top-left pixels (4 per row, 2 rows), brought back to (1, 2) by
    # bilinear halving (align_corners=False): each output cell the mean of a 2 x 2 block of them
    doubled = F.interpolate(image, scale_factor=2.0, mode="bilinear", align_corners=False)[0, 0, ::2, ::2]  # (2, 4)
    halved = [doubled[:, 0:2].mean().item(), doubled[:, 2:4].mean().item()]
    scaled = averaged_logits(model, image, logits, flip_average=False, scales=(1.0, 2.0))[0, 0, 0].exp()
    assert scaled.tolist() == pytest.approx([(_class_0_probability(0) + _class_0_probability(halved[0])) / 2,
                                             (_class_0_probability(2) + _class_0_probability(halved[1])) / 2],
                                            rel=1e-6)
    with pytest.raises(ValueError, match="scales"):
        PseudoLabelSettings(strategy="maps", scales=(1.0, 1.5))
    with pytest.raises(ValueError, match="scales"):
        PseudoLabelSettings(strategy="confidence", scales=(0.0,))
