"""The training augmentation on plain tensors and the decoded-sample cache (bismap.data.augment, .loading)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from bismap.data.augment import AugmentSettings, TrainAugmentation, train_augmentation
from bismap.data.index import index_dataset
from bismap.data.loading import IMAGENET_MEAN, IMAGENET_STD, DecodedCache, Manifest, SegmentationDataset
from bismap.data.samples import IGNORE_INDEX, open_image, read_train_id_label
from bismap.stm.weights import encode_weight_png, read_weight_map

HEIGHT, WIDTH = 20, 24
PLAIN = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # pixels = uint8 / 255
NO_JITTER = (0.0, 0.0, 0.0, 0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, dict[str, Path]]:
    """Six 20x24 scenes: varied colours in [40, 190], labels 0..4 with some 255, random 16-bit weights."""
    root = tmp_path_factory.mktemp("augment")
    for folder in ("images", "labels", "weights"):
        (root / folder).mkdir()
    generator = np.random.default_rng(3)
    weight_paths = {}
    for index in range(6):
        name = f"scene_{index}"
        label = generator.integers(0, 5, (HEIGHT, WIDTH)).astype(np.uint8)
        label[:2, :3] = IGNORE_INDEX
        Image.fromarray(generator.integers(40, 191, (HEIGHT, WIDTH, 3)).astype(np.uint8)).save(
            root / "images" / f"{name}.png")
        Image.fromarray(label).save(root / "labels" / f"{name}.png")
        weight_paths[name] = root / "weights" / f"{name}.png"
        Image.fromarray(encode_weight_png(generator.random((HEIGHT, WIDTH)))).save(weight_paths[name])
    index_dataset("digit_scenes", root, "", 5, True, root / "manifest.json")
    return Manifest.load(root / "manifest.json"), weight_paths


def decoded(manifest: Manifest, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    sample = manifest.samples[index]
    image = torch.from_numpy(open_image(sample.image)).permute(2, 0, 1)  # (3, H, W) uint8
    return image, torch.from_numpy(read_train_id_label(sample.label, manifest.num_classes))  # (H, W) uint8


# --- the former pipeline, verbatim: a v2.Compose over tv_tensors (the reference the new one must equal) ---

class _RandomScale(torch.nn.Module):
    def __init__(self, scale_range: tuple[float, float]) -> None:
        super().__init__()
        self.scale_range = scale_range

    def forward(self, image: tv_tensors.Image, *masks: tv_tensors.Mask) -> tuple[torch.Tensor, ...]:
        low, high = self.scale_range
        scale = low + (high - low) * torch.rand(()).item()
        size = [max(1, round(image.shape[-2] * scale)), max(1, round(image.shape[-1] * scale))]
        return F.resize(image, size, antialias=True), *(F.resize(mask, size) for mask in masks)


def former_augmentation(settings: AugmentSettings) -> v2.Transform:
    height, width = settings.crop_size
    steps: list[v2.Transform] = [
        _RandomScale(settings.scale_range),
        v2.RandomCrop((height, width), pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
    ]
    if settings.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    if any(settings.color_jitter):
        steps.append(v2.ColorJitter(*settings.color_jitter))
    return v2.Compose(steps)


def former_item(manifest: Manifest, weight_paths: dict[str, Path], transform: v2.Transform, index: int,
                seed: int) -> dict[str, torch.Tensor]:
    """What SegmentationDataset.__getitem__((index, seed)) returned before the change."""
    image, label = decoded(manifest, index)
    weight = read_weight_map(weight_paths[manifest.samples[index].name])
    masks = [tv_tensors.Mask(label), tv_tensors.Mask(torch.from_numpy(weight))]
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        image, *masks = transform(tv_tensors.Image(image), *masks)
    pixels = F.normalize(F.to_dtype(image, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))
    label = masks[0].as_subclass(torch.Tensor).long()
    weight = torch.where(label == IGNORE_INDEX, 0.0, masks[1].as_subclass(torch.Tensor))
    return {"image": pixels.as_subclass(torch.Tensor), "label": label, "weight": weight}


@pytest.mark.parametrize("settings", [
    AugmentSettings((32, 32), (0.75, 1.25), False, (0.3, 0.3, 0.3, 0.0)),  # the default benchmark's
    AugmentSettings((16, 30), (0.5, 1.5), True, (0.4, 0.4, 0.4, 0.1)),  # crop one side, pad the other; hue
    AugmentSettings((20, 24), (1.0, 1.0), True, NO_JITTER),  # scale 1 and a full-image crop: skipped
    AugmentSettings((12, 40), (0.3, 2.0), True, (0.0, 1.5, 0.0, 0.5)),  # some jitter entries zero
])
def test_items_equal_the_former_v2_pipeline_bit_for_bit(data, settings):
    manifest, weight_paths = data
    dataset = SegmentationDataset(manifest, train_augmentation(settings), weight_paths=weight_paths)
    transform = former_augmentation(settings)
    for seed in range(40):
        new, former = dataset[(seed % 6, 1000 + seed)], former_item(manifest, weight_paths, transform, seed % 6,
                                                                       1000 + seed)
        assert new["image"].shape == (3, *settings.crop_size)
        for key in ("image", "label", "weight"):
            assert torch.equal(new[key], former[key]), (key, seed)


def test_without_scale_and_jitter_an_item_is_the_normalised_decoded_image(data):
    manifest, _ = data
    settings = AugmentSettings((HEIGHT, WIDTH), (1.0, 1.0), False, NO_JITTER)
    plain = SegmentationDataset(manifest, train_augmentation(settings), **PLAIN)[(2, 5)]
    image, label = decoded(manifest, 2)
    assert torch.equal(torch.round(plain["image"] * 255).to(torch.uint8), image)
    assert (plain["image"] - image / 255).abs().max() < 1e-6
    assert torch.equal(plain["label"], label.long())
    normalised = SegmentationDataset(manifest, train_augmentation(settings))[(2, 5)]["image"]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(normalised, (image / 255 - mean) / std, atol=1e-6)


def test_brightness_jitter_scales_every_pixel_by_one_factor_in_range(data):
    manifest, _ = data
    settings = AugmentSettings((HEIGHT, WIDTH), (1.0, 1.0), False, (0.3, 0.0, 0.0, 0.0))
    dataset = SegmentationDataset(manifest, train_augmentation(settings), **PLAIN)
    image = decoded(manifest, 0)[0].double()  # values in [40, 190]: 190 * 1.3 < 255, nothing clips
    factors = []
    for seed in range(30):
        output = torch.round(dataset[(0, seed)]["image"].double() * 255)
        # uint8 arithmetic truncates, output = floor(value * factor): each pixel bounds the factor to
        # [output / value, (output + 1) / value); one factor for all pixels means the bounds intersect
        low, high = float((output / image).max()), float(((output + 1) / image).min())
        assert low < high + 1e-6
        assert 0.7 - 1e-6 <= low and high <= 1.3 + 1 / 40 + 1e-6
        factors.append(low)
    assert min(factors) < 0.8 and max(factors) > 1.2  # uniform in [0.7, 1.3]: 30 draws reach both ends


def test_padding_fills_label_with_ignore_and_weight_with_zero(data):
    manifest, weight_paths = data
    settings = AugmentSettings((28, 30), (1.0, 1.0), False, NO_JITTER)
    dataset = SegmentationDataset(manifest, train_augmentation(settings), weight_paths=weight_paths, **PLAIN)
    image, label = decoded(manifest, 1)
    tops = set()
    for seed in range(60):
        item = dataset[(1, seed)]
        inside = torch.zeros(28, 30, dtype=torch.bool)
        rows, columns = torch.nonzero(item["image"].sum(0) > 0, as_tuple=True)  # every decoded pixel is >= 40
        top, left = int(rows.min()), int(columns.min())
        inside[top:top + HEIGHT, left:left + WIDTH] = True
        assert int(inside.sum()) == HEIGHT * WIDTH and 0 <= top <= 8 and 0 <= left <= 6
        assert torch.equal(item["label"][inside].view(HEIGHT, WIDTH), label.long())
        assert torch.all(item["label"][~inside] == IGNORE_INDEX) and torch.all(item["weight"][~inside] == 0.0)
        assert torch.all(item["image"][:, ~inside] == 0.0)
        assert torch.equal(torch.round(item["image"][:, inside] * 255).to(torch.uint8).view(3, HEIGHT, WIDTH), image)
        tops.add(top)
    assert tops == set(range(9))  # the image lands at every offset in [0, 28 - 20]


def test_drawn_scale_factors_cover_the_range():
    augmentation = TrainAugmentation(AugmentSettings((32, 32), (0.75, 1.25), False, NO_JITTER))
    factors = np.array([augmentation.draw((1000, 1000), torch.Generator().manual_seed(seed)).size[0] / 1000
                        for seed in range(2000)])
    assert 0.75 - 1e-3 <= factors.min() < 0.76 and 1.24 < factors.max() <= 1.25 + 1e-3
    assert abs(factors.mean() - 1.0) < 0.02  # uniform: mean 1.0, standard error ~0.003
    assert abs((factors < 1.0).mean() - 0.5) < 0.05


def test_cached_items_equal_uncached_ones(data):
    manifest, weight_paths = data
    settings = AugmentSettings((16, 30), (0.5, 1.5), True, (0.4, 0.4, 0.4, 0.1))
    cached = SegmentationDataset(manifest, train_augmentation(settings), weight_paths=weight_paths)
    uncached = SegmentationDataset(manifest, train_augmentation(settings), weight_paths=weight_paths,
                                   cache_limit_bytes=0)
    for repeat in range(2):  # the second pass reads only from the cache: nothing wrote into it
        for index in range(6):
            first, second = cached[(index, 10 + index)], uncached[(index, 10 + index)]
            assert all(torch.equal(first[key], second[key]) for key in ("image", "label", "weight"))
    assert sorted(cached.cache.entries) == list(range(6)) and cached.cache.enabled
    assert uncached.cache.entries == {} and uncached.cache.enabled is False
    assert cached.cache.bytes == 6 * HEIGHT * WIDTH * (3 + 1 + 4)  # uint8 image and label, float32 weights


def test_cache_in_dataloader_workers_gives_the_same_batches(data):
    manifest, weight_paths = data
    settings = AugmentSettings((16, 16), (0.5, 1.5), True, (0.4, 0.4, 0.4, 0.1))
    items = [[(index % 6, 100 + index) for index in range(start, start + 4)] for start in range(0, 24, 4)]

    def batches(cache_limit_bytes: int, workers: int) -> list[dict[str, torch.Tensor]]:
        dataset = SegmentationDataset(manifest, train_augmentation(settings), weight_paths=weight_paths,
                                      cache_limit_bytes=cache_limit_bytes)
        return list(DataLoader(dataset, batch_sampler=items, num_workers=workers))

    reference = batches(0, 0)
    for batch, expected in zip(batches(2**20, 2), reference, strict=True):
        assert all(torch.equal(batch[key], expected[key]) for key in ("image", "label", "weight", "index"))


def test_cache_stays_off_for_a_large_dataset_and_pickles_empty():
    cityscapes_like = DecodedCache(512 * 2**20, 2975)
    image = np.zeros((1024, 2048, 3), np.uint8)
    sample = type("Sample", (), {"nbytes": image.nbytes + 1024 * 2048})()  # image + label: 8 MiB
    cityscapes_like.add(0, sample)
    assert cityscapes_like.enabled is False and cityscapes_like.entries == {}
    small = DecodedCache(100, 10)
    small.add(0, type("Sample", (), {"nbytes": 10})())
    small.add(1, type("Sample", (), {"nbytes": 95})())  # over the limit once held: not kept
    assert small.enabled and sorted(small.entries) == [0] and small.bytes == 10
    copy = pickle.loads(pickle.dumps(small))
    assert copy.entries == {} and copy.bytes == 0 and copy.enabled


def test_an_item_without_seed_draws_from_the_global_generator_without_advancing_it(data):
    manifest, _ = data
    dataset = SegmentationDataset(manifest, train_augmentation(AugmentSettings((16, 16))))
    torch.manual_seed(3)
    state = torch.random.get_rng_state()
    first = dataset[1]
    assert torch.equal(torch.random.get_rng_state(), state)
    second, other = dataset[1], dataset[(1, 4)]
    assert torch.equal(first["image"], second["image"]) and not torch.equal(first["image"], other["image"])
