"""The qualitative figure of the report: image, ground truth and each model's prediction, per row."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from bismap.data.loading import IMAGENET_MEAN, IMAGENET_STD, Manifest, SegmentationDataset
from bismap.data.real_datasets import CITYSCAPES_LABEL_TABLE
from bismap.data.samples import IGNORE_INDEX
from bismap.io import atomic_path
from bismap.training.checkpoint import load_model

logger = logging.getLogger(__name__)

IGNORE_COLOUR = (0, 0, 0)


def palette(class_names: Sequence[str]) -> np.ndarray:
    """(256, 3) uint8 colours: Cityscapes' own for its 19 classes, else evenly spaced hues; 255 is black."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    by_name = {label.name: label.color for label in CITYSCAPES_LABEL_TABLE if 0 <= label.trainId < 255}
    if all(name in by_name for name in class_names):
        colours[: len(class_names)] = [by_name[name] for name in class_names]
    else:
        import matplotlib

        hues = matplotlib.colormaps["tab20"](np.linspace(0, 1, 20))[:, :3]
        colours[: len(class_names)] = [np.round(255 * hues[index % 20]) for index in range(len(class_names))]
    colours[IGNORE_INDEX] = IGNORE_COLOUR
    return colours


def _image_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised -> (H, W, 3) uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (255 * (image * std + mean).clamp(0, 1)).round().byte().permute(1, 2, 0).numpy()


@torch.no_grad()
def predict(model: torch.nn.Module, image: torch.Tensor) -> np.ndarray:
    """(3, H, W) image -> (H, W) uint8 prediction at full resolution."""
    logits = model(image[None]).logits  # (1, K, H/4, W/4)
    logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return logits.argmax(dim=1)[0].byte().cpu().numpy()


def qualitative_figure(checkpoints: dict[str, str | Path], manifest_path: str | Path, output_path: str | Path,
                       images: int, device: torch.device) -> list[list[np.ndarray]]:
    """Write a PNG grid: one row per image (``images`` of them, evenly spaced over the manifest), columns
    image | truth | one prediction per model in ``checkpoints`` order, titled. Returns the cells per row."""
    manifest = Manifest.load(manifest_path)
    dataset = SegmentationDataset(manifest, labelled=True)
    chosen = np.linspace(0, len(dataset) - 1, num=min(images, len(dataset))).round().astype(int)
    models = {name: load_model(path, device) for name, path in checkpoints.items()}
    colours = palette(next(iter(models.values()))[1]["class_names"])
    rows = []
    for index in chosen:
        item = dataset[int(index)]
        cells = [_image_uint8(item["image"]), colours[item["label"].numpy()]]
        for model, _ in models.values():
            model.eval()
            cells.append(colours[predict(model, item["image"].to(device))])
        rows.append(cells)
    _plot_grid(rows, ["image", "truth", *checkpoints], output_path)
    logger.info("qualitative figure %s: %d images x (image, truth, %s)", output_path, len(chosen),
                ", ".join(checkpoints))
    return rows


def _plot_grid(rows: list[list[np.ndarray]], titles: list[str], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height, width = rows[0][0].shape[:2]
    scale = 1.6 / max(height, width) * max(64, min(height, width))  # inches per cell, readable titles
    figure, axes = plt.subplots(len(rows), len(titles), squeeze=False,
                                figsize=(scale * len(titles) * width / height, scale * len(rows) + 0.4))
    for row_index, cells in enumerate(rows):
        for column, cell in enumerate(cells):
            axis = axes[row_index][column]
            axis.imshow(cell, interpolation="nearest")
            axis.set_axis_off()
            if row_index == 0:
                axis.set_title(titles[column].replace("selftrain_", "selftrain\n"), fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
