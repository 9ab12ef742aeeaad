"""K and the variance floor of a class's MAPs, chosen by held-out source log-likelihood (bismap.labels.selection)."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch

from bismap.labels.gmm import GMMSettings, fit_class_gmm, load_class_gmm, save_class_gmm
from bismap.labels.selection import Candidate, FitOptions, candidates, held_out_scores, select_candidate

OPTIONS = FitOptions(covariance="diag", max_iterations=100, tolerance=1e-6, seed=0, kmeans_iterations=50,
                     chunk_rows=1024)


def test_candidates_list_every_pair_with_k_outer():
    assert candidates((2, 4), (1e-6, 1e-2)) == [Candidate(2, 1e-6), Candidate(2, 1e-2), Candidate(4, 1e-6),
                                                Candidate(4, 1e-2)]


def test_one_gaussian_scores_the_held_out_rows_by_the_closed_form_density():
    features = torch.tensor([[-1.0], [1.0], [-1.0], [1.0], [0.0], [3.0]], dtype=torch.float64)  # last 2 held out
    score, = held_out_scores(features, OPTIONS, [Candidate(1, 0.5)], held_out_fraction=1 / 3)
    variance = 1.0 + 0.5  # the fitting rows' variance (mean 0) plus the floor
    expected = np.mean([-0.5 * (math.log(2 * math.pi * variance) + x * x / variance) for x in (0.0, 3.0)])
    assert score == pytest.approx(expected, rel=1e-9)


def test_a_dimension_the_fitting_rows_never_vary_in_costs_a_tiny_floor_its_held_out_spread():
    generator = np.random.default_rng(0)
    fitting = np.column_stack([generator.normal(size=400), np.zeros(400)])  # dimension 1 always 0 ...
    held_out = np.column_stack([generator.normal(size=100), generator.normal(scale=0.05, size=100)])  # ... not here
    features = torch.from_numpy(np.vstack([fitting, held_out]))
    chosen, table = select_candidate(features, OPTIONS, candidates((1,), (1e-6, 1e-2)), held_out_fraction=0.2)
    assert chosen == Candidate(1, 1e-2)
    tiny, larger = (row["held_out_log_likelihood"] for row in table)
    assert tiny < larger - 100  # 0.05^2 / (2e-6) ~ 1,250 nats per held-out row on average


def test_two_separated_clusters_choose_two_components():
    generator = np.random.default_rng(1)
    rows = np.concatenate([generator.normal(-4.0, 1.0, size=(300, 2)), generator.normal(4.0, 1.0, size=(300, 2))])
    features = torch.from_numpy(rows[generator.permutation(600)])
    chosen, table = select_candidate(features, OPTIONS, candidates((1, 2), (1e-3,)), held_out_fraction=0.25)
    assert chosen == Candidate(2, 1e-3)
    assert table[1]["held_out_log_likelihood"] - table[0]["held_out_log_likelihood"] > 1.0


def test_fit_class_gmm_refits_the_choice_on_all_rows_and_stores_the_table(tmp_path):
    generator = np.random.default_rng(2)
    path = tmp_path / "features.h5"
    rows = np.column_stack([generator.normal(size=500), np.zeros(500)]).astype(np.float32)
    rows[-50:, 1] = generator.normal(scale=0.05, size=50)
    with h5py.File(path, "w") as handle:  # the layout of bismap.labels.features
        handle.attrs.update(class_names='["a"]', feature_dim=2, pixels_seen_per_class=[500], pixels_kept_per_class=[500])
        handle["class_0"] = rows
        handle["feature_mean"], handle["feature_std"] = rows.mean(axis=0), rows.std(axis=0)
    settings = GMMSettings(components=1, standardize=False, select_components=(1,),
                           select_regularization=(1e-6, 1e-2), selection_features=500, held_out_fraction=0.2)
    mixture = fit_class_gmm(path, 0, settings)
    assert [row["regularization"] for row in mixture.selection] == [1e-6, 1e-2]
    assert float(mixture.variances[0, 1]) == pytest.approx(float(rows[:, 1].var()) + 1e-2, rel=1e-6)
    save_class_gmm(tmp_path / "class_0.h5", mixture, 0, "a")
    assert load_class_gmm(tmp_path / "class_0.h5")[1].selection == mixture.selection


def test_selection_settings_are_checked():
    with pytest.raises(ValueError, match="held_out_fraction"):
        GMMSettings(held_out_fraction=1.0)
    with pytest.raises(ValueError, match="select_regularization"):
        GMMSettings(select_regularization=(0.0,))
