"""GMM log-densities match scikit-learn, EM recovers clusters, prototypes survive a round trip."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from scipy.linalg import solve_triangular
from sklearn.mixture import GaussianMixture as SklearnMixture

from bismap.labels.features import write_features
from bismap.labels.gmm import (ClassPrototypes, GaussianMixture, GMMSettings, Standardizer, class_gmm_paths,
                               fit_class_gmm, fit_class_gmms, fit_gmm, load_class_gmm, merge_class_gmms, save_class_gmm)
from bismap.labels.mixture import precision_cholesky
from bismap.settings import from_dict


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_mixture(rng: np.random.Generator, components: int, dim: int, covariance: str) -> GaussianMixture:
    weights = torch.from_numpy(rng.dirichlet(np.ones(components)))
    means = torch.from_numpy(rng.normal(0, 2, (components, dim)))
    if covariance == "diag":
        variances = torch.from_numpy(rng.uniform(0.2, 3, (components, dim)))
        return GaussianMixture(weights, means, "diag", variances=variances)
    factors = rng.normal(0, 1, (components, dim, dim))
    covariances = factors @ factors.transpose(0, 2, 1) + 0.5 * np.eye(dim)
    return GaussianMixture(weights, means, "full", covariances=torch.from_numpy(covariances))


def sklearn_copy(mixture: GaussianMixture) -> SklearnMixture:
    """A fitted-looking scikit-learn model with exactly these parameters."""
    model = SklearnMixture(mixture.components, covariance_type=mixture.covariance)
    model.weights_, model.means_ = mixture.weights.numpy(), mixture.means.numpy()
    if mixture.covariance == "diag":
        model.covariances_ = mixture.variances.numpy()
        model.precisions_cholesky_ = 1.0 / np.sqrt(model.covariances_)
    else:
        model.covariances_ = mixture.covariances.numpy()
        lower = np.linalg.cholesky(model.covariances_)
        model.precisions_cholesky_ = np.stack([solve_triangular(factor, np.eye(len(factor)), lower=True).T
                                               for factor in lower])
    return model


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_log_density_equals_sklearn_in_float64(covariance):
    rng = np.random.default_rng(0)
    mixture = random_mixture(rng, components=4, dim=6, covariance=covariance)
    points = rng.normal(0, 3, (500, 6))
    ours = mixture.log_density(torch.from_numpy(points), chunk_rows=128).numpy()
    reference = sklearn_copy(mixture).score_samples(points)
    np.testing.assert_allclose(ours, reference, rtol=1e-9, atol=0)
    assert ours.min() < -30  # the points span a wide range of densities


def test_precision_cholesky_matches_sklearn_convention():
    mixture = random_mixture(np.random.default_rng(1), 2, 4, "full")
    np.testing.assert_allclose(precision_cholesky(mixture.covariances).numpy(),
                               sklearn_copy(mixture).precisions_cholesky_, rtol=1e-10)


def test_class_log_densities_match_sklearn_per_class_with_standardizer():
    rng = np.random.default_rng(2)
    mixtures = (random_mixture(rng, 3, 5, "diag"), None, random_mixture(rng, 2, 5, "diag"))  # K differs
    standardizer = Standardizer(torch.from_numpy(rng.normal(0, 1, 5)), torch.from_numpy(rng.uniform(0.5, 2, 5)))
    prototypes = ClassPrototypes(("a", "b", "c"), mixtures, standardizer)
    points = rng.normal(0, 2, (300, 5))
    ours = prototypes.log_densities(torch.from_numpy(points), torch.float64, chunk_rows=64).numpy()  # (N, C)
    standardized = (points - standardizer.mean.numpy()) / standardizer.std.numpy()
    shift = -np.log(standardizer.std.numpy()).sum()  # density of x, not of z
    for column in (0, 2):
        reference = sklearn_copy(mixtures[column]).score_samples(standardized) + shift
        np.testing.assert_allclose(ours[:, column], reference, rtol=1e-9)
    assert np.all(ours[:, 1] == -np.inf)
    float32 = prototypes.log_densities(torch.from_numpy(points).float()).numpy()
    assert float32.dtype == np.float32 and np.abs(float32[:, [0, 2]] - ours[:, [0, 2]]).max() < 1e-2
    full = ClassPrototypes(("a", "b"), (random_mixture(rng, 2, 5, "full"), None))  # scored class by class
    densities = full.log_densities(torch.from_numpy(points), torch.float64).numpy()
    np.testing.assert_allclose(densities[:, 0], sklearn_copy(full.mixtures[0]).score_samples(points), rtol=1e-9)
    assert np.all(densities[:, 1] == -np.inf)


def two_blobs(seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    first = rng.normal([0, 0, 0], 1.0, (2000, 3))
    second = rng.normal([8, -8, 8], 0.5, (1000, 3))
    return torch.from_numpy(np.concatenate([first, second])[rng.permutation(3000)])


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_fit_recovers_two_separated_blobs(covariance):
    features = two_blobs()
    mixture = fit_gmm(features, components=2, covariance=covariance, seed=3)
    order = torch.argsort(mixture.means[:, 0])
    np.testing.assert_allclose(mixture.weights[order].numpy(), [2 / 3, 1 / 3], atol=1e-6)
    np.testing.assert_allclose(mixture.means[order].numpy(), [[0, 0, 0], [8, -8, 8]], atol=0.1)
    spread = mixture.variances if covariance == "diag" else mixture.covariances.diagonal(dim1=1, dim2=2)
    np.testing.assert_allclose(spread[order].numpy(), [[1, 1, 1], [0.25, 0.25, 0.25]], rtol=0.15)
    assert mixture.converged
    reference = SklearnMixture(2, covariance_type=covariance, random_state=0).fit(features.numpy())
    assert mixture.lower_bound == pytest.approx(reference.score(features.numpy()), abs=1e-3)
    again = fit_gmm(features, components=2, covariance=covariance, seed=3)
    assert torch.equal(again.means, mixture.means)


def test_standardizer_floors_dead_dimensions():
    standardizer = Standardizer.from_statistics(np.zeros(3), np.array([2.0, 1.0, 0.0]), floor=0.1)
    assert standardizer.std.tolist() == [2.0, 1.0, 0.1]  # floor = 0.1 * mean std (1.0)
    assert standardizer.log_jacobian == pytest.approx(-np.log(2.0 * 0.1))


def features_file(path, seed: int = 0, absent_rows: int = 3):
    """Class 0: two blobs, class 1: a few rows only, class 2: one blob."""
    rng = np.random.default_rng(seed)
    rows = [two_blobs(seed).float()[:600], torch.from_numpy(rng.normal(0, 1, (absent_rows, 3))).float(),
            torch.from_numpy(rng.normal([-6, 6, 0], 0.7, (400, 3))).float()]
    write_features(path, rows, ["zero", "one", "two"], [len(r) * 2 for r in rows])
    return rows


def test_fit_class_merge_save_and_load_round_trip(tmp_path, caplog):
    rows = features_file(tmp_path / "features.h5")
    settings = from_dict(GMMSettings, {"components": 2, "min_features": 10, "calibration_samples": 100}, "gmm")
    with caplog.at_level(logging.WARNING):
        mixtures = [fit_class_gmm(tmp_path / "features.h5", class_id, settings) for class_id in range(3)]
    assert mixtures[1] is None and "class 1 'one'" in caplog.text and "only 3" in caplog.text
    for class_id, mixture in enumerate(mixtures):
        save_class_gmm(tmp_path / f"gmm_{class_id}.h5", mixture, class_id, ["zero", "one", "two"][class_id])
    assert load_class_gmm(tmp_path / "gmm_1.h5") == (1, None)
    prototypes = merge_class_gmms([tmp_path / f"gmm_{c}.h5" for c in range(3)], tmp_path / "features.h5", settings)
    np.testing.assert_allclose(prototypes.centroids[2].numpy(), rows[2].double().mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(prototypes.centroids[1].numpy(), rows[1].double().mean(0).numpy(), rtol=1e-6)
    assert len(prototypes.calibration[0]) == 100 and prototypes.calibration[1] is None
    points = torch.from_numpy(np.random.default_rng(5).normal(0, 5, (200, 3)))
    densities = prototypes.log_densities(points, torch.float64)
    own = prototypes.log_densities(rows[2][:100].double(), torch.float64)[:, 2]
    np.testing.assert_allclose(prototypes.calibration[2].numpy(), own.numpy(), rtol=1e-12)
    prototypes.save(tmp_path / "prototypes.h5")
    loaded = ClassPrototypes.load(tmp_path / "prototypes.h5")
    assert loaded.class_names == ("zero", "one", "two") and loaded.mixtures[1] is None
    assert torch.equal(loaded.log_densities(points, torch.float64), densities)
    assert np.array_equal(loaded.percentile_thresholds(10), prototypes.percentile_thresholds(10))
    assert loaded.percentile_thresholds(10)[1] == np.inf
    with pytest.raises(ValueError, match="position 0"):
        merge_class_gmms([tmp_path / "gmm_1.h5"] * 3, tmp_path / "features.h5", settings)


def test_any_split_of_the_classes_over_fit_jobs_gives_the_same_files(tmp_path):
    """maps.gmm_jobs: null (one job per class) and 2 jobs (round-robin) write byte-identical class files."""
    features_file(tmp_path / "features.h5", absent_rows=30)
    settings = from_dict(GMMSettings, {"components": 2, "min_features": 10, "calibration_samples": 100}, "gmm")
    for class_id in range(3):  # gmm_jobs null: job c fits class c
        fit_class_gmms(tmp_path / "features.h5", [class_id], settings, tmp_path / "null" / f"job_{class_id}")
    for job, classes in enumerate([[0, 2], [1]]):  # gmm_jobs 2: classes 0, 2 and 1
        fit_class_gmms(tmp_path / "features.h5", classes, settings, tmp_path / "two" / f"job_{job}")
    one_each = class_gmm_paths(sorted((tmp_path / "null").iterdir()), 3)
    grouped = class_gmm_paths(sorted((tmp_path / "two").iterdir()), 3)
    assert [path.relative_to(tmp_path).as_posix() for path in grouped] == [
        "two/job_0/class_0.h5", "two/job_1/class_1.h5", "two/job_0/class_2.h5"]
    for single, shared in zip(one_each, grouped):
        assert single.read_bytes() == shared.read_bytes()
        (class_id, first), (same_id, second) = load_class_gmm(single), load_class_gmm(shared)
        assert class_id == same_id and first.components == 2
        for name in ("weights", "means", "variances"):
            assert torch.equal(getattr(first, name), getattr(second, name))
    merged = [merge_class_gmms(paths, tmp_path / "features.h5", settings) for paths in (one_each, grouped)]
    points = torch.from_numpy(np.random.default_rng(1).normal(0, 5, (50, 3)))
    assert torch.equal(merged[0].log_densities(points, torch.float64), merged[1].log_densities(points, torch.float64))
    with pytest.raises(FileNotFoundError, match=r"classes \[1\] missing"):
        class_gmm_paths([tmp_path / "two" / "job_0"], 3)
    with pytest.raises(ValueError, match="class 0 has two GMM files"):
        class_gmm_paths([tmp_path / "null" / "job_0", tmp_path / "two" / "job_0"], 3)
