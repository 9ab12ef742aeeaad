"""Predict a folder of images with a trained model (rule predict, console command ``bismap-predict``).

For each image ``<name>.<png|jpg|jpeg>`` it writes, under the output folder:

* ``train_ids/<name>.png``: uint8 class ids (the evaluation's argmax, pixel for pixel);
* ``label_ids/<name>.png``: Cityscapes labelIds, the format of its benchmark server, when the model predicts
  the 19 Cityscapes classes;
* ``overlays/<name>.png``: the prediction's colours blended over the image.

Sizes: by default the whole image is predicted at its own size, as the evaluation
does (the network is fully convolutional, so any size works; memory grows with
it). ``resize: [W, H]`` predicts at that size instead (e.g. the training crop's
scale) and upsamples the logits bilinearly to the image. ``flip_average``
averages the softmax of the image and of its mirror (ProDA's test-time flip).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from bismap.data.real_datasets import CITYSCAPES_CLASS_NAMES, CITYSCAPES_LABEL_TABLE
from bismap.data.samples import IGNORE_INDEX, open_image
from bismap.evaluation.qualitative import palette
from bismap.export import ModelInfo, load_exported
from bismap.labels.strategies import averaged_logits
from bismap.io import write_png
from bismap.progress import tqdm

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class PredictSettings:
    flip_average: bool = False
    resize: tuple[int, int] | None = None  # (width, height) to predict at; None: each image's own size
    overlay_alpha: float = 0.5  # weight of the prediction's colours in the overlay


def image_logits(model: torch.nn.Module, pixels: torch.Tensor, settings: PredictSettings) -> torch.Tensor:
    """(1, 3, H, W) normalised image -> (1, K, H, W) logits (log-probabilities with flip_average)."""
    size = tuple(pixels.shape[-2:])
    inputs = pixels if settings.resize is None else F.interpolate(
        pixels, size=(settings.resize[1], settings.resize[0]), mode="bilinear", align_corners=False)
    logits = averaged_logits(model, inputs, model(inputs).logits, settings.flip_average)  # (1, K, h, w)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)  # as the evaluation


def normalized(image: np.ndarray, info: ModelInfo, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32, the loaders' operations in their order."""
    pixels = torch.from_numpy(image).permute(2, 0, 1).to(torch.float32).mul_(1.0 / 255)
    mean = torch.tensor(info.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32).view(-1, 1, 1)
    return pixels.sub_(mean).div_(std)[None].to(device)


def cityscapes_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Train ids (255 = ignore) -> Cityscapes labelIds (ignore -> 0, 'unlabeled')."""
    lookup = np.zeros(256, dtype=np.uint8)
    for label in CITYSCAPES_LABEL_TABLE:
        if 0 <= label.trainId < IGNORE_INDEX and label.id >= 0:
            lookup[label.trainId] = label.id
    return lookup[train_ids]


def overlay(image: np.ndarray, train_ids: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
    return np.round((1 - alpha) * image + alpha * colours[train_ids]).astype(np.uint8)  # (H, W, 3)


@torch.no_grad()
def predict_folder(model_path: str | Path, input_dir: str | Path, output_dir: str | Path, settings: PredictSettings,
                   device: torch.device | str = "cpu") -> dict[str, Any]:
    """Predict every image of ``input_dir`` (sorted) into ``output_dir``; returns what was written."""
    model, info = load_exported(model_path, device)
    images = sorted(path for path in Path(input_dir).iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} image in {input_dir}")
    cityscapes = tuple(info.class_names) == tuple(CITYSCAPES_CLASS_NAMES)
    colours = palette(list(info.class_names))
    output = Path(output_dir)
    for path in tqdm(images, desc="predict", unit="img"):
        image = open_image(path)  # (H, W, 3) uint8
        logits = image_logits(model, normalized(image, info, torch.device(device)), settings)
        train_ids = logits.argmax(dim=1)[0].byte().cpu().numpy()  # (H, W)
        write_png(output / "train_ids" / f"{path.stem}.png", train_ids)
        if cityscapes:
            write_png(output / "label_ids" / f"{path.stem}.png", cityscapes_label_ids(train_ids))
        write_png(output / "overlays" / f"{path.stem}.png", overlay(image, train_ids, colours, settings.overlay_alpha))
    logger.info("predicted %d image(s) of %s into %s", len(images), input_dir, output_dir)
    return {"images": len(images), "label_ids": cityscapes, "class_names": list(info.class_names)}


def main(argv: Sequence[str] | None = None) -> None:
    """bismap-predict MODEL INPUT_DIR OUTPUT_DIR: train-id, Cityscapes labelId and overlay PNGs of each image."""
    parser = argparse.ArgumentParser(prog="bismap-predict", description=main.__doc__)
    parser.add_argument("model", help="an exported model (bismap-export) or a workflow checkpoint")
    parser.add_argument("input_dir"), parser.add_argument("output_dir")
    parser.add_argument("--flip-average", action="store_true", help="average with the mirrored image")
    parser.add_argument("--resize", nargs=2, type=int, metavar=("WIDTH", "HEIGHT"), help="predict at this size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = PredictSettings(arguments.flip_average, tuple(arguments.resize) if arguments.resize else None)
    predict_folder(arguments.model, arguments.input_dir, arguments.output_dir, settings, arguments.device)


if __name__ == "__main__":
    main()
