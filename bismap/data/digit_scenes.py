"""The embedded "digit scenes" benchmark: segmentation across a domain shift.

Every scene is a small image holding a few real handwritten digits (from
scikit-learn's ``load_digits``) and a per-pixel label: the digit class on stroke
pixels, a background class elsewhere, and ``IGNORE_INDEX`` on the anti-aliased
border, where the class is genuinely ambiguous.

* Source domain: digits blended onto grey photo textures (scikit-image).
* Target domain: MNIST-M style, ``|colour photo crop - digit|`` per channel.

All pictures ship inside the installed packages, so generation runs offline, and
it is deterministic: each image's random stream is derived from
``(split seed, image index)`` alone.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from bismap.progress import tqdm

from bismap.io import atomic_directory, write_json
from bismap.settings import SettingsError, from_dict, to_dict

logger = logging.getLogger(__name__)

CLASS_NAMES = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "background")
NUM_CLASSES = 11
BACKGROUND_CLASS = 10
IGNORE_INDEX = 255
SPLITS = ("source", "target_train", "target_val")

# Fixed, independent of any split seed, so the pools never move and the three
# splits can never share a digit image whatever their settings.
DIGIT_POOL_SEED = 0
DIGIT_POOL_FRACTIONS = {"source": 0.5, "target_train": 0.25, "target_val": 0.25}
DIGIT_INTENSITY_MAX = 16.0  # load_digits stores intensities as 0..16
# Many load_digits strokes touch the 8x8 frame; a zero margin makes them fade
# out when upscaled instead of ending in a straight cut at the digit's box.
DIGIT_MARGIN = 1
PLACEMENT_ATTEMPTS = 20  # positions tried for a digit that must not overlap the placed ones

# Grey textures for the source domain and colour photos for the target domain.
# Only pictures stored inside the scikit-image wheel are listed: others in
# skimage.data (brain, eagle, lily, ...) need a pooch download.
SOURCE_TEXTURES = ("camera", "grass", "gravel", "brick", "moon", "coins")
TARGET_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle")
# Changing these must not alter the target splits, so their summaries omit them.
SOURCE_ONLY_SETTINGS = ("source_contrast",)


@dataclass(frozen=True)
class SplitSettings:
    count: int
    seed: int


@dataclass(frozen=True)
class DigitScenesSettings:
    image_size: int = 64
    digits_per_image: tuple[int, int] = (2, 5)
    digit_size: tuple[int, int] = (16, 24)
    stroke_threshold: float = 0.5
    background_threshold: float = 0.15
    source_contrast: tuple[float, float] = (0.3, 1.0)
    # Digits painted over each other form shapes no class describes (a 5 over a 2
    # reads as neither); with overlap off a digit whose box meets a placed one is
    # redrawn (PLACEMENT_ATTEMPTS times, then dropped), so every label is legible.
    overlap: bool = True


@dataclass(frozen=True)
class _Resources:
    """Everything loaded once per call and shared by all images of a split."""

    digit_images: np.ndarray  # (N, 10, 10) float32 in [0, 1], zero margin included
    digit_classes: np.ndarray  # (N,) int
    pool: np.ndarray  # indices into digit_images usable by this split
    backgrounds: tuple[np.ndarray, ...]  # grey (H, W) in [0, 1] or colour (H, W, 3) in 0..255


def parse_settings(data: dict[str, Any] | None, section: str = "digit_scenes") -> DigitScenesSettings:
    """Strictly convert a config dict; unknown keys or bad values raise ``SettingsError``."""
    settings = from_dict(DigitScenesSettings, data, section)
    _validate(settings, section)
    return settings


def parse_split_settings(data: dict[str, Any] | None, section: str) -> SplitSettings:
    split_settings = from_dict(SplitSettings, data, section)
    if split_settings.count < 0 or split_settings.seed < 0:
        raise SettingsError(f"{section}: count and seed must be >= 0, got {split_settings}")
    return split_settings


def _validate(settings: DigitScenesSettings, section: str) -> None:
    for name in ("digits_per_image", "digit_size", "source_contrast"):
        value = getattr(settings, name)
        if len(value) != 2 or value[0] > value[1]:
            raise SettingsError(f"{section}.{name}: expected [low, high] with low <= high, got {value!r}")
    if settings.digits_per_image[0] < 1:
        raise SettingsError(f"{section}.digits_per_image: need at least one digit per image")
    if settings.digit_size[0] < 1 or settings.digit_size[1] > settings.image_size:
        raise SettingsError(f"{section}.digit_size: {settings.digit_size} must fit in image_size {settings.image_size}")
    if not 0.0 < settings.background_threshold <= settings.stroke_threshold <= 1.0:
        raise SettingsError(f"{section}: need 0 < background_threshold <= stroke_threshold <= 1")
    if not (0.0 <= settings.source_contrast[0] and settings.source_contrast[1] <= 1.0):
        raise SettingsError(f"{section}.source_contrast: must lie in [0, 1]")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown digit scenes split {split!r}; expected one of {list(SPLITS)}")


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / DIGIT_INTENSITY_MAX).astype(np.float32)
    images = np.pad(images, ((0, 0), (DIGIT_MARGIN, DIGIT_MARGIN), (DIGIT_MARGIN, DIGIT_MARGIN)))
    images.setflags(write=False)  # shared by the cache: guard against edits
    return images, digits.target.astype(np.int64)


def digit_pool(split: str) -> np.ndarray:
    """Sorted indices into ``load_digits()`` that ``split`` may draw digits from."""
    _check_split(split)
    total = len(_load_digits()[1])
    order = np.random.default_rng(DIGIT_POOL_SEED).permutation(total)
    start = 0.0
    for name in SPLITS:
        end = start + DIGIT_POOL_FRACTIONS[name]
        if name == split:
            # The last split takes the rounding remainder so the pools cover every digit.
            stop = total if name == SPLITS[-1] else int(end * total)
            return np.sort(order[int(start * total) : stop])
        start = end
    raise AssertionError("unreachable")


@functools.cache
def _source_textures() -> tuple[np.ndarray, ...]:
    import skimage.data

    textures = []
    for name in SOURCE_TEXTURES:
        texture = getattr(skimage.data, name)().astype(np.float32) / 255.0
        texture.setflags(write=False)  # shared by the cache: guard against edits
        textures.append(texture)
    return tuple(textures)


@functools.cache
def _target_photos() -> tuple[np.ndarray, ...]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    pictures = []
    for name in TARGET_PHOTOS:
        picture = getattr(skimage.data, name)()
        # stereo_motorcycle returns (left, right, disparity): keep the left photo.
        pictures.append(picture[0] if isinstance(picture, tuple) else picture)
    pictures.extend(load_sample_images().images)  # china.jpg, flower.jpg
    photos = tuple(picture[..., :3].astype(np.float32) for picture in pictures)
    for photo in photos:
        photo.setflags(write=False)
    return photos


@functools.cache
def _bilinear_matrix(output_size: int, input_size: int = 8 + 2 * DIGIT_MARGIN) -> np.ndarray:
    """(output, input) weights of half-pixel-centred bilinear resampling, as in PIL.

    Applying it on both sides (M @ digit @ M.T) upscales a digit in two small
    matrix products, far cheaper than a generic resize call per digit.
    """
    source = (np.arange(output_size) + 0.5) * input_size / output_size - 0.5
    source = np.clip(source, 0, input_size - 1)
    lower = np.floor(source).astype(int)
    upper = np.minimum(lower + 1, input_size - 1)
    weight = (source - lower).astype(np.float32)
    matrix = np.zeros((output_size, input_size), dtype=np.float32)
    rows = np.arange(output_size)
    np.add.at(matrix, (rows, lower), 1.0 - weight)
    np.add.at(matrix, (rows, upper), weight)
    return matrix


def _compose_digits(
    rng: np.random.Generator, resources: _Resources, settings: DigitScenesSettings
) -> tuple[np.ndarray, np.ndarray]:
    """Place random digits; return the combined alpha and the label map."""
    size = settings.image_size
    alpha = np.zeros((size, size), dtype=np.float32)
    stroke_class = np.full((size, size), IGNORE_INDEX, dtype=np.uint8)
    boxes: list[tuple[int, int, int]] = []  # (top, left, size) of the digits placed so far
    low, high = settings.digits_per_image
    for _ in range(int(rng.integers(low, high + 1))):
        index = int(rng.choice(resources.pool))
        digit_size = int(rng.integers(settings.digit_size[0], settings.digit_size[1] + 1))
        position = _place(rng, size, digit_size, None if settings.overlap else boxes)
        if position is None:
            continue
        top, left = position
        boxes.append((top, left, digit_size))
        matrix = _bilinear_matrix(digit_size)
        digit = np.clip(matrix @ resources.digit_images[index] @ matrix.T, 0.0, 1.0)
        window = (slice(top, top + digit_size), slice(left, left + digit_size))
        alpha[window] = np.maximum(alpha[window], digit)
        # Later digits paint over earlier ones wherever they have stroke.
        stroke_class[window][digit >= settings.stroke_threshold] = resources.digit_classes[index]
    return alpha, _label_from(alpha, stroke_class, settings)


def _place(rng: np.random.Generator, image_size: int, digit_size: int,
           avoid: list[tuple[int, int, int]] | None) -> tuple[int, int] | None:
    """(top, left) of a digit box; with ``avoid``, one that meets none of those boxes, or None."""
    for _ in range(1 if avoid is None else PLACEMENT_ATTEMPTS):
        top, left = (int(value) for value in rng.integers(0, image_size - digit_size + 1, size=2))
        if avoid is None or not any(_boxes_meet(top, left, digit_size, box) for box in avoid):
            return top, left
    return None


def _boxes_meet(top: int, left: int, size: int, box: tuple[int, int, int]) -> bool:
    other_top, other_left, other_size = box
    return top < other_top + other_size and other_top < top + size and left < other_left + other_size \
        and other_left < left + size


def _label_from(alpha: np.ndarray, stroke_class: np.ndarray, settings: DigitScenesSettings) -> np.ndarray:
    """Classes follow the combined alpha; the blurry band in between is ignored."""
    label = np.full(alpha.shape, IGNORE_INDEX, dtype=np.uint8)
    label[alpha < settings.background_threshold] = BACKGROUND_CLASS
    stroke = alpha >= settings.stroke_threshold
    # A pixel with combined alpha over the threshold has at least one digit with
    # stroke there, so stroke_class is always set where it is read.
    label[stroke] = stroke_class[stroke]
    return label


def _random_crop(rng: np.random.Generator, picture: np.ndarray, size: int) -> np.ndarray:
    top = int(rng.integers(0, picture.shape[0] - size + 1))
    left = int(rng.integers(0, picture.shape[1] - size + 1))
    return picture[top : top + size, left : left + size]


def _paint_source(
    rng: np.random.Generator, alpha: np.ndarray, resources: _Resources, settings: DigitScenesSettings
) -> np.ndarray:
    """Blend the digits as ink over a grey texture of random contrast and polarity."""
    texture = resources.backgrounds[int(rng.integers(len(resources.backgrounds)))]
    crop = _random_crop(rng, texture, settings.image_size)
    contrast = float(rng.uniform(*settings.source_contrast))
    bright_ink = bool(rng.integers(2))
    # Squeeze the texture to the half of the range away from the ink, so low
    # contrast means an easy scene and full contrast a hard one.
    background = crop * contrast if bright_ink else 1.0 - contrast + crop * contrast
    ink = 1.0 if bright_ink else 0.0
    grey = (1.0 - alpha) * background + alpha * ink
    grey = np.rint(np.clip(grey, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _paint_target(
    rng: np.random.Generator, alpha: np.ndarray, resources: _Resources, settings: DigitScenesSettings
) -> np.ndarray:
    """MNIST-M: the absolute difference between a colour photo crop and the digit."""
    photo = resources.backgrounds[int(rng.integers(len(resources.backgrounds)))]
    crop = _random_crop(rng, photo, settings.image_size)
    colour = np.abs(crop - alpha[:, :, None] * 255.0)
    return np.rint(np.clip(colour, 0.0, 255.0)).astype(np.uint8)


def _render_scene(
    split: str, seed: int, index: int, resources: _Resources, settings: DigitScenesSettings
) -> tuple[np.ndarray, np.ndarray]:
    """One (RGB image, label) pair, depending only on (seed, index) and settings."""
    rng = np.random.default_rng([seed, index])
    alpha, label = _compose_digits(rng, resources, settings)
    paint = _paint_source if split == "source" else _paint_target
    return paint(rng, alpha, resources, settings), label


def _load_resources(split: str) -> _Resources:
    digit_images, digit_classes = _load_digits()
    backgrounds = _source_textures() if split == "source" else _target_photos()
    return _Resources(digit_images, digit_classes, digit_pool(split), backgrounds)


def _relevant_settings(split: str, settings: DigitScenesSettings) -> dict[str, Any]:
    """Settings recorded in the summary; target splits omit source-only keys."""
    plain = to_dict(settings)
    if split != "source":
        for name in SOURCE_ONLY_SETTINGS:
            plain.pop(name)
    return plain


def generate_split(
    output_dir: str | Path, split: str, count: int, seed: int, settings: DigitScenesSettings
) -> dict[str, Any]:
    """Write ``count`` scenes of ``split`` to ``output_dir`` atomically; return the summary.

    Layout: ``images/<split>_<index>.png`` (RGB), ``labels/<split>_<index>.png``
    (L: classes 0..10 and 255 = ignore) and ``summary.json``.
    """
    _check_split(split)
    _validate(settings, "digit_scenes")
    if count < 0 or seed < 0:
        raise ValueError(f"count and seed must be >= 0, got count={count}, seed={seed}")
    resources = _load_resources(split)
    with atomic_directory(output_dir) as folder:
        class_counts = _write_scenes(folder, split, count, seed, resources, settings)
        summary = {
            "split": split,
            "images": count,
            "seed": seed,
            "class_names": list(CLASS_NAMES),
            "pixels_per_class": [int(value) for value in class_counts[:NUM_CLASSES]],
            "ignore_pixels": int(class_counts[IGNORE_INDEX]),
            "digit_pool_size": len(resources.pool),
            "settings": _relevant_settings(split, settings),
        }
        write_json(folder / "summary.json", summary)
    logger.info("wrote %d %s digit scenes to %s", count, split, output_dir)
    return summary


def _write_scenes(
    folder: Path, split: str, count: int, seed: int, resources: _Resources, settings: DigitScenesSettings
) -> np.ndarray:
    """Render and save every scene; return label pixel counts per value (0..255)."""
    (folder / "images").mkdir()
    (folder / "labels").mkdir()
    class_counts = np.zeros(256, dtype=np.int64)
    for index in tqdm(range(count), desc=f"digit scenes {split}"):
        image, label = _render_scene(split, seed, index, resources, settings)
        name = f"{split}_{index:05d}"
        # Plain saves are enough: the whole folder is moved into place atomically.
        Image.fromarray(image).save(folder / "images" / f"{name}.png")
        Image.fromarray(label).save(folder / "labels" / f"{name}.png")
        class_counts += np.bincount(label.ravel(), minlength=256)
    return class_counts
