"""The STM stages (BiSMAP Sec. 3.4, Eqs. 7-9): target prototypes, d_mean, weight maps, their summary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bismap.data.digit_scenes import DigitScenesSettings, generate_split
from bismap.data.index import index_dataset
from bismap.data.loading import Manifest
from bismap.models import ModelSettings, build_model
from bismap.stm.clustering import PrototypeSearch
from bismap.stm.embeddings import EmbeddingNetworkSettings, Normalization, build_embedding_network
from bismap.stm.source import (TransferabilitySettings, image_distances, mean_distance, merge_transferability,
                               read_weight_map, source_distance_statistics, weight_map_paths, write_weight_maps)
from bismap.stm.target import (ClassEntropySettings, PrototypeSettings, TargetEmbeddingSettings, class_entropy,
                               extract_target_embeddings, fit_target_prototypes, load_prototypes, read_class_entropy,
                               read_target_embeddings)
from bismap.stm.weights import WEIGHT_PNG_SCALE, transferability_weights
from bismap.training.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = [str(digit) for digit in range(10)] + ["background"]
MODEL = ModelSettings(backbone_depth=18, backbone_width=8, output_stride=8, aspp_rates=(1, 2), aspp_channels=8,
                      low_level_channels=8, feature_dim=8)
IMAGENET = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SETTINGS = TransferabilitySettings(chunk_rows=100, histogram_bins=4)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def stm_inputs(tmp_path_factory) -> dict[str, Path]:
    """6 source / 4 target digit scenes of 32 px, a random 'warmup', J = 3 prototypes and the class entropy."""
    folder = tmp_path_factory.mktemp("stm")
    scenes = DigitScenesSettings(image_size=32, digit_size=(12, 16), digits_per_image=(1, 2))
    for split, count, seed in (("source", 6, 5), ("target_train", 4, 6)):
        generate_split(folder / split, split, count=count, seed=seed, settings=scenes)
        index_dataset("digit_scenes", folder / split, "", len(CLASSES), True, folder / f"{split}.json")
    torch.manual_seed(0)
    save_checkpoint(folder / "warmup.pt", build_model(MODEL, len(CLASSES)).eval(), MODEL, CLASSES, 0, {})
    network = build_embedding_network(None, folder / "warmup.pt", EmbeddingNetworkSettings(normalization=IMAGENET), CPU)
    extract_target_embeddings(network, folder / "target_train.json", folder / "target.h5",
                              TargetEmbeddingSettings(per_image=16, seed=1, batch_size=3), CPU)
    fit_target_prototypes(folder / "target.h5", folder / "prototypes.npy", PrototypeSettings(clusters=3, seed=0))
    class_entropy(folder / "warmup.pt", folder / "target_train.json", folder / "entropy.json",
                  ClassEntropySettings(batch_size=4), CPU)
    return {"folder": folder, "network": network}


def run_maps(inputs: dict, manifest: Path, shards: int, name: str) -> tuple[list[Path], list[Path]]:
    """The d_mean pass and the maps of ``manifest`` in ``shards`` shards: (map folders, statistics files)."""
    folder, network = inputs["folder"], inputs["network"]
    distances = [folder / f"{name}_distances_{shard}.json" for shard in range(shards)]
    for shard, path in enumerate(distances):
        source_distance_statistics(network, manifest, folder / "prototypes.npy", path, shard, shards, SETTINGS, CPU)
    folders = [folder / f"{name}_weights_{shard}" for shard in range(shards)]
    statistics = [folder / f"{name}_weights_{shard}.json" for shard in range(shards)]
    for shard in range(shards):
        folders[shard].mkdir()
        write_weight_maps(network, manifest, folder / "prototypes.npy", folder / "entropy.json", distances,
                          folders[shard], shard, shards, SETTINGS, CPU, CLASSES, statistics_path=statistics[shard])
    return folders, statistics


def test_target_embeddings_and_prototypes_are_seeded(stm_inputs, tmp_path):
    folder = stm_inputs["folder"]
    embeddings = read_target_embeddings(folder / "target.h5")  # (4 images x 16, 64)
    assert embeddings.shape == (64, 64) and np.isfinite(embeddings).all()
    fit_target_prototypes(folder / "target.h5", tmp_path / "again.npy", PrototypeSettings(clusters=3, seed=0))
    fit_target_prototypes(folder / "target.h5", tmp_path / "other.npy", PrototypeSettings(clusters=3, seed=1))
    assert (tmp_path / "again.npy").read_bytes() == (folder / "prototypes.npy").read_bytes()
    assert not np.array_equal(load_prototypes(tmp_path / "other.npy"), load_prototypes(folder / "prototypes.npy"))


def test_class_entropy_is_min_max_normalised(stm_inputs):
    data = json.loads((stm_inputs["folder"] / "entropy.json").read_text())
    observed = [value for value, count in zip(data["normalized_entropy"], data["pixel_count"]) if count]
    assert min(observed) == 0.0 and max(observed) == 1.0
    assert sum(data["pixel_count"]) == 4 * 32 * 32  # every target pixel has a predicted class
    assert all(value == 1.0 for value, count in zip(data["normalized_entropy"], data["pixel_count"]) if not count)


def test_shuffled_file_order_and_sharding_give_identical_maps(stm_inputs):
    folder = stm_inputs["folder"]
    manifest = json.loads((folder / "source.json").read_text())
    manifest["samples"] = [manifest["samples"][index] for index in (4, 1, 5, 0, 3, 2)]
    (folder / "shuffled.json").write_text(json.dumps(manifest))
    forward_dirs, forward_stats = run_maps(stm_inputs, folder / "source.json", 1, "forward")
    shuffled_dirs, shuffled_stats = run_maps(stm_inputs, folder / "shuffled.json", 2, "shuffled")
    forward_distances = [folder / "forward_distances_0.json"]
    shuffled_distances = [folder / f"shuffled_distances_{shard}.json" for shard in (0, 1)]
    assert mean_distance(forward_distances) == mean_distance(shuffled_distances)  # exact, bit for bit
    forward, shuffled = weight_map_paths(forward_dirs), weight_map_paths(shuffled_dirs)
    assert sorted(forward) == sorted(shuffled) == [f"source_{index:05d}" for index in range(6)]
    assert all(forward[name].read_bytes() == shuffled[name].read_bytes() for name in forward)
    summaries = [merge_transferability(stats, dirs, folder / "source.json", folder / f"{tag}.json",
                                       folder / f"{tag}.png", 2)
                 for tag, stats, dirs in (("a", forward_stats, forward_dirs), ("b", shuffled_stats, shuffled_dirs))]
    assert {**summaries[0], "weight_dirs": None} == {**summaries[1], "weight_dirs": None}
    assert Image.open(folder / "a.png").size == (3 * 192 + 2 * 4, 2 * 192 + 4)


def test_maps_follow_eq9_and_ignore_pixels_get_zero(stm_inputs):
    folder, network = stm_inputs["folder"], stm_inputs["network"]
    if not (folder / "forward_weights_0").is_dir():
        run_maps(stm_inputs, folder / "source.json", 1, "forward")
    d_mean, pixels = mean_distance([folder / "forward_distances_0.json"])
    assert pixels == 6 * 32 * 32 and d_mean > 0
    entropy = read_class_entropy(folder / "entropy.json", CLASSES)
    centroids = load_prototypes(folder / "prototypes.npy")
    manifest = Manifest.load(folder / "source.json")
    from bismap.stm.embeddings import embedding_dataset

    item = embedding_dataset(manifest, IMAGENET, labelled=True)[2]
    label = item["label"].numpy()
    weights = read_weight_map(weight_map_paths([folder / "forward_weights_0"])[manifest.samples[2].name])
    distances = image_distances(network, item["image"], PrototypeSearch(centroids), SETTINGS)  # (H, W)
    expected = transferability_weights(distances, label, d_mean, entropy)
    assert weights.dtype == np.float32 and weights.shape == (32, 32)
    np.testing.assert_allclose(weights, expected, atol=0.5 / WEIGHT_PNG_SCALE + 1e-7)
    assert (label == 255).sum() > 0 and (weights[label == 255] == 0.0).all()
    assert (weights[label != 255] > 0).all()


def test_summary_means_are_the_means_of_the_maps(stm_inputs):
    folder = stm_inputs["folder"]
    if not (folder / "a.json").is_file():
        pytest.skip("needs test_shuffled_file_order_and_sharding_give_identical_maps")
    summary = json.loads((folder / "a.json").read_text())
    manifest = Manifest.load(folder / "source.json")
    paths = weight_map_paths([folder / "forward_weights_0"])
    from bismap.data.formats import get_format

    read_label = get_format("digit_scenes").read_label
    weights = np.concatenate([read_weight_map(paths[s.name]).ravel() for s in manifest.samples]).astype(np.float64)
    labels = np.concatenate([read_label(Path(s.label), len(CLASSES)).ravel() for s in manifest.samples])
    for class_id, name in enumerate(CLASSES):
        chosen = weights[labels == class_id]
        assert summary["pixel_count_per_class"][name] == chosen.size
        if chosen.size:
            mean = summary["mean_transferability_per_class"][name]
            assert mean == pytest.approx(chosen.mean(), rel=1e-7)  # the maps decode to float32
            assert sum(summary["histogram"]["counts_per_class"][name]) == chosen.size
    assert summary["ignore_pixels"] == int((labels == 255).sum())
    assert summary["histogram"]["bin_edges"] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_weight_map_paths_name_duplicates_and_missing_maps(tmp_path):
    first, second = tmp_path / "shard_0", tmp_path / "shard_1"
    first.mkdir(), second.mkdir()
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(first / "a.png")
    Image.fromarray(np.array([[32768, 1]], dtype=np.uint16)).save(second / "b.png")
    paths = weight_map_paths([first, second])
    assert paths == {"a": first / "a.png", "b": second / "b.png"}
    np.testing.assert_array_equal(read_weight_map(paths["a"]), np.array([[0.0, 1.0]], dtype=np.float32))
    with pytest.raises(FileNotFoundError, match=r"\['c'\]"):
        weight_map_paths([first, second], expected_names=["a", "b", "c"])
    shutil.copy(first / "a.png", second / "a.png")
    with pytest.raises(ValueError, match="'a' found twice"):
        weight_map_paths([first, second])
    with pytest.raises(FileNotFoundError, match="shard_9"):
        weight_map_paths([tmp_path / "shard_9"])
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(tmp_path / "eight_bit.png")
    with pytest.raises(ValueError, match="not a 16-bit weight map"):
        read_weight_map(tmp_path / "eight_bit.png")


def test_incomplete_distance_shards_are_refused(stm_inputs, tmp_path):
    folder = stm_inputs["folder"]
    if not (folder / "shuffled_distances_0.json").is_file():
        pytest.skip("needs test_shuffled_file_order_and_sharding_give_identical_maps")
    with pytest.raises(ValueError, match="not one complete set of shards"):
        mean_distance([folder / "shuffled_distances_0.json"])


def test_embedding_resolution_upsamples_cell_distances(stm_inputs):
    from torch.nn import functional as F

    from bismap.stm.clustering import nearest_distance

    network, centroids = stm_inputs["network"], load_prototypes(stm_inputs["folder"] / "prototypes.npy")
    image = torch.rand(3, 32, 40, generator=torch.Generator().manual_seed(0))
    cells = network(image[None])[0]  # (64, 4, 5)
    grid = torch.from_numpy(nearest_distance(cells.flatten(1).T.detach().numpy(), centroids)).view(1, 1, 4, 5)
    expected = F.interpolate(grid, size=(32, 40), mode="bilinear", align_corners=False)[0, 0].numpy()
    search = PrototypeSearch(centroids)
    coarse = image_distances(network, image, search, TransferabilitySettings(distance_resolution="embedding"))
    np.testing.assert_allclose(coarse, expected, rtol=1e-6)
    fine = image_distances(network, image, search, SETTINGS)
    assert fine.shape == (32, 40) and not np.allclose(fine, coarse)  # footnote 1: not the same quantity
