"""Multiple Anisotropic Prototypes (MAPs, BiSMAP Sec. 3.3): one GMM per class over source features.

Workflow use (one job per step):

1. :func:`bismap.labels.features.extract_source_features` -> features HDF5 (Eq. 3);
2. :func:`fit_class_gmms`: :func:`fit_class_gmm` + :func:`save_class_gmm` for some
   classes, one folder of ``class_<c>.h5`` per job (fan-out; gathered by :func:`class_gmm_paths`);
3. :func:`merge_class_gmms` -> :class:`ClassPrototypes`, saved with ``save``.

Features are standardised before fitting (``GMMSettings.standardize``) with the
mean and standard deviation of all kept source features, the deviation
floored at ``std_floor`` times its mean over dimensions: post-ReLU decoder
features have dimensions that are (almost) always zero. The standardisation is
one affine map shared by all classes, and :meth:`ClassPrototypes.log_densities`
adds its log-Jacobian, so log-densities are those of the original features
(BiSMAP's absolute delta keeps its meaning) and the argmax over classes is
unchanged.

The mixture math (:class:`GaussianMixture`, :func:`fit_gmm`) lives in
:mod:`bismap.labels.mixture` and is re-exported here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from bismap.io import atomic_directory, atomic_path
from bismap.labels.features import read_class_features, read_feature_info
from bismap.labels.mixture import GaussianMixture, diag_parameters, fit_gmm
from bismap.labels.selection import Candidate, FitOptions, candidates, select_candidate

__all__ = ["GMMSettings", "GaussianMixture", "fit_gmm", "Standardizer", "ClassPrototypes", "fit_class_gmm",
           "save_class_gmm", "load_class_gmm", "merge_class_gmms", "torch_dtype", "fit_class_gmms", "class_gmm_paths"]

logger = logging.getLogger(__name__)

PROTOTYPES_KIND = "bismap-class-prototypes"
SPREAD = {"diag": "variances", "full": "covariances"}  # the dataset holding each covariance type


@dataclass(frozen=True)
class GMMSettings:
    components: int = 8  # K, BiSMAP Sec. 4.2
    covariance: str = "diag"  # 'diag' (BiSMAP) or 'full'
    max_iterations: int = 100
    tolerance: float = 1e-3  # on the mean log-likelihood per sample, as scikit-learn's tol
    regularization: float = 1e-6  # added to variances (standardised units), scikit-learn's reg_covar
    kmeans_iterations: int = 100
    seed: int = 0
    standardize: bool = True
    std_floor: float = 1e-2  # relative: std_d >= std_floor * mean_d(std_d)
    min_features: int = 50  # fewer correct source features -> no prototype for the class
    max_features: int | None = None  # fit on the first N rows (a uniform sample) only
    calibration_samples: int = 20_000  # own-class source log-densities kept for percentile thresholds
    dtype: str = "float64"  # of fitting and calibration
    chunk_rows: int = 65_536
    # per class, (K, floor) chosen among these by held-out source log-likelihood (bismap.labels.selection);
    # both empty: ``components`` and ``regularization`` as given
    select_components: tuple[int, ...] = ()
    select_regularization: tuple[float, ...] = ()
    held_out_fraction: float = 0.2  # of the first ``selection_features`` rows, held out for the choice
    selection_features: int = 5_000

    def __post_init__(self) -> None:
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError(f"maps.gmm.held_out_fraction must be in (0, 1), got {self.held_out_fraction}")
        if any(count < 1 for count in self.select_components) or any(r <= 0 for r in self.select_regularization):
            raise ValueError("maps.gmm.select_components must be >= 1 and select_regularization > 0")

    def candidate_lists(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """The (K, floor) lists to choose from; a missing list is the single configured value."""
        return (self.select_components or (self.components,), self.select_regularization or (self.regularization,))

    @property
    def selects(self) -> bool:
        return bool(self.select_components or self.select_regularization)


def torch_dtype(name: str) -> torch.dtype:
    if name not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got '{name}'")
    return getattr(torch, name)


@dataclass(frozen=True, eq=False)
class Standardizer:
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,), already floored

    @classmethod
    def from_statistics(cls, mean: np.ndarray, std: np.ndarray, floor: float) -> Standardizer:
        std = torch.as_tensor(std, dtype=torch.float64)  # (D,)
        minimum = max(floor * float(std.mean()), torch.finfo(torch.float32).tiny)
        return cls(torch.as_tensor(mean, dtype=torch.float64), std.clamp(min=minimum))

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        """z = (x - mean) / std: (N, D) -> (N, D) in the dtype of ``features``."""
        return (features - self.mean.to(features)) / self.std.to(features)

    @property
    def log_jacobian(self) -> float:
        """log |dz/dx| = -sum_d log std_d: log p_x(x) = log p_z(z) + log_jacobian."""
        return -float(self.std.log().sum())


@dataclass(frozen=True, eq=False)
class ClassPrototypes:
    """The MAPs of every class: a GMM per class, None where a class has no prototype."""

    class_names: tuple[str, ...]
    mixtures: tuple[GaussianMixture | None, ...]
    standardizer: Standardizer | None = None
    centroids: torch.Tensor | None = None  # (C, D) source class means (CAG-UDA anchors), NaN rows if absent
    calibration: tuple[torch.Tensor | None, ...] | None = None  # per class (n_c,) own source log-densities
    _cache: dict[Any, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.mixtures) != len(self.class_names):
            raise ValueError(f"{len(self.mixtures)} mixtures for {len(self.class_names)} classes")

    def log_densities(self, features: torch.Tensor, dtype: torch.dtype | None = None,
                      chunk_rows: int = 65_536) -> torch.Tensor:
        """log p_c(x) of BiSMAP Eq. 4 for every class: (N, D) -> (N, C); -inf for absent classes.

        All diagonal mixtures are scored together: one (N, 2D) x (2D, C*K)
        product per chunk of rows (padding components have weight 0).
        """
        dtype = dtype or features.dtype
        parts = [self._score_chunk(chunk.to(dtype)) for chunk in features.split(chunk_rows)]
        return torch.cat(parts) if parts else features.new_empty(0, len(self.class_names), dtype=dtype)

    def _score_chunk(self, features: torch.Tensor) -> torch.Tensor:
        shift = 0.0
        if self.standardizer is not None:
            features, shift = self.standardizer.transform(features), self.standardizer.log_jacobian
        present = [mixture for mixture in self.mixtures if mixture is not None]
        if present and all(mixture.covariance == "diag" for mixture in present):
            precisions, linear, constant = self._stacked_diag(features.device, features.dtype)
            joint = torch.addmm(constant, features * features, precisions.T, alpha=-0.5)  # (n, C*K)
            joint.addmm_(features, linear.T)
            return joint.view(len(features), len(self.mixtures), -1).logsumexp(dim=2) + shift  # (n, C)
        columns = [torch.full((len(features),), -torch.inf, dtype=features.dtype, device=features.device)
                   if mixture is None else mixture.to(features.device, features.dtype).log_density(features)
                   for mixture in self.mixtures]
        return torch.stack(columns, dim=1) + shift  # (n, C)

    def _stacked_diag(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Precisions, means*precisions (C*K, D) and constants (C*K,) of all classes, padded to max K."""
        key = ("diag", device, dtype)
        if key not in self._cache:
            present = [mixture for mixture in self.mixtures if mixture is not None]
            components, dim = max(m.components for m in present), present[0].feature_dim
            precisions = torch.ones(len(self.mixtures), components, dim, dtype=torch.float64)
            linear = torch.zeros(len(self.mixtures), components, dim, dtype=torch.float64)
            constant = torch.full((len(self.mixtures), components), -torch.inf, dtype=torch.float64)
            for index, mixture in enumerate(self.mixtures):
                if mixture is not None:
                    mixture = mixture.to("cpu", torch.float64)
                    parameters = diag_parameters(mixture.weights, mixture.means, mixture.variances)
                    count = mixture.components
                    precisions[index, :count], linear[index, :count], constant[index, :count] = parameters
            self._cache[key] = tuple(tensor.flatten(0, 1).to(device=device, dtype=dtype)
                                     for tensor in (precisions, linear, constant))
        return self._cache[key]

    def percentile_thresholds(self, percentile: float) -> np.ndarray:
        """Per class, ``percentile`` of its own source log-densities: (C,), +inf without calibration."""
        if self.calibration is None:
            raise ValueError("these prototypes carry no calibration log-densities (made without features?)")
        return np.array([np.percentile(values.double().numpy(), percentile) if values is not None and len(values)
                         else np.inf for values in self.calibration])

    def save(self, path: str | Path) -> None:
        """HDF5, atomically: ``class_<c>`` groups (absent classes have none), standardizer, anchors, calibration."""
        with atomic_path(path) as temporary, h5py.File(temporary, "w") as handle:
            handle.attrs.update(kind=PROTOTYPES_KIND, class_names=json.dumps(list(self.class_names)))
            for class_id, mixture in enumerate(self.mixtures):
                if mixture is not None:
                    write_mixture(handle.create_group(f"class_{class_id}"), mixture)
            if self.standardizer is not None:
                handle["standardizer_mean"] = self.standardizer.mean.cpu().numpy()
                handle["standardizer_std"] = self.standardizer.std.cpu().numpy()
            if self.centroids is not None:
                handle["centroids"] = self.centroids.cpu().numpy()
            for class_id, values in enumerate(self.calibration or ()):
                if values is not None:
                    handle[f"calibration/class_{class_id}"] = values.cpu().numpy()
        logger.info("wrote prototypes of %d classes to %s", len(self.class_names), path)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> ClassPrototypes:
        with h5py.File(path, "r") as handle:
            if handle.attrs.get("kind") != PROTOTYPES_KIND:
                raise ValueError(f"{path} is not a prototypes file written by ClassPrototypes.save")
            names = tuple(json.loads(handle.attrs["class_names"]))
            mixtures = tuple(read_mixture(handle[f"class_{c}"], device) if f"class_{c}" in handle else None
                             for c in range(len(names)))
            standardizer = (Standardizer(*(torch.from_numpy(handle[k][()]).to(device)
                                           for k in ("standardizer_mean", "standardizer_std")))
                            if "standardizer_mean" in handle else None)
            centroids = torch.from_numpy(handle["centroids"][()]).to(device) if "centroids" in handle else None
            calibration = (tuple(torch.from_numpy(handle[f"calibration/class_{c}"][()])
                                 if f"class_{c}" in handle["calibration"] else None for c in range(len(names)))
                           if "calibration" in handle else None)
        return cls(names, mixtures, standardizer, centroids, calibration)


def write_mixture(group: h5py.Group, mixture: GaussianMixture) -> None:
    spread = mixture.variances if mixture.covariance == "diag" else mixture.covariances
    for name, tensor in (("weights", mixture.weights), ("means", mixture.means), (SPREAD[mixture.covariance], spread)):
        group[name] = tensor.detach().cpu().numpy()
    group.attrs.update(covariance=mixture.covariance, converged=mixture.converged, iterations=mixture.iterations,
                       lower_bound=mixture.lower_bound)
    if mixture.selection is not None:  # the held-out table (K, floor) was chosen from
        group.attrs["selection"] = json.dumps(mixture.selection)


def read_mixture(group: h5py.Group, device: torch.device | str) -> GaussianMixture:
    covariance = str(group.attrs["covariance"])
    tensors = {name: torch.from_numpy(group[name][()]).to(device) for name in ("weights", "means")}
    tensors[SPREAD[covariance]] = torch.from_numpy(group[SPREAD[covariance]][()]).to(device)
    selection = json.loads(group.attrs["selection"]) if "selection" in group.attrs else None
    return GaussianMixture(covariance=covariance, converged=bool(group.attrs["converged"]),
                           iterations=int(group.attrs["iterations"]), lower_bound=float(group.attrs["lower_bound"]),
                           selection=selection, **tensors)


def feature_standardizer(features_path: str | Path, settings: GMMSettings) -> Standardizer | None:
    if not settings.standardize:
        return None
    info = read_feature_info(features_path)
    return Standardizer.from_statistics(info.feature_mean, info.feature_std, settings.std_floor)


def fit_class_gmm(features_path: str | Path, class_id: int, settings: GMMSettings,
                  device: torch.device | str = "cpu") -> GaussianMixture | None:
    """Fit the MAPs of one class (BiSMAP Eq. 4) on its sampled source features; None if too few."""
    info = read_feature_info(features_path)
    if not 0 <= class_id < len(info.class_names):
        raise ValueError(f"class id {class_id} outside 0..{len(info.class_names) - 1} of {features_path}")
    rows = read_class_features(features_path, class_id, settings.max_features)  # (n, D)
    name = info.class_names[class_id]
    if len(rows) < max(settings.min_features, settings.components):
        logger.warning("class %d '%s': only %d correctly classified source features in %s (need %d): "
                       "no prototype, the class will never be assigned", class_id, name, len(rows), features_path,
                       max(settings.min_features, settings.components))
        return None
    features = torch.from_numpy(rows).to(device=device, dtype=torch_dtype(settings.dtype))
    standardizer = feature_standardizer(features_path, settings)
    if standardizer is not None:
        features = standardizer.transform(features)
    options = FitOptions(settings.covariance, settings.max_iterations, settings.tolerance, settings.seed + class_id,
                         settings.kmeans_iterations, settings.chunk_rows)
    chosen, table = Candidate(settings.components, settings.regularization), None
    if settings.selects:
        chosen, table = select_candidate(features[: settings.selection_features], options,
                                         candidates(*settings.candidate_lists()), settings.held_out_fraction)
        logger.info("class %d '%s': held-out log-likelihood per (K, floor): %s -> K %d, floor %g", class_id, name,
                    ", ".join(f"({row['components']}, {row['regularization']:g}) {row['held_out_log_likelihood']:.1f}"
                              for row in table), chosen.components, chosen.regularization)
    mixture = options.fit(features, chosen)
    logger.info("class %d '%s': %d-component %s GMM on %d features, %d EM iterations, log-likelihood %.3f",
                class_id, name, mixture.components, mixture.covariance, len(rows), mixture.iterations,
                mixture.lower_bound)
    return replace(mixture.to("cpu"), selection=table)


def save_class_gmm(path: str | Path, mixture: GaussianMixture | None, class_id: int, class_name: str) -> None:
    """One class's GMM (or its absence) as HDF5, atomically: the output of one fan-out job."""
    with atomic_path(path) as temporary, h5py.File(temporary, "w") as handle:
        handle.attrs.update(kind="bismap-class-gmm", class_id=class_id, class_name=class_name,
                            present=mixture is not None)
        if mixture is not None:
            write_mixture(handle.create_group("mixture"), mixture)


def fit_class_gmms(features_path: str | Path, class_ids: Sequence[int], settings: GMMSettings,
                   output_dir: str | Path, device: torch.device | str = "cpu") -> None:
    """Fit and save ``class_<c>.h5`` for each of ``class_ids`` into ``output_dir`` (written as a whole, atomically).

    Each class's fit depends on its own features and seed (``settings.seed`` + class id)
    only, so any split of the classes over jobs gives the same files.
    """
    class_names = read_feature_info(features_path).class_names
    with atomic_directory(output_dir) as temporary:
        for class_id in class_ids:
            mixture = fit_class_gmm(features_path, class_id, settings, device)
            save_class_gmm(temporary / f"class_{class_id}.h5", mixture, class_id, class_names[class_id])


def class_gmm_paths(directories: Sequence[str | Path], class_count: int) -> list[Path]:
    """The ``class_<c>.h5`` files of the fit jobs' folders, in class order 0..class_count-1.

    A missing, unexpected or duplicated class raises, naming it.
    """
    found: dict[int, Path] = {}
    for path in (path for directory in map(Path, directories) for path in sorted(directory.glob("class_*.h5"))):
        class_id = int(path.stem.removeprefix("class_"))
        if class_id in found:
            raise ValueError(f"class {class_id} has two GMM files: {found[class_id]} and {path}")
        found[class_id] = path
    missing = sorted(set(range(class_count)) - set(found))
    if missing or len(found) != class_count:
        raise FileNotFoundError(f"GMM files in {[str(d) for d in directories]}: classes {missing} missing, "
                                f"{sorted(set(found) - set(range(class_count)))} unexpected")
    return [found[class_id] for class_id in range(class_count)]


def load_class_gmm(path: str | Path) -> tuple[int, GaussianMixture | None]:
    with h5py.File(path, "r") as handle:
        if handle.attrs.get("kind") != "bismap-class-gmm":
            raise ValueError(f"{path} is not a class GMM file written by save_class_gmm")
        mixture = read_mixture(handle["mixture"], "cpu") if handle.attrs["present"] else None
        return int(handle.attrs["class_id"]), mixture


def merge_class_gmms(mixtures: Sequence[GaussianMixture | None | str | Path], features_path: str | Path,
                     settings: GMMSettings) -> ClassPrototypes:
    """Gather the per-class GMMs (objects or ``save_class_gmm`` files, in class order) into MAPs.

    Adds the CAG-UDA category anchors (the mean of each class's sampled source
    features) and, per class, the log-densities of its first
    ``calibration_samples`` source features under its own GMM, from which
    percentile thresholds are taken.
    """
    info = read_feature_info(features_path)
    if len(mixtures) != len(info.class_names):
        raise ValueError(f"{len(mixtures)} GMMs given for the {len(info.class_names)} classes of {features_path}")
    loaded = [_as_mixture(item, class_id) for class_id, item in enumerate(mixtures)]
    prototypes = ClassPrototypes(info.class_names, tuple(loaded), feature_standardizer(features_path, settings))
    dtype = torch_dtype(settings.dtype)
    centroids = torch.full((len(loaded), info.feature_dim), torch.nan, dtype=torch.float64)  # (C, D)
    calibration: list[torch.Tensor | None] = []
    for class_id, mixture in enumerate(loaded):
        rows = torch.from_numpy(read_class_features(features_path, class_id))  # (n_c, D)
        if len(rows):
            centroids[class_id] = rows.double().mean(dim=0)  # CAG-UDA category anchor
        sample = rows[: settings.calibration_samples]
        calibration.append(None if mixture is None or not len(sample) else
                           prototypes.log_densities(sample, dtype, settings.chunk_rows)[:, class_id].cpu())
    present = [name for name, mixture in zip(info.class_names, loaded) if mixture is not None]
    logger.info("MAPs for %d of %d classes: %s", len(present), len(loaded), present)
    return ClassPrototypes(info.class_names, tuple(loaded), prototypes.standardizer, centroids, tuple(calibration))


def _as_mixture(item: GaussianMixture | None | str | Path, class_id: int) -> GaussianMixture | None:
    if item is None or isinstance(item, GaussianMixture):
        return item
    stored_id, mixture = load_class_gmm(item)
    if stored_id != class_id:
        raise ValueError(f"{item} holds the GMM of class {stored_id}, but is listed at position {class_id}")
    return mixture

