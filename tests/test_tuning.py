"""The tuning protocol's trials (bismap.tuning): one budget and one kind of search for every method."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from bismap.tuning import (Dimension, best_trials, draw_trials, feature_scales, latin_hypercube, load_space,
                           tuning_config)
from tests.conftest import REPO


def test_latin_hypercube_puts_one_point_in_each_stratum_of_every_dimension():
    points = latin_hypercube(8, 3, seed=0)  # (8, 3)
    assert points.shape == (8, 3) and np.all((points > 0) & (points < 1))
    for dimension in range(3):
        assert sorted(np.floor(points[:, dimension] * 8).astype(int).tolist()) == list(range(8))
    assert np.array_equal(points, latin_hypercube(8, 3, seed=0)) and not np.array_equal(points, latin_hypercube(8, 3, 1))


def test_dimensions_resolve_to_config_values_in_their_units():
    scales = {"euclidean_gap": 2.0, "cosine_gap": 0.2}
    assert Dimension("lr", 0.001, 0.1).value(0.5) == pytest.approx(0.01)  # log scale: geometric middle
    assert Dimension("t", 0.3, 0.9, scale="linear").value(0.5) == pytest.approx(0.6)
    assert Dimension("m", 0.01, 1.0, unit="memory").resolved(0.5, scales) == {"memory": 0.1}
    assert Dimension("i", 0.1, 1.0, unit="run_fraction").resolved(1.0, scales) == {"run_fraction": 1.0}
    assert Dimension("tau", 0.1, 10.0, unit="euclidean_gap").resolved(0.5, scales) == pytest.approx(2.0)
    assert Dimension("tau", 0.5, 0.5, unit="cosine_gap").resolved(0.3, scales) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unit"):
        Dimension("x", 1.0, 2.0, unit="seconds")


def test_trial_zero_is_the_configured_values_and_the_others_nest_their_settings():
    dimensions = [Dimension("training.optimizer.learning_rate", 0.003, 0.03), Dimension("proda.temperature", 0.1, 5.0,
                                                                                        unit="euclidean_gap")]
    trials = draw_trials(dimensions, 8, seed=0, scales={"euclidean_gap": 1.5})
    assert len(trials) == 8 and trials[0] == {}
    rates = sorted(trial["training"]["optimizer"]["learning_rate"] for trial in trials[1:])
    strata = [math.floor(7 * math.log(rate / 0.003) / math.log(10)) for rate in rates]
    assert strata == list(range(7))  # one per seventh of the log range
    assert all(0.15 <= trial["proda"]["temperature"] <= 7.5 for trial in trials[1:])


def test_the_shipped_space_gives_every_method_the_same_budget():
    space = load_space(REPO / "config" / "tuning_space.yaml")
    overlay = tuning_config(space, {"euclidean_gap": 1.0, "cosine_gap": 0.1})
    names = [variant["name"] for variant in overlay["selftrain"]["variants"]]
    assert len(names) == 8 * 5 and {name.rsplit("_trial_", 1)[0] for name in names} == set(space.methods)
    assert set(overlay["seeds"]).isdisjoint(range(5))  # development seeds are never report seeds
    first = overlay["selftrain"]["variants"][0]
    assert first["name"] == "bismap_trial_0" and first["overrides"] == {
        "training": {"optimizer": {"learning_rate": 0.01}}, "consistency_weight": 30.0, "ema_decay": 0.999,
        "alignment_momentum": 0.99}
    shipped = yaml.safe_load((REPO / "config" / "tuning.yaml").read_text())
    scales = yaml.safe_load((REPO / "config" / "tuning_scales.yaml").read_text())
    assert shipped == tuning_config(space, scales)  # the committed trials are the ones the space generates


def test_a_trial_zero_without_a_value_for_every_dimension_fails_naming_them(tmp_path):
    """Left to config.yaml, trial 0 would silently become the tuned values once they are frozen there."""
    space = yaml.safe_load((REPO / "config" / "tuning_space.yaml").read_text())
    del space["methods"]["cag"]["paper"]["cag"]["margin"]
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    with pytest.raises(ValueError, match=r"methods.cag.paper \(trial 0\) gives no value for \['cag.margin'\]"):
        load_space(tmp_path / "space.yaml")


def test_best_trial_is_the_highest_mean_miou_of_each_method():
    variants = [{"name": "proda_trial_0"}, {"name": "proda_trial_1", "overrides": {"proda": {"temperature": 2.0}}},
                {"name": "cag_trial_0"}]
    summary = {"models": {"selftrain_proda_trial_0": {"miou": {"mean": 40.0}},
                          "selftrain_proda_trial_1": {"miou": {"mean": 42.5}},
                          "selftrain_cag_trial_0": {"miou": {"mean": 30.0}}}}
    best = best_trials(summary, variants)
    assert best["proda"]["best"] == {"trial": 1, "miou": 42.5, "overrides": {"proda": {"temperature": 2.0}}}
    assert best["cag"]["best"]["trial"] == 0 and len(best["proda"]["trials"]) == 2


def test_feature_scales_are_the_median_centroid_gaps(tmp_path):
    import torch

    from bismap.labels.features import write_features
    from bismap.labels.gmm import ClassPrototypes

    rows = [torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([[0.0, 2.0], [0.0, 4.0]])]  # centroids (2,0), (0,3)
    write_features(tmp_path / "features.h5", rows, ["a", "b"], seen_per_class=[2, 2])
    centroids = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    ClassPrototypes(("a", "b"), (None, None), None, centroids, None).save(tmp_path / "prototypes.h5")
    scales = feature_scales(tmp_path / "features.h5", tmp_path / "prototypes.h5")
    gaps = [math.hypot(1, 3) - 1, math.hypot(3, 3) - 1, math.hypot(2, 2) - 1, math.hypot(2, 4) - 1]
    assert scales["euclidean_gap"] == pytest.approx(float(np.median(gaps)))
    assert scales["cosine_gap"] == pytest.approx(1.0) and scales["rows"] == 4
