"""Self-training, distillation and the report through the workflow, on the tiny config (2 iterations each)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from bismap.settings import resolve_run_relative
from tests.conftest import (REPO, planned_jobs, remove_new_files, run_snakemake, seed_results, tiny_config, tree_files,
                            write_config)

VARIANTS = ["baseline", "stm", "stm_maps", "consistency", "bismap"]


def test_every_stage_writes_its_checkpoint_and_the_report_has_one_row_each(finished_tiny_run):
    workdir, _ = finished_tiny_run
    results = seed_results(workdir / "results")
    models = ["warmup", *(f"selftrain_{name}" for name in VARIANTS[:-1]), "selftrain_bismap_round_1",
              "selftrain_bismap", "distill_stage_1", "distill", "oracle"]
    summary = json.loads((results / "report" / "summary.json").read_text())
    assert [key for key in summary if key != "gap_warmup_to_oracle"] == models
    gap = summary["oracle"]["miou"] - summary["warmup"]["miou"]
    for model in models:
        metrics = json.loads((results / "evaluation" / model / "metrics.json").read_text())
        assert summary[model]["miou"] == metrics["miou"]
        assert summary[model]["gain_over_warmup"] == pytest.approx(metrics["miou"] - summary["warmup"]["miou"])
        # the tiny run's oracle can land below its warmup (it did on an AMD EPYC CPU): then no gap, no share
        assert summary[model]["gap_closed_percent"] == (
            pytest.approx(100 * summary[model]["gain_over_warmup"] / gap) if gap > 0 else None)
    assert summary["selftrain_stm"]["components"] == {"maps": False, "stm": True, "consistency": False,
                                                      "alignment": False, "distillation": False, "rounds": 1}
    # "distillation" counts the stages (distill.stages: 2, as the public BiSMAP code)
    assert summary["distill"]["components"] == {"maps": True, "stm": True, "consistency": True, "alignment": True,
                                                "distillation": 2, "rounds": 2}
    assert summary["distill_stage_1"]["components"] == {**summary["distill"]["components"], "distillation": 1}
    markdown = (results / "report" / "summary.md").read_text()
    # one row per self-trained model in the components, per-class and "What each model ran" tables
    assert sum(line.startswith("| selftrain_") for line in markdown.splitlines()) == 3 * (len(VARIANTS) + 1)


def test_loss_logs_carry_each_variants_terms(finished_tiny_run):
    results = seed_results(finished_tiny_run[0] / "results") / "training"
    headers = {name: (results / f"selftrain_{name}_loss.tsv").read_text().splitlines()[0].split("\t")
               for name in VARIANTS}
    assert "consistency" in headers["bismap"] and "consistency" not in headers["stm_maps"]
    assert all("target_sce" in header and "source_ce" in header for header in headers.values())
    distill = (results / "distill_loss.tsv").read_text().splitlines()
    assert distill[0].split("\t")[:5] == ["iteration", "loss", "source_ce", "target_ce", "kl"]
    assert len(distill) == 1 + 2


def test_only_the_variant_with_alignment_trains_with_it(finished_tiny_run):
    checkpoints = seed_results(finished_tiny_run[0] / "results") / "checkpoints"
    settings = {name: torch.load(path, weights_only=False)["settings"]["selftrain"]
                for name, path in (("consistency", checkpoints / "selftrain_consistency.pt"),
                                   ("round_1", checkpoints / "rounds" / "selftrain_bismap_round_1.pt"),
                                   ("bismap", checkpoints / "selftrain_bismap.pt"))}
    assert not any("align" in key for key in settings["consistency"])  # its params are those it had before
    for name in ("round_1", "bismap"):
        assert settings[name]["align_teacher"] is True and settings[name]["balance_pseudo_labels"] is True
        # {memory: f} resolved for the tiny run's 2 iterations (bismap.settings.resolve_run_relative)
        expected = resolve_run_relative(yaml.safe_load((REPO / "config" / "config.yaml").read_text())["selftrain"]
                                        ["alignment_momentum"], 2)
        assert settings[name]["alignment_momentum"] == expected and settings[name]["alignment_weight_cap"] == 5.0
    assert {key: value for key, value in settings["round_1"].items()
            if "align" not in key and key != "balance_pseudo_labels"} == settings["consistency"]


def test_teacher_labels_keep_only_confident_pixels(finished_tiny_run):
    results = seed_results(finished_tiny_run[0] / "results") / "pseudo_labels"
    labels = np.stack([np.array(Image.open(path)) for path in sorted(results.glob("teacher/shard_*/*.png"))])
    assert labels.shape == (12, 32, 32)
    assert set(np.unique(labels)) <= set(range(11)) | {255}
    summary = json.loads((results / "teacher" / "summary.json").read_text())
    assert summary["images"] == 12 and summary["pl_ratio"] == pytest.approx(float((labels != 255).mean()))


def test_the_second_round_starts_from_the_first_and_learns_its_labels(finished_tiny_run, tmp_path):
    """bismap has rounds: 2 in the default config: round 1 -> its confident labels -> round 2 (the variant)."""
    workdir, configfile = finished_tiny_run
    results = seed_results(workdir / "results")
    labels = np.stack([np.array(Image.open(path))
                       for path in sorted(results.glob("pseudo_labels/rounds/bismap_round_1/shard_*/*.png"))])
    assert labels.shape == (12, 32, 32) and set(np.unique(labels)) <= set(range(11)) | {255}
    summary = json.loads((results / "report" / "summary.json").read_text())
    assert summary["selftrain_bismap_round_1"]["components"]["rounds"] == 1
    assert summary["selftrain_bismap"]["components"]["rounds"] == 2
    output = run_snakemake(workdir, configfile, "-n", "--forcerun", "selftrain_round").stdout
    assert planned_jobs(output) == {"selftrain_round": 1, "round_pseudo_labels": 2, "selftrain": 1,
                                    "teacher_pseudo_labels": 2, "merge_pseudo_labels": 2, "distill_stage": 1,
                                    "stage_teacher_pseudo_labels": 2, "distill": 1, "evaluate": 4,
                                    "qualitative_figure": 1, "report": 1, "report_seeds": 1, "all": 1}
    block = re.search(r"^rule selftrain:\n((?:    .*\n)+)", output, flags=re.MULTILINE).group(1)
    inputs = block.split("\n")[0]
    assert "checkpoints/rounds/selftrain_bismap_round_1.pt" in inputs and "warmup.pt" not in inputs
    assert "pseudo_labels/rounds/bismap_round_1/shard_0" in inputs and "pseudo_labels/maps" not in inputs


def test_qualitative_figure_has_a_column_per_model(finished_tiny_run):
    figure = Image.open(seed_results(finished_tiny_run[0] / "results") / "report" / "qualitative.png")
    columns, rows = 2 + 1 + len(VARIANTS) + 1 + 2 + 1, 2  # image, truth, warmup, variants + a round, 2 distill, oracle
    assert figure.width / figure.height == pytest.approx(columns / rows, rel=0.25)


def test_qualitative_cells_are_the_palette_of_truth_and_predictions(finished_tiny_run, tmp_path):
    import torch

    from bismap.evaluation.qualitative import palette, predict, qualitative_figure
    from bismap.training.checkpoint import load_model

    results = seed_results(finished_tiny_run[0] / "results")
    checkpoints = {name: results / "checkpoints" / f"{name}.pt" for name in ("warmup", "distill")}
    rows = qualitative_figure(checkpoints, results / "manifests" / "target_val.json", tmp_path / "figure.png",
                              images=3, device=torch.device("cpu"))
    assert len(rows) == 3 and all(len(cells) == 4 for cells in rows)
    from bismap.data.loading import Manifest, SegmentationDataset

    last = SegmentationDataset(Manifest.load(results / "manifests" / "target_val.json"))[11]  # evenly spaced: 0, 6, 11
    colours = palette([str(digit) for digit in range(10)] + ["background"])
    assert np.array_equal(rows[2][1], colours[last["label"].numpy()])
    model, _ = load_model(checkpoints["distill"])
    assert np.array_equal(rows[2][3], colours[predict(model.eval(), last["image"])])
    assert tuple(colours[255]) == (0, 0, 0) and len({tuple(colour) for colour in colours[:11]}) == 11


def test_cityscapes_classes_get_their_official_colours():
    from bismap.data.real_datasets import CITYSCAPES_CLASS_NAMES
    from bismap.evaluation.qualitative import palette

    colours = palette(list(CITYSCAPES_CLASS_NAMES))
    assert tuple(colours[0]) == (128, 64, 128) and tuple(colours[18]) == (119, 11, 32)  # road, bicycle


def edited_plan(finished_tiny_run, tmp_path, edit) -> dict[str, int]:
    workdir, configfile = finished_tiny_run
    config = yaml.safe_load(configfile.read_text())
    edit(config)
    return planned_jobs(run_snakemake(workdir, write_config(tmp_path / "edited.yaml", config), "-n").stdout)


def test_editing_lambda_reruns_the_consistency_variant_distillation_and_report_only(finished_tiny_run, tmp_path):
    jobs = edited_plan(finished_tiny_run, tmp_path,
                       lambda config: config["selftrain"].update(consistency_weight=7.5))
    assert jobs == {"selftrain": 2, "selftrain_round": 1, "round_pseudo_labels": 2, "teacher_pseudo_labels": 2,
                    "merge_pseudo_labels": 2, "distill_stage": 1, "stage_teacher_pseudo_labels": 2, "distill": 1,
                    "evaluate": 5, "qualitative_figure": 1, "report": 1, "report_seeds": 1, "all": 1}


def test_adding_a_variant_runs_only_that_variant(finished_tiny_run, tmp_path):
    new = {"name": "maps_only", "maps": True, "stm": False, "consistency": False}
    jobs = edited_plan(finished_tiny_run, tmp_path, lambda config: config["selftrain"]["variants"].append(new))
    assert jobs == {"selftrain": 1, "evaluate": 1, "qualitative_figure": 1, "report": 1, "report_seeds": 1, "all": 1}


def test_a_proda_variant_trains_from_the_warmup_alone_and_gets_a_report_row(finished_tiny_run, tmp_path):
    """Method proda makes its labels while it trains: one job on the warmup, no pseudo-label files, then its row."""
    workdir, configfile = finished_tiny_run
    config = yaml.safe_load(configfile.read_text())
    config["selftrain"]["variants"].append({"name": "proda", "method": "proda"})
    edited = write_config(tmp_path / "proda.yaml", config)
    output = run_snakemake(workdir, edited, "-n").stdout
    assert planned_jobs(output) == {"selftrain": 1, "evaluate": 1, "qualitative_figure": 1, "report": 1,
                                    "report_seeds": 1, "all": 1}
    inputs = re.search(r"^rule selftrain:\n((?:    .*\n)+)", output, flags=re.MULTILINE).group(1).split("\n")[0]
    assert "checkpoints/warmup.pt" in inputs and "pseudo_labels" not in inputs and "stm" not in inputs


FAMILY = ("proda", "cpsl", "contrastive", "cag")


def test_the_family_variants_run_without_maps_labels_or_stm(finished_tiny_run, tmp_path):
    """Planned alone, ProDA and CPSL need the warmup only; the contrastive method the baseline labels as static
    labels (2 shards); CAG-UDA the MAPs file's class centroids (features and GMM jobs) and its anchor labels
    ('cas', 2 shards), not the MAPs labels; its second stage the same again, made with its first stage's model.
    Then they run on top of the shared tiny run (its warmup and MAPs file), whose files are left as they were."""
    config = tiny_config(tmp_path / "results")
    config["selftrain"]["variants"] = [{"name": name, "method": name} for name in FAMILY]
    config["selftrain"]["variants"][-1]["rounds"] = 2  # CAG-UDA's second stage: anchors and labels of the first
    for stage in ("maps", "pseudo_label_report", "stm", "distill", "oracle"):
        config[stage]["enabled"] = False
    results = seed_results(tmp_path / "results")
    targets = [str(results / "evaluation" / f"selftrain_{name}" / "metrics.json") for name in FAMILY]
    configfile = write_config(tmp_path / "family.yaml", config)
    output = run_snakemake(tmp_path, configfile, "-n", *targets).stdout
    assert planned_jobs(output) == {"make_digit_scenes": 3, "index_dataset": 3, "warmup": 1,
                                    "extract_source_features": 1, "fit_class_gmm": 2, "merge_class_gmms": 1,
                                    "pseudo_labels": 4, "selftrain": 4, "evaluate": 4, "selftrain_round": 1,
                                    "stage_source_features": 1, "stage_fit_class_gmm": 2, "stage_merge_class_gmms": 1,
                                    "stage_anchor_labels": 2}
    assert re.search(r"wildcards: seed=0, labels=cas, shard=1", output)
    assert re.search(r"wildcards: seed=0, labels=baseline, shard=1", output)
    stage_two = next(block for block in output.split("\n\n")  # the job block of the last stage's training
                     if "rule selftrain:" in block and re.search(r"wildcards: seed=0, variant=cag$", block, re.M))
    assert "rounds/selftrain_cag_round_1.pt" in stage_two and "maps/rounds/cag_round_1/prototypes.h5" in stage_two
    assert "pseudo_labels/cag_rounds/cag_round_1/shard_0" in stage_two

    workdir, shared_configfile = finished_tiny_run
    shared = yaml.safe_load(shared_configfile.read_text())
    shared["selftrain"]["variants"] += config["selftrain"]["variants"]
    results = seed_results(workdir / "results")
    targets = [str(results / "evaluation" / f"selftrain_{name}" / "metrics.json") for name in FAMILY]
    before = tree_files(workdir / "results")
    try:
        run_snakemake(workdir, write_config(tmp_path / "shared_family.yaml", shared), *targets)
        headers = {name: (results / "training" / f"selftrain_{name}_loss.tsv").read_text().splitlines()[0].split("\t")
                   for name in FAMILY}
        metrics = {name: json.loads((results / "evaluation" / f"selftrain_{name}" / "metrics.json").read_text())
                   for name in FAMILY}
    finally:
        remove_new_files(workdir / "results", before)
    assert headers["proda"][:6] == ["iteration", "loss", "source_ce", "target_sce", "structure_kl", "regularization"]
    assert headers["cpsl"][:6] == ["iteration", "loss", "source_ce", "target_ce", "self_labeling", "consistency"]
    assert headers["contrastive"][6:9] == ["forward_contrast", "backward_contrast", "dynamic_share"]
    assert headers["cag"][:7] == ["iteration", "loss", "source_ce", "source_distance", "target_distance",
                                  "target_ce", "probability_ce"]
    for name in FAMILY:
        assert 0.0 <= metrics[name]["miou"] <= 100.0 and metrics[name]["images"] == 12


def test_bismap_switches_on_a_proda_variant_fail_naming_it(finished_tiny_run, tmp_path):
    workdir, configfile = finished_tiny_run
    config = yaml.safe_load(configfile.read_text())
    config["selftrain"]["variants"].append({"name": "proda", "method": "proda", "stm": True})
    result = run_snakemake(workdir, write_config(tmp_path / "bad.yaml", config), "-n", check=False)
    assert result.returncode != 0 and "variant 'proda' (method proda)" in result.stdout + result.stderr


def test_alignment_without_consistency_fails_naming_the_variant(finished_tiny_run, tmp_path):
    workdir, configfile = finished_tiny_run
    config = yaml.safe_load(configfile.read_text())
    config["selftrain"]["variants"].append({"name": "aligned", "maps": True, "alignment": True})
    result = run_snakemake(workdir, write_config(tmp_path / "bad.yaml", config), "-n", check=False)
    assert result.returncode != 0 and "variant 'aligned': alignment acts on" in result.stdout + result.stderr


def test_a_duplicate_variant_name_fails_naming_it(finished_tiny_run, tmp_path):
    workdir, configfile = finished_tiny_run
    config = yaml.safe_load(configfile.read_text())
    config["selftrain"]["variants"].append(dict(config["selftrain"]["variants"][0]))
    result = run_snakemake(workdir, write_config(tmp_path / "bad.yaml", config), "-n", check=False)
    assert result.returncode != 0 and "'baseline' is used twice" in result.stdout + result.stderr
