"""Backward direction, target side: embeddings, K-Means prototypes and class entropy (BiSMAP Sec. 3.4).

* :func:`extract_target_embeddings`: per-pixel embeddings of \\hat{E}
  (:mod:`bismap.stm.embeddings`: layer4, bilinearly upsampled to the image) at
  ``per_image`` pixels of every target-train image, drawn without replacement
  by a generator seeded with ``(seed, image index)`` alone, so the sample does
  not depend on batch size or image order. HDF5 (written atomically):
  ``embeddings`` float32 (N, E), ``image_index`` int32 (N,), ``pixel_index``
  int64 (N,) (row-major in the image), attributes ``embedding_dim``,
  ``images``, ``network`` and ``settings`` (JSON), ``manifest``.
* :func:`fit_target_prototypes`: the J cluster centres {A_j} of FAISS K-Means
  on those embeddings (Sec. 3.4, "Target Prototypes Generation via
  Clustering"), a float32 (J, E) ``.npy`` written atomically.
* :func:`class_entropy`: e_c and e_c' of Eq. 8 -- the warmup model's mean
  prediction entropy per predicted class on target-train, logits bilinearly
  upsampled to the image first, min-max normalised (:mod:`bismap.stm.weights`), JSON.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import h5py
import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader
from bismap.progress import tqdm

from bismap.data.loading import Manifest, SegmentationDataset
from bismap.io import atomic_path, write_json
from bismap.settings import to_dict
from bismap.stm.clustering import PrototypeSearch, kmeans
from bismap.stm.embeddings import EmbeddingNetwork, embedding_dataset, pixel_embeddings
from bismap.stm.weights import ClassEntropyAccumulator
from bismap.training.checkpoint import load_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetEmbeddingSettings:
    per_image: int = 16  # pixels sampled per target image
    seed: int = 0
    batch_size: int = 1  # images of different sizes need 1
    workers: int = 0

    def __post_init__(self) -> None:
        if self.per_image < 1 or self.batch_size < 1:
            raise ValueError(f"per_image and batch_size must be >= 1, got {self.per_image}, {self.batch_size}")


@dataclass(frozen=True)
class PrototypeSettings:
    clusters: int = 40  # J (the public BiSMAP code uses 40)
    seed: int = 0
    iterations: int = 20
    use_gpu: bool = False  # stm.kmeans_gpu: the rule asks for a GPU; FAISS uses it if it is a GPU build


@dataclass(frozen=True)
class ClassEntropySettings:
    batch_size: int = 1
    workers: int = 0


def set_faiss_threads(threads: int) -> None:
    """FAISS's OpenMP threads (K-Means, Eq. 7 search) = the rule's threads: no oversubscription, and
    K-Means results are reproducible for a fixed thread count."""
    faiss.omp_set_num_threads(max(1, int(threads)))


def sample_pixels(seed: int, image_index: int, pixels: int, count: int) -> torch.Tensor:
    """min(count, pixels) distinct row-major pixel indices, ascending: (n,) int64; fixed by (seed, image index)."""
    chosen = np.random.default_rng([seed, image_index]).choice(pixels, size=min(count, pixels), replace=False)
    return torch.from_numpy(np.sort(chosen).astype(np.int64))


def write_target_embeddings(path: str | Path, embeddings: np.ndarray, image_index: np.ndarray,
                            pixel_index: np.ndarray, attributes: dict[str, Any]) -> None:
    """The HDF5 layout of the module docstring, atomically; embeddings (N, E)."""
    with atomic_path(path) as temporary, h5py.File(temporary, "w") as handle:
        handle.create_dataset("embeddings", data=np.asarray(embeddings, dtype=np.float32))
        handle.create_dataset("image_index", data=np.asarray(image_index, dtype=np.int32))
        handle.create_dataset("pixel_index", data=np.asarray(pixel_index, dtype=np.int64))
        handle.attrs.update(attributes)
        handle.attrs["embedding_dim"] = int(embeddings.shape[1])


def read_target_embeddings(path: str | Path) -> np.ndarray:
    """The (N, E) float32 embeddings of a target embeddings file; another file raises ValueError naming it."""
    with h5py.File(path, "r") as handle:
        if "embeddings" not in handle:
            raise ValueError(f"{path} is not a target embeddings file (no dataset 'embeddings')")
        return handle["embeddings"][()]


@torch.no_grad()
def extract_target_embeddings(network: EmbeddingNetwork, manifest_path: str | Path, output_path: str | Path,
                              settings: TargetEmbeddingSettings, device: torch.device) -> dict[str, Any]:
    """Sample ``per_image`` upsampled \\hat{E} embeddings per target image into HDF5 (module docstring)."""
    manifest = Manifest.load(manifest_path)
    loader = DataLoader(embedding_dataset(manifest, network.normalization, labelled=False),
                        batch_size=settings.batch_size, num_workers=settings.workers)
    rows, image_index, pixel_index = [], [], []
    for batch in tqdm(loader, desc="target embeddings", unit="batch"):
        embeddings = network(batch["image"].to(device))  # (B, E, h, w)
        size = tuple(batch["image"].shape[-2:])  # (H, W)
        for position, index in enumerate(batch["index"].tolist()):
            pixels = sample_pixels(settings.seed, index, size[0] * size[1], settings.per_image)  # (n,)
            rows.append(pixel_embeddings(embeddings[position], size, pixels).float().cpu())  # (n, E)
            image_index.append(np.full(len(pixels), index))
            pixel_index.append(pixels.numpy())
    matrix = torch.cat(rows).numpy()  # (N, E)
    attributes = {"images": len(manifest.samples), "manifest": str(manifest_path),
                  "network": json.dumps(network.description), "settings": json.dumps(to_dict(settings))}
    write_target_embeddings(output_path, matrix, np.concatenate(image_index), np.concatenate(pixel_index), attributes)
    logger.info("%d target embeddings of dimension %d from %d images -> %s", *matrix.shape, len(manifest.samples),
                output_path)
    return {**attributes, "rows": int(matrix.shape[0]), "embedding_dim": int(matrix.shape[1])}


def save_prototypes(path: str | Path, centroids: np.ndarray) -> None:
    """Write (J, E) float32 centroids as .npy, atomically (np.save to an open handle keeps the name)."""
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.save(handle, np.asarray(centroids, dtype=np.float32))


def load_prototypes(path: str | Path) -> np.ndarray:
    """The (J, E) float32 target prototypes {A_j}; anything else raises ValueError naming the file."""
    centroids = np.load(path, allow_pickle=False)
    if centroids.ndim != 2 or centroids.dtype != np.float32 or not np.isfinite(centroids).all():
        raise ValueError(f"{path}: expected finite float32 (J, E) prototypes, got {centroids.dtype} {centroids.shape}")
    return centroids


def fit_target_prototypes(embeddings_path: str | Path, output_path: str | Path, settings: PrototypeSettings,
                          device: torch.device | str = "cpu") -> np.ndarray:
    """BiSMAP Sec. 3.4: J K-Means centres of the target embeddings (FAISS on ``device``), saved as (J, E) .npy."""
    embeddings = read_target_embeddings(embeddings_path)  # (N, E)
    centroids = kmeans(embeddings, settings.clusters, settings.seed, settings.iterations, device=device)  # (J, E)
    distances, nearest = PrototypeSearch(centroids, device).search(embeddings)  # (N,), (N,): Eq. 7 on the target
    counts = np.bincount(nearest, minlength=settings.clusters)
    logger.info("J=%d target prototypes: mean target distance %.4f, cluster sizes min %d / max %d",
                settings.clusters, float(distances.astype(np.float64).mean()), counts.min(), counts.max())
    save_prototypes(output_path, centroids)
    return centroids


@torch.no_grad()
def class_entropy(checkpoint_path: str | Path, manifest_path: str | Path, output_path: str | Path,
                  settings: ClassEntropySettings, device: torch.device) -> dict[str, Any]:
    """BiSMAP Eq. 8: e_c (mean entropy of the pixels predicted c on target-train) and e_c', as JSON."""
    model, checkpoint = load_model(checkpoint_path, device)
    model.eval()
    class_names = list(checkpoint["class_names"])
    dataset = SegmentationDataset(Manifest.load(manifest_path), labelled=False)  # the warmup's normalisation
    loader = DataLoader(dataset, batch_size=settings.batch_size, num_workers=settings.workers)
    accumulator = ClassEntropyAccumulator(len(class_names))
    for batch in tqdm(loader, desc="class entropy", unit="batch"):
        images = batch["image"].to(device)  # (B, 3, H, W)
        logits = F.interpolate(model(images).logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        accumulator.add(logits.float().softmax(dim=1))  # (B, K, H, W); pseudo label = argmax
    mean = accumulator.mean_entropy()  # (K,), NaN: never predicted
    result = {"class_names": class_names, "images": len(dataset), "checkpoint": str(checkpoint_path),
              "pseudo_labels": "argmax of the warmup softmax (logits upsampled to the image)",
              "mean_entropy": [None if np.isnan(value) else float(value) for value in mean],
              "normalized_entropy": accumulator.normalized().tolist(),
              "pixel_count": accumulator.pixel_count.tolist()}
    write_json(output_path, result)
    logger.info("Eq. 8 e_c': %s", {name: round(value, 3) for name, value in
                                    zip(class_names, result["normalized_entropy"])})
    return result


def read_class_entropy(path: str | Path, class_names: list[str]) -> np.ndarray:
    """e_c' (C,) float64 from a class entropy JSON; refused when written for other classes."""
    data = json.loads(Path(path).read_text())
    if list(data["class_names"]) != list(class_names):
        raise ValueError(f"{path} is for classes {data['class_names']}, expected {class_names}")
    return np.asarray(data["normalized_entropy"], dtype=np.float64)
