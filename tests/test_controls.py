"""The controls of BiSMAP's components and the tuning trials, through the workflow and as numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from bismap.labels.coverage import coverage_threshold
from bismap.stm.weights import control_weights, transferability_weights
from tests.conftest import planned_jobs, remove_new_files, run_snakemake, seed_results, tree_files, write_config

CONTROLS = [
    {"name": "stm_distance", "maps": True, "stm": True, "stm_form": "distance_only", "compare_with": "stm_maps"},
    # a control with overrides too: a tuning trial's settings reach its checkpoint (one job fewer than its own)
    {"name": "stm_entropy", "maps": True, "stm": True, "stm_form": "entropy_only", "compare_with": "stm_maps",
     "overrides": {"training": {"optimizer": {"learning_rate": 0.02}}, "sce_alpha": 0.5}},
    {"name": "stm_class_mean", "maps": True, "stm": True, "stm_form": "class_mean", "compare_with": "stm_maps"},
    {"name": "stm_confidence", "stm": True, "labels": "confidence_matched", "compare_with": "stm_maps"},
    {"name": "stm_cas", "stm": True, "labels": "cas_matched", "compare_with": "stm_maps"},
    {"name": "cag_trial", "method": "cag", "overrides": {"cag": {"margin": 0.0}}},
    {"name": "memory_trial", "maps": True, "consistency": True, "overrides": {"ema_decay": {"memory": 2.0}}},
]


def test_control_forms_of_eq9_keep_the_part_they_name():
    distances = np.array([[0.0, 1.0], [2.0, 3.0]])  # (H, W), d_mean 2: distance term 1, 0.84, 0.5, 0.21
    labels = np.array([[0, 1], [1, 255]])
    entropy = np.array([0.25, 0.0])
    eq9 = control_weights("eq9", distances, labels, 2.0, entropy)
    assert np.array_equal(eq9, transferability_weights(distances, labels, 2.0, entropy))
    np.testing.assert_allclose(control_weights("distance_only", distances, labels, 2.0, entropy),
                               [[1.0, 2 ** -0.25], [0.5, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(control_weights("entropy_only", distances, labels, 2.0, entropy),
                               [[0.75, 0.5], [0.5, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(control_weights("class_mean", distances, labels, 2.0, entropy,
                                               class_means=np.array([0.9, 0.3])), [[0.9, 0.3], [0.3, 0.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="class means"):
        control_weights("class_mean", distances, labels, 2.0, entropy)


def test_coverage_threshold_keeps_the_share_asked_for():
    scores = np.arange(1000) / 1000.0
    threshold = coverage_threshold(scores, 0.3)
    assert (scores >= threshold).mean() == pytest.approx(0.3, abs=0.002)
    assert coverage_threshold(scores, 1.0) == 0.0
    with pytest.raises(ValueError, match="coverage"):
        coverage_threshold(scores, 0.0)


@pytest.fixture(scope="module")
def controls_run(finished_tiny_run, tmp_path_factory):
    """The shared tiny run with the controls and two trials added (a third rides on a control), planned and then
    run; afterwards their files are removed and the shared run's own config runs again (its reports), so later
    tests find it as it was."""
    workdir, configfile = finished_tiny_run
    config = yaml.safe_load(configfile.read_text())
    config["selftrain"]["variants"] += CONTROLS
    edited = write_config(tmp_path_factory.mktemp("controls") / "controls.yaml", config)
    before = tree_files(workdir / "results")
    plan = planned_jobs(run_snakemake(workdir, edited, "-n").stdout)
    run_snakemake(workdir, edited)
    yield workdir, plan
    remove_new_files(workdir / "results", before)
    run_snakemake(workdir, configfile)  # the reports of the shared run's own config again


def test_controls_plan_only_their_own_maps_labels_and_runs(controls_run):
    _, plan = controls_run
    assert plan == {"stm_control_weights": 6, "pseudo_labels": 4, "variant_anchor_labels": 2, "selftrain": 7,
                    "evaluate": 7, "qualitative_figure": 1, "report": 1, "report_seeds": 1, "all": 1}


def test_control_maps_are_the_forms_of_the_eq9_map(controls_run):
    from bismap.stm.target import read_class_entropy

    results = seed_results(controls_run[0] / "results")
    summary = json.loads((results / "stm" / "summary.json").read_text())
    entropy = read_class_entropy(results / "stm" / "class_entropy.json", summary["class_names"])  # e' (C,)
    class_means = [mean for mean in summary["mean_transferability_per_class"].values() if mean is not None]
    entropy_only = [float(min(0.5 + value, 1.0)) for value in entropy]
    for path in sorted((results / "stm" / "weights").glob("shard_*/*.png")):
        eq9 = np.array(Image.open(path)).astype(np.float64) / 65535  # (H, W)
        forms = {form: np.array(Image.open(results / "stm" / "controls" / form / path.parent.name / path.name))
                 .astype(np.float64) / 65535 for form in ("distance_only", "entropy_only", "class_mean")}
        assert np.all(forms["distance_only"] <= eq9 + 1e-4)  # e' >= 0 only adds
        for form, allowed in (("class_mean", class_means), ("entropy_only", entropy_only)):
            values = np.unique(forms[form])[:, None]  # (n, 1) against (1, m) allowed values; 0 = ignore pixels
            assert np.all(np.abs(values - np.array([0.0, *allowed])[None]).min(axis=1) < 2e-5), form  # 16-bit PNG
    assert len(set(np.round(class_means, 3))) > 2 and len(set(np.round(entropy_only, 3))) > 2


def test_matched_labels_cover_the_share_of_the_maps_labels(controls_run):
    results = seed_results(controls_run[0] / "results") / "pseudo_labels"
    maps = json.loads((results / "maps" / "summary.json").read_text())["pl_ratio"]
    for labels in ("confidence_matched", "cas_matched"):
        pixels = np.stack([np.array(Image.open(path)) for path in sorted(results.glob(f"{labels}/shard_*/*.png"))])
        assert pixels.shape == (12, 32, 32)
        assert (pixels != 255).mean() == pytest.approx(maps, abs=0.06)  # per shard of 6 images, ties aside
    anchors = np.stack([np.array(Image.open(path))
                        for path in sorted(results.glob("cas_variants/cag_trial/shard_*/*.png"))])
    assert (anchors != 255).mean() > 0.99  # margin 0: every pixel but exact ties is active


def test_trials_train_with_their_overrides_and_resolved_memory(controls_run):
    checkpoints = seed_results(controls_run[0] / "results") / "checkpoints"
    trial = torch.load(checkpoints / "selftrain_stm_entropy.pt", weights_only=False)["settings"]["selftrain"]
    plain = torch.load(checkpoints / "selftrain_stm_maps.pt", weights_only=False)["settings"]["selftrain"]
    assert trial["training"]["optimizer"]["learning_rate"] == 0.02 and trial["sce_alpha"] == 0.5
    assert plain["training"]["optimizer"]["learning_rate"] == 0.01 and plain["sce_alpha"] == 0.1  # the tiny config's
    memory = torch.load(checkpoints / "selftrain_memory_trial.pt", weights_only=False)["settings"]["selftrain"]
    assert memory["ema_decay"] == pytest.approx(1 - 1 / (2.0 * 2))  # 2 iterations in the tiny config


def test_report_compares_each_control_with_its_reference(controls_run):
    report = json.loads((controls_run[0] / "results" / "report" / "summary.json").read_text())
    assert report["controls"]["selftrain_stm_cas"] == {"reference": "selftrain_stm_maps",
                                                      "changes": "labels cas_matched"}
    markdown = (controls_run[0] / "results" / "report" / "summary.md").read_text()
    controls = markdown.split("## Controls")[1].split("##")[0]
    assert sum(line.startswith("| selftrain_stm_") for line in controls.splitlines()) == 5
    effects = markdown.split("## Effect of each component")[1].split("##")[0]
    assert "stm_distance" not in effects and "cag_trial" not in effects


def test_an_override_of_a_setting_the_method_does_not_read_fails_naming_it(finished_tiny_run, tmp_path):
    workdir, configfile = finished_tiny_run
    config = yaml.safe_load(configfile.read_text())
    config["selftrain"]["variants"].append({"name": "bad", "method": "proda", "overrides": {"cag": {"margin": 1}}})
    result = run_snakemake(workdir, write_config(tmp_path / "bad.yaml", config), "-n", check=False)
    assert result.returncode != 0 and "cannot override 'cag'" in result.stdout + result.stderr
